"""Live progress view (Rich): one line per running sequence plus a header.

It only renders: front-ends feed it RequestOutputs (``observe``) and poll the
engine's read-only ``progress()`` / ``stats()``. Rendering goes to the console
it is given (stderr in ``cbgen run``), never stdout.
"""

from __future__ import annotations

import time
from collections import deque

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..engine.engine import Engine
from ..engine.outputs import RequestOutput


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressView:
    def __init__(self, engine: Engine, *, max_lines: int = 16, tail_chars: int = 48) -> None:
        self.engine = engine
        self.max_lines = max_lines
        self.tail_chars = tail_chars
        self.start = time.monotonic()
        self.done = 0
        self.errors = 0
        self.total: int | None = None      # known once the input is exhausted
        self.queued_outside = 0            # read but not yet given to the engine
        self._tails: dict[tuple[str, int], str] = {}
        self._first: dict[tuple[str, int], float] = {}
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, generated tokens) samples

    # ---- feeding ------------------------------------------------------------
    def observe(self, o: RequestOutput) -> None:
        key = (o.request_id, o.index)
        if o.finished:
            self._tails.pop(key, None)
            self._first.pop(key, None)
            return
        self._first.setdefault(key, time.monotonic())
        if o.text_delta:
            self._tails[key] = (self._tails.get(key, "") + o.text_delta)[-self.tail_chars:]

    def record_done(self, error: bool = False) -> None:
        self.done += 1
        self.errors += int(error)

    # ---- figures ------------------------------------------------------------
    def _rate(self) -> float:
        now, gen = time.monotonic(), self.engine.num_generated_tokens
        self._recent.append((now, gen))
        t0, g0 = self._recent[0]
        if now - t0 < 0.5:
            return gen / max(now - self.start, 1e-6)
        return (gen - g0) / (now - t0)

    def render(self):
        seqs = self.engine.progress()
        st = self.engine.stats()
        rate = self._rate()
        remaining = sum(max(s.max_new_tokens - s.num_output_tokens, 0) for s in seqs)
        avg_max = (sum(s.max_new_tokens for s in seqs) / len(seqs)) if seqs else 0
        remaining += int(self.queued_outside * avg_max)
        eta = remaining / rate if rate > 0 and (self.total is not None or not self.queued_outside) else None
        total = str(self.total) if self.total is not None else "?"
        head = Text.assemble(
            ("cbgen ", "bold"), f"done {self.done}/{total}",
            (f"  errors {self.errors}" if self.errors else "", "red"),
            f"  running {st.num_running}  queued {st.num_waiting + self.queued_outside}",
            f"  {rate:,.0f} tok/s  KV {st.kv_usage:.0%}  prefix hits {st.prefix_hit_rate:.0%}",
            f"  ETA ≤ {_fmt_eta(eta)}")
        table = Table.grid(padding=(0, 1))
        for col in ("id", "state", "tokens", "tok/s", "text"):
            table.add_column(col, no_wrap=True, overflow="ellipsis",
                             justify="right" if col in ("tokens", "tok/s") else "left")
        now = time.monotonic()
        for s in seqs[: self.max_lines]:
            key = (s.request_id, s.index)
            label = s.request_id if s.index == 0 else f"{s.request_id}#{s.index}"
            if s.state == "prefill":
                tokens = f"{s.num_computed_tokens}/{s.num_prompt_tokens}p"
            else:
                tokens = f"{s.num_output_tokens}/{s.max_new_tokens}"
            started = self._first.get(key)
            tps = f"{s.num_output_tokens / (now - started):.1f}" if started and now > started else ""
            tail = self._tails.get(key, "").replace("\n", " ")
            style = {"queued": "dim", "prefill": "yellow", "decode": "green"}[s.state]
            table.add_row(label[:16], Text(s.state, style=style), tokens, tps, Text(tail, style="dim"))
        parts = [head, table]
        if len(seqs) > self.max_lines:
            parts.append(Text(f"… and {len(seqs) - self.max_lines} more", style="dim"))
        return Group(*parts)

    def summary(self) -> str:
        wall = time.monotonic() - self.start
        gen = self.engine.num_generated_tokens
        st = self.engine.stats()
        return (f"cbgen: {self.done} request{'' if self.done == 1 else 's'}, {gen} tokens generated in {wall:.1f}s "
                f"({gen / wall if wall > 0 else 0:.1f} tok/s), {self.errors} error{'' if self.errors == 1 else 's'}"
                + (f", {st.num_preemptions} preemptions (KV cache full; --kv-cache-gb)" if st.num_preemptions else "")
                + (f", {st.num_kv_exhausted} sequence{'' if st.num_kv_exhausted == 1 else 's'} cut short by the "
                   "whole KV cache (finish_reason \"length\"; "
                   "raise --kv-cache-gb)" if st.num_kv_exhausted else ""))
