"""The live view of ``cbgen run --ray``: the usual header, summed over workers, and a line per worker.

Sequences stay on the workers (only whole finished requests cross to the
driver), so instead of one line per sequence there is one per worker: its
node, running and queued sequences, requests done, and tok/s over the last
few seconds.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .progress import ProgressView


class RayProgressView(ProgressView):
    """``ProgressView`` over a ``RayPool`` (which offers the engine's ``stats`` /
    ``progress`` / ``num_generated_tokens``, summed) plus ``pool.worker_rows()``."""

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
