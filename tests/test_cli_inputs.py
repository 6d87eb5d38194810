"""`cbgen run` on awkward input bytes and ids, and `--resume` after aborts, on the tiny model.

Each shared case of issue #15 (cases/utf16-with-bom.jsonl, cases/implicit-id-collision.jsonl)
is here with its own input, together with others of its kind.
"""

from __future__ import annotations

import codecs
import json
import signal
import subprocess
import time

import pytest
from typer.testing import CliRunner

from cbgen.cli import app
from test_cli_run import CBGEN, REPO, _popen, _records


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "-q", "--max-new-tokens", "4"]


def _run(args, input=None):
    return CliRunner().invoke(app, ["run", *args], input=input, catch_exceptions=False)


def _batch_line(cid: str, content: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 4}},
                      ensure_ascii=False)


@pytest.mark.parametrize("bom, codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
                                        (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF8, "utf-8")])
def test_a_file_with_a_bom_is_decoded_and_answered_by_its_ids(tmp_path, base_args, bom, codec):
    # Windows PowerShell `>` writes UTF-16 LE with a BOM and CRLF.
    lines = [_batch_line("u1", "Grüße"), _batch_line("u2", "Name a colour."), _batch_line("u3", "日本語")]
    f = tmp_path / "ps.jsonl"
    f.write_bytes(bom + "".join(line + "\r\n" for line in lines).encode(codec))
    r = _run([str(f), *base_args])
    assert r.exit_code == 0, r.stderr
    recs = _records(r.stdout)
    assert [rec["id"] for rec in recs] == ["u1", "u2", "u3"]
    assert all(rec["error"] is None and rec["usage"]["prompt_tokens"] > 0 for rec in recs)


def test_utf16_on_stdin_and_a_bom_mid_file_after_cat(tmp_path, base_args):
    one = codecs.BOM_UTF8 + (_batch_line("c1", "hi") + "\n").encode()
    two = codecs.BOM_UTF8 + ("\u200b" + _batch_line("c2", "yo") + "\n\u00a0" + _batch_line("c3", "ok") + "\n").encode()
    r = _run(["-", *base_args], input=one + two)  # `cat one two | cbgen run -`
    assert r.exit_code == 0, r.stderr
    assert sorted(rec["id"] for rec in _records(r.stdout)) == ["c1", "c2", "c3"]
    r = _run(["-", *base_args], input=codecs.BOM_UTF16_BE + (_batch_line("s1", "hi") + "\n").encode("utf-16-be"))
    assert r.exit_code == 0, r.stderr
    assert [rec["id"] for rec in _records(r.stdout)] == ["s1"]


def test_default_ids_never_collide_with_explicit_ones(tmp_path, base_args):
    f = tmp_path / "ids.jsonl"
    f.write_text('{"id": "3", "prompt": "Hello"}\n{"prompt": "Hi"}\nTell me a joke.\n{"id": 2, "prompt": "x"}\n')
    r = _run([str(f), *base_args])
    assert r.exit_code == 0, r.stderr
    recs = _records(r.stdout)
    assert [rec["id"] for rec in recs] == ["3", "ids.jsonl:2", "ids.jsonl:3", "2"]
    assert all(rec["finish_reason"] in ("stop", "length") for rec in recs)


def test_an_explicit_id_naming_another_line_and_duplicates_are_error_records(tmp_path, base_args):
    f = tmp_path / "ids.jsonl"
    f.write_text('{"prompt": "a"}\n{"id": "ids.jsonl:1", "prompt": "b"}\n{"id": "k", "prompt": "c"}\n'
                 '{"custom_id": "k", "body": {"messages": [{"role": "user", "content": "d"}]}}\n')
    r = _run([str(f), *base_args])
    assert r.exit_code == 1
    recs = {rec["id"]: rec for rec in _records(r.stdout)}
    assert set(recs) == {"ids.jsonl:1", "ids.jsonl:2", "k", "ids.jsonl:4"}
    assert recs["ids.jsonl:1"]["finish_reason"] != "error" and recs["k"]["finish_reason"] != "error"
    assert "is the default id of ids.jsonl line 1" in recs["ids.jsonl:2"]["error"]
    assert recs["ids.jsonl:4"]["error"] == "ids.jsonl line 4: field 'id': duplicate id \"k\" (first on ids.jsonl line 3)"


