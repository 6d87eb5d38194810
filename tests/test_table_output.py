"""Table outputs without a model: columns, crash-safe parts, resume merges, CSV."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbgen.io.resume import ResumeError
from cbgen.io.table_output import TableOutput, load_table_done_ids, output_layout
from cbgen.io.table_parts import PartsDir
from cbgen.io.table_rows import TableRow
from cbgen.io.writer import ResultRecord, make_writer

SCHEMA = pa.schema([("text", pa.string()), ("n", pa.int32()), ("tags", pa.list_(pa.string()))])


def _rec(i: int, reason: str = "stop", source: str | None = None) -> ResultRecord:
    err = reason == "error"
    return ResultRecord(f"r{i}", i, None if err else f"out {i}", reason,
                        usage=None if err else {"prompt_tokens": 5, "cached_tokens": 0, "completion_tokens": 2},
                        error="row: bad" if err else None,
                        row=TableRow(source, {"text": f"in {i}", "n": i, "tags": ["a", str(i)]}))


def _out(tmp_path, name="out.parquet", **kw) -> TableOutput:
    fmt = name.rsplit(".", 1)[1]
    return TableOutput(str(tmp_path / name), fmt, output_layout(SCHEMA), ["in.parquet"], part_rows=4, **kw)


def test_layout_keeps_input_types_and_renames_clashes():
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("input_text", pa.string()), ("x", pa.float32())])
    lay = output_layout(schema, multi=True, samples=2)
    assert lay.renames == {"id": "input_id", "text": "input_input_text", "input_text": "input_text", "x": "x"}
    names = lay.schema.names
    assert names[:4] == [lay.renames[n] for n in schema.names] and len(set(names)) == len(names)
    assert names[4:] == ["source", "id", "line", "text", "finish_reason", "prompt_tokens", "cached_tokens",
                         "completion_tokens", "error", "choices"]
    assert lay.schema.field("x").type == pa.float32() and lay.schema.field(lay.renames["id"]).type == pa.int64()


def test_rows_go_to_atomic_parts_then_one_file_in_order(tmp_path):
    with _out(tmp_path) as out:
        w = make_writer("parquet", out)
        for i in range(1, 11):
            w.write(_rec(i, "error" if i == 5 else "stop"))
        parts = PartsDir(out.path)
        assert [len(r) for r in parts.runs()] == [2]  # 8 rows in two parts of 4; 2 still buffered
        assert not os.path.exists(out.path)
        w.close(complete=True)
    t = pq.read_table(out.path)
    assert t.column("id").to_pylist() == [f"r{i}" for i in range(1, 11)]
    assert t.schema.field("n").type == pa.int32() and t.column("tags").to_pylist()[0] == ["a", "1"]
    row5 = t.slice(4, 1).to_pylist()[0]
    assert row5["finish_reason"] == "error" and row5["error"] == "row: bad" and row5["text"] is None
    assert pq.ParquetFile(out.path).metadata.num_row_groups == 3  # 4 + 4 + 2
    assert not PartsDir(out.path).exists()


def test_crash_keeps_whole_parts_and_resume_merges_in_input_order(tmp_path):
    # Run 1 dies (no finish) after rows 1-4 and 6-11, with row 5 never started and row 7 aborted.
    out = _out(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with out:
            for i in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11):
                out.add(_rec(i, "abort" if i == 7 else "stop"))
            out._buf.clear()  # rows 10-11 were still in memory when the process died
            with open(os.path.join(PartsDir(out.path).path, ".run-0001-part-000002.parquet.tmp"), "wb") as f:
                f.write(b"PAR1 half a part")  # a write cut by the kill
            raise KeyboardInterrupt
    state = load_table_done_ids(out.path)
    assert state.done_ids == {"r1", "r2", "r3", "r4", "r6", "r8", "r9"} and state.num_aborted == 1
    assert pq.read_table(PartsDir(out.path).path).num_rows == 8  # the directory reads as a dataset, .tmp skipped
    # Run 2 (--resume) does what is not done: 5, 7 (aborted), 10 and later.
    with _out(tmp_path, resume=True) as out2:
        for i in (5, 7, 10, 11, 12):
            out2.add(_rec(i))
        out2.finish(complete=True)
    t = pq.read_table(out2.path)
    assert t.column("id").to_pylist() == [f"r{i}" for i in range(1, 13)]
    assert t.column("finish_reason").to_pylist() == ["stop"] * 12  # the abort was replaced
    assert not PartsDir(out2.path).exists()


def test_incomplete_run_assembles_but_keeps_parts(tmp_path):
    with _out(tmp_path) as out:
        for i in (1, 2, 4):
            out.add(_rec(i))
        out.finish(complete=False)
    assert pq.read_table(out.path).column("line").to_pylist() == [1, 2, 4]
    assert load_table_done_ids(out.path).done_ids == {"r1", "r2", "r4"}  # from the parts
    with _out(tmp_path, resume=True) as out2:
        out2.add(_rec(3))
        out2.finish(complete=True)
    assert pq.read_table(out.path).column("line").to_pylist() == [1, 2, 3, 4]


def test_resume_of_a_finished_file_adds_new_rows_in_order(tmp_path):
    with _out(tmp_path) as out:
        for i in (1, 3):
            out.add(_rec(i))
        out.finish(complete=True)
    assert load_table_done_ids(out.path).done_ids == {"r1", "r3"}  # from the final file
    with _out(tmp_path, resume=True) as out2:
        out2.add(_rec(2))
        out2.finish(complete=True)
    assert pq.read_table(out.path).column("id").to_pylist() == ["r1", "r2", "r3"]


def test_resume_refuses_other_columns_and_foreign_files(tmp_path):
    with _out(tmp_path) as out:
        out.add(_rec(1))  # crash: parts stay
    other = TableOutput(out.path, "parquet", output_layout(pa.schema([("q", pa.string())])), ["x"], resume=True)
    with pytest.raises(ResumeError, match="its columns .* differ from this run's"):
        other.__enter__()
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    with pytest.raises(ResumeError, match="not a cbgen table output"):
        load_table_done_ids(str(foreign))


def test_csv_output_flattens_nested_cells_and_resumes(tmp_path):
    with _out(tmp_path, "out.csv") as out:
        for i in (1, 2):
            out.add(_rec(i))
        out.finish(complete=True)
    lines = open(out.path, encoding="utf-8").read().splitlines()
    assert lines[0].split(",")[:4] == ['"input_text"', '"n"', '"tags"', '"id"']
    assert json.dumps(["a", "1"]).replace('"', '""') in lines[1]
    with pytest.raises(ResumeError, match="'tags' was written as JSON text"):
        _out(tmp_path, "out.csv", resume=True).__enter__()
    assert load_table_done_ids(out.path).done_ids == {"r1", "r2"}  # ids are still readable


def test_tsv_output_round_trips_flat_columns(tmp_path):
    flat = output_layout(pa.schema([("q", pa.string())]))
    rec = ResultRecord("a", 1, "x\ty", "stop", row=TableRow(None, {"q": "tab\there"}))
    path = str(tmp_path / "o.tsv")
    with TableOutput(path, "tsv", flat, ["in"]) as out:
        out.add(rec)
        out.finish(complete=True)
    from pyarrow import csv
    t = csv.read_csv(path, parse_options=csv.ParseOptions(delimiter="\t"))
    assert t.column("q").to_pylist() == ["tab\there"] and t.column("text").to_pylist() == ["x\ty"]
    with TableOutput(path, "tsv", flat, ["in"], resume=True) as again:  # a finished flat TSV: adopted as run 0
        again.add(ResultRecord("b", 2, "z", "stop", row=TableRow(None, {"q": "w"})))
        again.finish(complete=True)
    t = csv.read_csv(path, parse_options=csv.ParseOptions(delimiter="\t"))
    assert t.column("id").to_pylist() == ["a", "b"] and t.column("line").to_pylist() == [1, 2]


def test_samples_go_to_a_choices_column(tmp_path):
    lay = output_layout(None, samples=2)
    choices = [{"index": 0, "text": "a", "finish_reason": "stop"}, {"index": 1, "text": "b", "finish_reason": "length"}]
    path = str(tmp_path / "o.parquet")
    with TableOutput(path, "parquet", lay, ["in.jsonl"]) as out:
        out.add(ResultRecord("1", 1, "a", "stop", choices=choices, row=TableRow(None, {})))
        out.finish(complete=True)
    t = pq.read_table(path)
    assert t.schema.names[0] == "id" and t.column("choices").to_pylist() == [choices]
