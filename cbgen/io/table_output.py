"""Table output (``-o out.parquet`` / ``.csv`` / ``.tsv``): the input columns plus the result.

Columns, in order: the input table's columns with their types (an input column
whose name a result column takes is renamed ``input_<name>``), ``source``
when several inputs are read, then ``id``, ``line`` (1-based row of its input),
``text``, ``finish_reason``, ``prompt_tokens``, ``cached_tokens``,
``completion_tokens``, ``error``, and ``choices`` when ``--samples`` > 1. CSV
and TSV write nested cells (lists, structs) as JSON text.

Rows are written as results complete, in input order, into crash-safe part
files (``table_parts``); the final file is assembled from them when the run
ends. ``--resume`` reads the ids already in the parts (or in a finished
output) and skips them; rows whose ``finish_reason`` is ``abort`` are done
again and replace the aborted row.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from cbgen.io.resume import ResumeError
from cbgen.io.table_parts import PartsDir, merged_batches, rechunk, replace_durably
from cbgen.io.writer import ResultRecord, Writer

PART_ROWS = 1000       # a part (and a final row group) every this many results ...
PART_SECONDS = 30.0    # ... or this often, so a crash loses at most this much work
_CHOICE = pa.struct([("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string())])
RESULT_FIELDS = [("id", pa.string()), ("line", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string()),
                 ("prompt_tokens", pa.int64()), ("cached_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                 ("error", pa.string())]


class OutputLayout(NamedTuple):
    schema: pa.Schema              # every output column
    renames: dict[str, str]        # input column -> output column


def output_layout(input_schema: pa.Schema | None, multi: bool = False, samples: int = 1) -> OutputLayout:
    """The output columns for inputs with ``input_schema`` (None: line inputs only)."""
    result = ([("source", pa.string())] if multi else []) + RESULT_FIELDS
    if samples > 1:
        result.append(("choices", pa.list_(_CHOICE)))
    reserved = {name for name, _ in result}
    taken = reserved | set(input_schema.names if input_schema is not None else ())
    renames: dict[str, str] = {}
    fields = []
    for f in input_schema or []:
        name = f.name
        if name in reserved:
            name = f"input_{name}"
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
        renames[f.name] = name
        fields.append(f.with_name(name))
    return OutputLayout(pa.schema(fields + [pa.field(n, t) for n, t in result]), renames)


class TableResumeState(NamedTuple):
    done_ids: set[str]
    num_records: int       # rows found (all runs)
    num_aborted: int       # rows with finish_reason "abort": done again


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    if path.lower().endswith((".csv", ".tsv")):
        from pyarrow import csv
        opts = csv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
        parse = csv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",", newlines_in_values=True)
        return csv.read_csv(path, parse_options=parse, convert_options=opts)
    return pq.read_table(path, columns=columns)


def load_table_done_ids(output: str) -> TableResumeState:
    """Ids done in ``output``'s parts, or in ``output`` itself when it is finished
    (no parts). Raises ``ResumeError`` for a file that is not a cbgen table output."""
    files = [p for run in PartsDir(output).runs() for p in run]
    if not files and os.path.exists(output):
        files = [output]
    done: set[str] = set()
    n = aborted = 0
    for f in files:
        try:
            t = _read_columns(f, ["id", "finish_reason"])
        except (pa.ArrowInvalid, KeyError) as e:
            raise ResumeError(f"{f}: not a cbgen table output ({e}); refusing to resume into it") from None
        for rid, reason in zip(t.column("id").to_pylist(), t.column("finish_reason").to_pylist()):
            n += 1
            if reason == "abort":
                aborted += 1
            else:
                done.add(rid)
    return TableResumeState(done, n, aborted)


def _csv_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Nested columns as JSON text (CSV cells are flat)."""
    cols, fields = [], []
    for f, col in zip(batch.schema, batch.columns):
        if pa.types.is_nested(f.type):
            col = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                            for v in col.to_pylist()], pa.string())
            f = f.with_type(pa.string())
        cols.append(col)
        fields.append(f)
    return pa.RecordBatch.from_arrays(cols, schema=pa.schema(fields))


