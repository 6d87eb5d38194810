"""The live view of ``cbgen run --ray``: the usual header, summed over workers, and a line per worker.

Only whole finished requests cross to the driver, and each worker's list of
live sequences every half second, so sequence lines have counts but no text.
Below them, one line per worker: its node, running and queued sequences,
requests done, and tok/s over the last few seconds.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .progress import ProgressView


class RayProgressView(ProgressView):
    """``ProgressView`` over a ``RayPool`` (which offers the engine's ``stats`` /
    ``progress`` / ``num_generated_tokens``, summed) plus ``pool.worker_rows()``."""

    def __init__(self, pool, *, max_lines: int = 8) -> None:
        super().__init__(pool, max_lines=max_lines)

    def render(self):
        table = Table.grid(padding=(0, 1))
        for col in ("worker", "node", "state", "running", "queued", "done", "tok/s"):
            table.add_column(col, no_wrap=True, overflow="ellipsis",
                             justify="left" if col in ("worker", "node", "state") else "right")
        for r in self.engine.worker_rows():
            state = Text("ok", style="green") if r.alive else Text("dead", style="red")
            table.add_row(r.name, r.node[:24], state, f"running {r.running}", f"queued {r.waiting}",
                          f"done {r.done}", f"{r.tokens_per_s:,.0f} tok/s")
        return Group(super().render(), table)
