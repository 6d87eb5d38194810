"""`cbgen run` over tables (Parquet / CSV in, Parquet / CSV / JSONL out) on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cbgen.cli import app

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from make_table import build  # noqa: E402


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "-q", "-n", "4"]


def _run(args):
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


def test_parquet_in_parquet_out_one_row_per_input_in_order(tmp_path, base_args):
    src, out = str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")
    n = build(40, src, row_group_rows=16)
    r = _run([src, "--template", "{task}: {question}", "--id-column", "id", "-o", out,
              "--row-group-size", "16", *base_args])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""  # results go to the file, nothing else to stdout
    src_t, t = pq.read_table(src), pq.read_table(out)
    assert t.num_rows == n and t.column("id").to_pylist() == src_t.column("id").to_pylist()
    assert t.column("line").to_pylist() == list(range(1, n + 1))
    assert t.column("question").equals(src_t.column("question"))
    assert t.schema.field("variant").type == pa.int64() and t.column("input_id").equals(src_t.column("id"))
    assert set(t.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(c >= 1 for c in t.column("completion_tokens").to_pylist())
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 16 + 16 + 8
    assert not os.path.exists(out + ".parts")


def test_table_to_jsonl_records_carry_id_and_row(tmp_path, base_args):
    src = tmp_path / "in.csv"
    src.write_text('key,text\nk1,"hello, world"\nk2,"two\nlines"\n', encoding="utf-8")
    r = _run([str(src), "--template", "Say {{ text }}", "--id-column", "key", *base_args])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["id"], x["line"]) for x in recs] == [("k1", 1), ("k2", 2)]
    assert recs[0]["error"] is None and recs[0]["usage"]["prompt_tokens"] > 3


def test_bad_rows_become_error_rows_and_others_complete(tmp_path, base_args):
    src = tmp_path / "in.csv"
    src.write_text("id,text,n\na,one,1\nb,,2\nc,three,x\nd,four\ne,five,5\n", encoding="utf-8")
    out = str(tmp_path / "out.csv")
    r = _run([str(src), "--template", "{text} {n:>3}", "--id-column", "id", "-o", out, *base_args])
    assert r.exit_code == 1  # some rows failed
    from pyarrow import csv
    t = csv.read_csv(out).to_pylist()
    assert [row["id"] for row in t] == ["a", "b", "c", "in.csv:4", "e"]  # the bad row has no cells: its default id
    errors = {row["line"]: row["error"] for row in t if row["finish_reason"] == "error"}
    assert errors == {2: "in.csv row 2: column 'text' is null", 4: "in.csv row 4: expected 3 cells, got 2"}
    assert "row 2: column 'text' is null" in r.stderr
    assert all(row["text"] is not None for row in t if row["line"] in (1, 3, 5))


@pytest.mark.parametrize("args, message", [
    (["--template", "{txt}"], "--template placeholder 'txt': no such column (columns: id, question, task, variant)"),
    (["--prompt-column", "prompt"], "--prompt-column 'prompt': no such column"),
    (["--template", "{question}", "--id-column", "key"], "--id-column 'key': no such column"),
    ([], "no prompt: give --template, --prompt-column or --messages-column"),
    (["--template", "{question}", "--order", "finish", "-o", "x.parquet"], "written in input order"),
    (["--template", "{question}", "--format", "openai", "-o", "x.csv"], "a csv file, but --format openai"),
])
def test_option_errors_are_one_line_before_loading(tmp_path, args, message):
    src = str(tmp_path / "in.parquet")
    build(5, src)
    r = _run([src, *args, "--model", "/nonexistent/model"])  # the model is never loaded
    assert r.exit_code == 2
    assert message in r.stderr.replace("\n", "") and len(r.stderr.strip().splitlines()) == 1


def test_template_needs_a_table_input(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("hello\n")
    r = _run([str(src), "--template", "{text}", "--model", "/nonexistent"])
    assert r.exit_code == 2 and "apply to table inputs" in r.stderr


def test_resume_after_sigkill_completes_with_no_duplicates(tmp_path, base_args):
    src, out = str(tmp_path / "in.parquet"), tmp_path / "out.parquet"
    n = build(120, src, row_group_rows=50)
    args = [src, "--template", "{task}: {question}", "--id-column", "id", "-o", str(out), "--row-group-size", "12",
            "--max-num-seqs", "16", *base_args, "-n", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "cbgen.cli", "run", *args], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 4 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(pq.read_table(parts).column("id")) if parts.exists() else 0
    assert 48 <= done < n and not out.exists(), "killed mid-run"
    r = subprocess.run([sys.executable, "-m", "cbgen.cli", "run", *args, "--resume"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resume: {done} ids already in" in r.stderr
    t = pq.read_table(out)
    assert t.column("id").to_pylist() == pq.read_table(src).column("id").to_pylist()  # once each, in order
    assert t.column("line").to_pylist() == list(range(1, n + 1))
    assert not parts.exists()


def test_two_shards_into_one_output_keep_source_and_order(tmp_path, base_args):
    a, b, out = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), str(tmp_path / "out.parquet")
    build(3, a)
    build(4, b)
    r = _run([a, b, "--template", "{question}", "-o", out, *base_args])
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out)
    assert t.column("source").to_pylist() == ["a.parquet"] * 3 + ["b.parquet"] * 4   # base names, as in ids
    assert t.column("id").to_pylist() == ([f"a.parquet:{i}" for i in (1, 2, 3)]
                                          + [f"b.parquet:{i}" for i in (1, 2, 3, 4)])


def test_validate_checks_table_rows_without_generating(tmp_path, base_args):
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,fine\n2,""\n3,\n', encoding="utf-8")  # row 2: an empty string; row 3: a null cell
    r = _run([str(src), "--template", "Say {text}", "--validate", *base_args])
    assert r.exit_code == 1
    assert "invalid: in.csv row 3: column 'text' is null" in r.stderr and "validate: 2 valid, 1 invalid" in r.stderr


@pytest.mark.e2e
def test_embedded_model_answers_from_a_csv_template(tmp_path, embedded_model):
    src, out = tmp_path / "c.csv", str(tmp_path / "out.parquet")
    src.write_text("country,lang\nFrance,French\nJapan,Japanese\n", encoding="utf-8")
    r = _run([str(src), "--template", "What is the capital of {country}? Answer in one sentence.", "-o", out,
              "-n", "24", "--dtype", "float32", "-q"])
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out).to_pylist()
    assert [row["country"] for row in t] == ["France", "Japan"]
    assert "Paris" in t[0]["text"] and "Tokyo" in t[1]["text"]


def test_header_only_csv_gives_an_empty_table_with_the_schema(tmp_path, base_args):
    src, out = tmp_path / "hdr.csv", str(tmp_path / "out.parquet")
    src.write_text("text\n")
    r = _run([str(src), "--template", "{text}", "-o", out, *base_args])
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out)
    assert t.num_rows == 0 and {"input_text", "id", "text", "finish_reason", "error"} <= set(t.schema.names)