class TableOutput:
    """The output file of one run: parts while it runs, the assembled file at ``finish``.

    Use as a context manager; ``add`` each record in input order, then
    ``finish(complete)``. Leaving without ``finish`` (a crash) keeps the parts.
    """

    def __init__(self, path: str, fmt: str, layout: OutputLayout, sources: list[str], *, resume: bool = False,
                 part_rows: int = PART_ROWS, part_seconds: float = PART_SECONDS) -> None:
        self.path, self.fmt, self.layout, self.resume = path, fmt, layout, resume
        self.sources = ["stdin" if s == "-" else s for s in sources]  # as TableRow.source names them
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.parts = PartsDir(path)
        self.multi = "source" in layout.schema.names
        self._buf: list[dict[str, Any]] = []
        self._last = time.monotonic()
        self._run = self._part = 0
        self.finished = False

    def __enter__(self) -> "TableOutput":
        had_parts = bool(self.parts.runs())
        if self.resume and had_parts:
            old = self.parts.schema()
            if old is not None and not old.equals(self.layout.schema):
                raise ResumeError(f"{self.parts.path}: its columns ({', '.join(old.names)}) differ from this "
                                  f"run's ({', '.join(self.layout.schema.names)}); refusing to resume into it")
        elif not self.resume and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run replaces the output, as "-o out.jsonl" does
        self.parts.create(fresh=not self.resume)
        if self.resume and not had_parts and os.path.exists(self.path):
            self._adopt_finished()
        self._run = self.parts.next_run()
        return self

    def _adopt_finished(self) -> None:
        """A finished output becomes run 0, so new rows merge into it in input order."""
        schema = self.layout.schema
        if self.fmt == "parquet":
            old = pq.read_schema(self.path).remove_metadata()
            if not old.equals(schema):
                raise ResumeError(f"{self.path}: its columns ({', '.join(old.names)}) differ from this run's "
                                  f"({', '.join(schema.names)}); refusing to resume into it")
            self.parts.adopt(self.path)
            return
        nested = [f.name for f in schema if pa.types.is_nested(f.type)]
        if nested:
            raise ResumeError(f"{self.path}: column {nested[0]!r} was written as JSON text and cannot be read "
                              "back; resume into a Parquet output instead")
        from pyarrow import csv
        try:
            t = csv.read_csv(self.path, parse_options=csv.ParseOptions(
                delimiter="\t" if self.fmt == "tsv" else ",", newlines_in_values=True),
                convert_options=csv.ConvertOptions(column_types=schema, strings_can_be_null=True,
                                                   null_values=[""], quoted_strings_can_be_null=False))
            t = t.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, KeyError) as e:
            raise ResumeError(f"{self.path}: not this run's table output ({e}); refusing to resume into it") from None
        self.parts.write(t, 0, 0)
        os.remove(self.path)

    def _row(self, rec: ResultRecord) -> dict[str, Any]:
        row = rec.row
        d = {self.layout.renames.get(k, k): v for k, v in (row.columns.items() if row is not None else ())}
        if self.multi:
            d["source"] = row.source if row is not None else None
        u = rec.usage or {}
        d.update(id=rec.id, line=rec.line, text=rec.text, finish_reason=rec.finish_reason,
                 prompt_tokens=u.get("prompt_tokens"), cached_tokens=u.get("cached_tokens"),
                 completion_tokens=u.get("completion_tokens"), error=rec.error, choices=rec.choices)
        return d

    def add(self, rec: ResultRecord) -> None:
        self._buf.append(self._row(rec))
        if len(self._buf) >= self.part_rows or time.monotonic() - self._last >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part (nothing if none)."""
        self._last = time.monotonic()
        if not self._buf:
            return
        self.parts.write(pa.Table.from_pylist(self._buf, schema=self.layout.schema), self._run, self._part)
        self._part += 1
        self._buf.clear()

    def finish(self, complete: bool) -> None:
        """Assemble the output from every run's parts. ``complete`` (every input has
        a record that is not an abort) removes the parts; otherwise they stay for ``--resume``."""
        self.flush()
        self.finished = True
        runs = self.parts.runs()
        if runs or (complete and not os.path.exists(self.path)):
            self._assemble(runs)   # no rows at all (a header-only CSV): an empty table with the schema
        if complete or not runs:
            self.parts.remove()

    def _assemble(self, runs: list[list[str]]) -> None:
        tmp = self.path + ".tmp"
        schema = self.layout.schema
        tables = rechunk(merged_batches(runs, self.sources), schema, self.part_rows)
        if self.fmt == "parquet":
            with pq.ParquetWriter(tmp, schema) as w:
                for t in tables:
                    w.write_table(t, row_group_size=self.part_rows)
        else:
            from pyarrow import csv
            opts = csv.WriteOptions(delimiter="\t" if self.fmt == "tsv" else ",")
            csv_schema = _csv_safe(pa.RecordBatch.from_pylist([], schema=schema)).schema
            with csv.CSVWriter(tmp, csv_schema, write_options=opts) as w:
                for t in tables:
                    for b in t.to_batches():
                        w.write_batch(_csv_safe(b))
        replace_durably(tmp, self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self.flush()  # the rows done so far survive for --resume


class TableWriter(Writer):
    """``Writer`` adapter: ``write`` adds to a ``TableOutput``, ``close`` finishes it."""

    def __init__(self, stream: TableOutput) -> None:
        self.stream, self.ascii = stream, False

    def format(self, rec: ResultRecord) -> str:
        raise NotImplementedError("a table output has no text form")

    def write(self, rec: ResultRecord) -> None:
        self.stream.add(rec)

    def close(self, complete: bool = True) -> None:
        self.stream.finish(complete)
