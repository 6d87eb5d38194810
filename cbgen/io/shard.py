"""``--shard I/N``: which inputs one process of a job array takes.

An input belongs to shard ``int.from_bytes(sha256(id.encode("utf-8"))[:8], "big") % N``
(the id as in the output record: ``id`` / ``custom_id``, else the line number,
``"a.jsonl:7"`` with several inputs). The hash depends on the id only, not on
the machine, the Python version or ``PYTHONHASHSEED``, so N processes given the
same inputs split them with no overlap and no gap, and a re-run (``--resume``)
of one shard takes the same ids again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def shard_of(request_id: str, count: int) -> int:
    """The shard (0..count-1) of ``request_id``. Lone surrogates (from bad input bytes) are hashed as-is."""
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int   # 0-based
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: expected I/N with N >= 1 and 0 <= I < N")

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        """``"I/N"`` (0-based I, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``); ValueError otherwise."""
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ValueError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (0-based I)")
        return cls(int(m[1]), int(m[2]))

    def owns(self, request_id: str) -> bool:
        return shard_of(request_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
