"""``cbgen merge``: the outputs of ``--shard I/N`` runs -> one output in input order, checked.

Memory is one small index entry per record (file, byte offset, length, sort
key), not the records: the text is copied from the shard files at the end.

Order: with the inputs given, the order of their ids (the ids ``cbgen run``
gives the same files, with ``"a.jsonl:7"`` ids for several inputs); without,
the records' ``line`` (cbgen JSONL; right for a single input), then file order.
Checks: every id at most once (duplicates named; the first complete, non-abort
record is kept), and, with the inputs, every input id present (missing named).
A half-written last line (a killed shard) is not a record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from cbgen.config import SamplingParams
from cbgen.io.reader import source_names
from cbgen.io.records import LineParser
from cbgen.io.resume import record_key
from cbgen.io.table_rows import read_inputs

NO_LINE = float("inf")


class MergeError(Exception):
    """A shard output that is not a cbgen / OpenAI output (names the file and line)."""


class _Entry(NamedTuple):
    key: tuple
    file: int
    offset: int
    length: int
    aborted: bool


@dataclass
class MergeReport:
    records: int = 0                                            # written to the merged output
    duplicates: dict[str, int] = field(default_factory=dict)    # id -> times seen (> 1)
    missing: list[str] = field(default_factory=list)            # input ids with no record (needs inputs)
    unexpected: list[str] = field(default_factory=list)         # record ids not in the inputs
    incomplete: list[str] = field(default_factory=list)         # "file: half-written last line"
    checked_missing: bool = False

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.unexpected)


def input_ids(inputs: list[str]) -> list[str]:
    """Every id ``cbgen run inputs`` writes a record for, in input order (bad lines included):
    read as the run reads them (``table_rows.read_inputs``), so default ids are the same."""
    parser = LineParser(SamplingParams(), sources=source_names(inputs))
    return [r.id for r in read_inputs(inputs, parser)]


def _index(files: list[BinaryIO], names: list[str], order: dict[str, int] | None,
           report: MergeReport) -> dict[str, list[_Entry]]:
    by_id: dict[str, list[_Entry]] = {}
    for fi, f in enumerate(files):
        offset = line_no = 0
        while raw := f.readline():
            line_no += 1
            if not raw.endswith(b"\n"):
                report.incomplete.append(f"{names[fi]}: half-written last line {line_no} skipped")
                break
            if raw.strip():
                key_final = record_key(raw)
                if key_final is None:
                    raise MergeError(f"{names[fi]} line {line_no}: not a cbgen or OpenAI output record "
                                     "(no 'id' / 'custom_id')")
                rid, obj = key_final[0], json.loads(raw)
                if order is not None:
                    key = (order.get(rid, len(order)), fi, offset)
                else:
                    line = obj.get("line")
                    key = (line if isinstance(line, int) else NO_LINE, fi, offset)
                by_id.setdefault(rid, []).append(_Entry(key, fi, offset, len(raw), not key_final[1]))
            offset += len(raw)
    return by_id


def merge_outputs(outputs: list[str], dest: BinaryIO, inputs: list[str] | None = None) -> MergeReport:
    """Write the records of ``outputs`` to ``dest`` (binary) in input order; report what is off.
    Raises ``MergeError`` for a file that is not an output, ``OSError`` for one that cannot be read."""
    report = MergeReport(checked_missing=inputs is not None)
    ids = input_ids(inputs) if inputs is not None else None
    order = {rid: i for i, rid in enumerate(ids)} if ids is not None else None
    files = [open(p, "rb") for p in outputs]
    try:
        by_id = _index(files, outputs, order, report)
        chosen = []
        for rid, entries in by_id.items():
            if len(entries) > 1:
                report.duplicates[rid] = len(entries)
            entries.sort(key=lambda e: (e.aborted, e.key))  # a complete record beats an aborted one
            chosen.append(entries[0])
        chosen.sort(key=lambda e: e.key)
        for e in chosen:
            f = files[e.file]
            f.seek(e.offset)
            dest.write(f.read(e.length))
        report.records = len(chosen)
    finally:
        for f in files:
            f.close()
    if ids is not None:
        report.missing = [rid for rid in ids if rid not in by_id]
        report.unexpected = [rid for rid in by_id if rid not in order]
    return report
