"""`cbgen run` with constraints on the tiny model: per-line and default constraints,
error records for bad specs and for a missing `cbgen[structured]` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbgen.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "--no-progress"]


def _write(tmp_path, lines) -> str:
    p = tmp_path / "in.jsonl"
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(p)


def _records(text: str) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(line) for line in text.splitlines() if line.strip())}


def _run(args):
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


LINES = [
    {"id": "schema", "prompt": "Paris", "max_new_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "city", "schema": {
            "type": "object", "properties": {"kind": {"enum": ["city", "country"]}}, "required": ["kind"]}}}},
    {"id": "bad-schema", "prompt": "x", "response_format": {"type": "json_schema",
                                                             "json_schema": {"schema": {"type": "nope"}}}},
    {"id": "bad-regex", "prompt": "x", "regex": "[0-9"},
    {"id": "bad-grammar", "prompt": "x", "grammar": "start: undefined_rule"},
    {"id": "choice", "prompt": "Sea", "choice": ["calm", "rough"]},
    {"id": "free", "prompt": "The quick brown fox"},
]


def test_bad_specs_are_error_records_and_the_other_lines_complete(tmp_path, base_args):
    r = _run([_write(tmp_path, LINES), "-n", "8", *base_args])
    assert r.exit_code == 1, r.stderr
    recs = _records(r.stdout)
    assert set(recs) == {line["id"] for line in LINES}
    for rid, field, what in [("bad-schema", "response_format.json_schema.schema", "invalid JSON schema"),
                             ("bad-regex", "regex", "invalid regex"), ("bad-grammar", "grammar", "invalid grammar")]:
        e = recs[rid]
        assert e["finish_reason"] == "error" and e["text"] is None
        line_no = next(i for i, line in enumerate(LINES, 1) if line["id"] == rid)
        assert e["error"].startswith(f"in.jsonl line {line_no}: field '{field}': {what}: ") and "\n" not in e["error"]
        assert f"warning: in.jsonl line {line_no}: field '{field}'" in r.stderr
    s = recs["schema"]
    assert s["structured"]["type"] == "json_schema" and s["structured"]["name"] == "city"
    if s["structured"]["complete"]:
        assert s["parsed"]["kind"] in ("city", "country") and json.loads(s["text"]) == s["parsed"]
    else:
        assert s["parsed"] is None and s["finish_reason"] == "length"
    assert recs["choice"]["text"] in ("calm", "rough") and recs["choice"]["structured"]["complete"]
    assert recs["free"]["finish_reason"] in ("stop", "length") and "structured" not in recs["free"]


def test_cli_default_applies_to_lines_without_their_own(tmp_path, base_args):
    src = _write(tmp_path, ["plain text", {"id": "own", "prompt": "x", "regex": "[0-9]{3}"},
                            {"id": "off", "prompt": "x", "max_new_tokens": 3, "response_format": {"type": "text"}}])
    r = _run([src, "--choice", "red,green", *base_args])
    assert r.exit_code == 0, r.stderr
    recs = _records(r.stdout)
    assert recs["in.jsonl:1"]["text"] in ("red", "green") and recs["in.jsonl:1"]["structured"]["type"] == "choice"
    assert len(recs["own"]["text"]) == 3 and recs["own"]["text"].isdigit()
    assert "structured" not in recs["off"]


def test_a_bad_default_fails_once_before_the_run(tmp_path, base_args):
    r = _run([_write(tmp_path, ["hi"]), "--regex", "(", *base_args])
    assert r.exit_code == 2 and "option '--regex': invalid regex" in r.stderr and not r.stdout
    r = _run([_write(tmp_path, ["hi"]), "--json", "--choice", "a", *base_args])
    assert r.exit_code == 2 and "--json and --choice cannot be combined" in r.stderr


def test_length_cut_json_is_incomplete_with_a_summary_warning(tmp_path, base_args):
    src = _write(tmp_path, [{"id": "cut", "prompt": "x", "max_new_tokens": 2, "response_format": {"type": "json_object"}}])
    r = CliRunner().invoke(app, ["run", src, "--model", base_args[1], "--dtype", "float32", "--no-progress"])
    rec = _records(r.stdout)["cut"]
    assert rec["finish_reason"] == "length" and rec["parsed"] is None and rec["structured"]["complete"] is False
    assert "warning: 1 constrained output is incomplete" in r.stderr and ": cut" in r.stderr


def test_missing_extra_gives_error_records_naming_it(tmp_path, base_args):
    """llguidance blocked in a subprocess (as if `cbgen[structured]` were not installed)."""
    src = _write(tmp_path, [{"id": "c", "prompt": "x", "choice": ["a", "b"]}, {"id": "free", "prompt": "hello"}])
    code = ("import sys; sys.modules['llguidance'] = None; from cbgen.cli import app; "
            "sys.argv = ['cbgen', 'run', *sys.argv[1:]]; app()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, src, "-n", "4", *base_args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 1, p.stderr
    recs = _records(p.stdout)
    assert recs["c"]["finish_reason"] == "error" and "cbgen[structured]" in recs["c"]["error"]
    assert recs["c"]["error"].startswith("in.jsonl line 1: field 'choice': ")
    assert recs["free"]["finish_reason"] in ("stop", "length") and recs["free"]["text"]
