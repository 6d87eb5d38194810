"""A table output's crash-safe sidecar: complete Parquet part files, merged into the final file.

A Parquet file is readable only once its footer is written, so a run killed
midway (``kill -9``) would lose a single streamed file. Instead, results go to
``OUT.parts/`` as parts, each one a complete Parquet file of up to a few
thousand rows, written as ``.*.tmp``, fsynced and renamed: a part either
exists whole or not at all. The final ``OUT`` (Parquet, CSV or TSV) is
assembled from the parts at the end of the run, into ``OUT.tmp`` and renamed.

Invariants:

* part ``run-RRRR-part-PPPPPP.parquet`` belongs to run ``R`` (one per
  ``cbgen run``; ``--resume`` starts the next). Within a run, the parts in name
  order hold rows in input order (table output always uses ``--order input``).
* the input position of a row is ``(index of its source, line)``; runs are
  merged on it, and where two runs hold the same position (an aborted row that
  a resume redid) the later run wins.
* run 0 is a finished output adopted back into the parts (``adopt``) when a
  resume of a complete file finds new input rows.
"""

from __future__ import annotations

import heapq
import os
import re
import shutil
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

_PART = re.compile(r"run-(\d{4})-part-(\d{6})\.parquet")
READ_ROWS = 4096


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str, path: str) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the directory: after a crash
    ``path`` is either the old file or the complete new one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


class PartsDir:
    """The ``OUT.parts`` directory of one output file."""

    def __init__(self, output: str) -> None:
        self.path = output + ".parts"

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def runs(self) -> list[list[str]]:
        """Part paths grouped by run, runs and parts in order; leftover ``*.tmp`` are ignored."""
        if not self.exists():
            return []
        by_run: dict[int, list[tuple[int, str]]] = {}
        for name in os.listdir(self.path):
            m = _PART.fullmatch(name)
            if m:
                by_run.setdefault(int(m[1]), []).append((int(m[2]), os.path.join(self.path, name)))
        return [[p for _, p in sorted(by_run[r])] for r in sorted(by_run)]

    def next_run(self) -> int:
        """The number for a new run (1 for a fresh directory; run 0 is reserved for ``adopt``)."""
        names = [int(m[1]) for n in (os.listdir(self.path) if self.exists() else ()) if (m := _PART.fullmatch(n))]
        return max(names, default=0) + 1

    def create(self, fresh: bool) -> None:
        """Make the directory (``fresh``: emptied first); remove parts cut by a crash."""
        if fresh and self.exists():
            shutil.rmtree(self.path)
        os.makedirs(self.path, exist_ok=True)
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                os.remove(os.path.join(self.path, name))

    def part_path(self, run: int, part: int) -> str:
        return os.path.join(self.path, f"run-{run:04d}-part-{part:06d}.parquet")

    def write(self, table: pa.Table, run: int, part: int) -> None:
        """One part, atomically (see the module docstring). The temporary name starts
        with "." so readers of the directory (``pyarrow.dataset``) skip it."""
        path = self.part_path(run, part)
        tmp = os.path.join(self.path, "." + os.path.basename(path) + ".tmp")
        pq.write_table(table, tmp)
        replace_durably(tmp, path)

    def adopt(self, parquet_output: str) -> None:
        """Move a finished Parquet output in as run 0 (its rows are in input order)."""
        os.replace(parquet_output, self.part_path(0, 0))

    def remove(self) -> None:
        """Remove the directory, atomically for readers: a crash midway leaves either
        every part (resume redoes nothing) or none (the final file is whole)."""
        if not self.exists():
            return
        trash = self.path + ".removing"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(self.path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def schema(self) -> pa.Schema | None:
        """The schema of the parts (the first part's), or None without parts."""
        runs = self.runs()
        return pq.read_schema(runs[0][0]).remove_metadata() if runs else None


def _run_batches(files: list[str]) -> Iterator[pa.RecordBatch]:
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS)


def _keyed_rows(run: int, files: list[str], sources: list[str]) -> Iterator[tuple]:
    rank = {s: i for i, s in enumerate(sources)}
    for batch in _run_batches(files):
        lines = batch.column("line").to_pylist()
        srcs = batch.column("source").to_pylist() if "source" in batch.schema.names else None
        for i, line in enumerate(lines):
            yield (rank.get(srcs[i], len(rank)) if srcs else 0, line), run, batch, i


def merged_batches(runs: list[list[str]], sources: list[str]) -> Iterator[pa.RecordBatch]:
    """The rows of all ``runs`` in input order, one row per position (the latest run's).

    A streaming k-way merge (k = number of runs): memory is one read batch per run.
    """
    if len(runs) == 1:  # one run is already in order with unique positions
        yield from _run_batches(runs[0])
        return
    merged = heapq.merge(*(_keyed_rows(r, files, sources) for r, files in enumerate(runs)),
                         key=lambda t: (t[0], t[1]))

    def unique() -> Iterator[tuple[pa.RecordBatch, int]]:
        prev = None
        for key, _, batch, i in merged:
            if prev is not None and prev[0] != key:
                yield prev[1], prev[2]
            prev = (key, batch, i)
        if prev is not None:
            yield prev[1], prev[2]

    # Consecutive rows of one batch leave as one slice, not row by row.
    cur, start, end = None, 0, 0
    for batch, i in unique():
        if batch is cur and i == end:
            end += 1
            continue
        if cur is not None:
            yield cur.slice(start, end - start)
        cur, start, end = batch, i, i + 1
    if cur is not None:
        yield cur.slice(start, end - start)


def rechunk(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """``batches`` regrouped into tables of exactly ``rows`` rows (the last one shorter)."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        buf.append(b)
        n += b.num_rows
        while n >= rows:
            t = pa.Table.from_batches(buf, schema)
            yield t.slice(0, rows)
            rest = t.slice(rows)
            buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf, schema)