def test_invalid_utf8_is_an_error_record_naming_line_and_offset(tmp_path, base_args):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello\nbad \xff byte\nbye\n")
    r = _run([str(f), *base_args])
    assert r.exit_code == 1
    recs = {rec["id"]: rec for rec in _records(r.stdout)}
    assert recs["bad.txt:2"]["error"] == "bad.txt line 2: invalid UTF-8: byte 0xff at offset 4 in the line (10 in the file)"
    assert recs["bad.txt:1"]["error"] is None and recs["bad.txt:3"]["error"] is None


def test_a_binary_input_is_refused_with_one_error(tmp_path, base_args):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8)
    r = _run([str(f), *base_args])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {f} looks binary (a NUL byte at offset 5); refusing to read "
                                             "it: expected text, JSONL or one prompt per line"]
    r = _run(["-", *base_args], input=f.read_bytes())  # from stdin: one error record, nothing generated
    assert r.exit_code == 1
    (rec,) = _records(r.stdout)
    assert rec["finish_reason"] == "error" and "stdin looks binary" in rec["error"]


def _rec(rid, reason, text):
    return json.dumps({"id": rid, "line": 0, "text": text, "finish_reason": reason}) + "\n"


def test_resume_reruns_aborted_records_and_leaves_one_per_id(tmp_path, base_args):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": "count"}) + "\n" for i in "abcd"))
    out = tmp_path / "out.jsonl"
    out.write_text(_rec("a", "stop", "kept") + _rec("b", "abort", "partial b") + _rec("c", "abort", "partial c")
                   + '{"id": "d", "te')
    r = _run([str(src), "-o", str(out), "--resume", *base_args])
    assert r.exit_code == 0, r.stderr
    recs = _records(out.read_text())
    assert sorted(rec["id"] for rec in recs) == ["a", "b", "c", "d"]
    assert all(rec["finish_reason"] in ("stop", "length") for rec in recs)
    assert recs[0] == json.loads(_rec("a", "stop", "kept"))  # done records are not touched
    assert "2 superseded" in r.stderr


def test_second_ctrl_c_then_resume_loses_nothing_and_leaves_one_final_record_per_id(tmp_path, base_args):
    # Lines without max_new_tokens: the first run takes 3000 from the command line (still running at the
    # Ctrl-C), the resumed one 5 (so it ends quickly on a loaded CI machine).
    lines = [{"id": "quick", "prompt": "x", "max_new_tokens": 1}, {"id": "multi", "prompt": "x", "n": 3},
             {"id": "l1", "prompt": "y"}, {"id": "l2", "prompt": "z"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({**line, "ignore_eos": True}) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    args = [str(src), "-o", str(out), "--order", "finish", *base_args[:5]]
    p = _popen([*args, "--max-num-seqs", "2", "--max-new-tokens", "3000"])
    deadline = time.time() + 60
    while time.time() < deadline and '"quick"' not in (out.read_text() if out.exists() else ""):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    first = {rec["id"]: rec for rec in _records(out.read_text())}
    # "multi" had samples running and at least one never started: its partial record is written.
    # Whether "l1" got quick's freed slot before the Ctrl-C depends on the machine's speed:
    # if it started, it has a partial record too; what never started has none.
    assert {"quick", "multi"} <= set(first) <= {"quick", "multi", "l1"}, err.decode()
    assert first["multi"]["finish_reason"] == "abort" and len(first["multi"]["choices"]) == 3
    assert 0 < first["multi"]["usage"]["completion_tokens"] < 3 * 3000
    assert all(first[i]["finish_reason"] == "abort" for i in set(first) - {"quick"})
    assert f"{4 - len(first)} inputs never started" in err.decode()
    assert p.returncode == 130
    r = subprocess.run([*CBGEN, "run", *args, "--resume", "--max-num-seqs", "5", "--max-new-tokens", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = _records(out.read_text())
    assert sorted(rec["id"] for rec in recs) == ["l1", "l2", "multi", "quick"]
    assert all(rec["finish_reason"] != "abort" for rec in recs)
    assert next(rec for rec in recs if rec["id"] == "multi")["usage"]["completion_tokens"] == 3 * 5
    assert f"rewritten with one record per id ({len(first) - 1} superseded" in r.stderr


def test_resume_into_a_text_output_is_one_clear_error(tmp_path, base_args):
    src = tmp_path / "in.txt"
    src.write_text("hi\n")
    out = tmp_path / "out.txt"
    out.write_text("some generated text\n\n")
    r = _run([str(src), "-o", str(out), "--resume", *base_args])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {out} line 1: not a cbgen or OpenAI output record (no 'id' / "
                                             "'custom_id'); refusing to resume into it"]
    assert out.read_text() == "some generated text\n\n"
