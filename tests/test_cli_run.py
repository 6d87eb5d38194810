"""`cbgen run` through Typer's CliRunner and real subprocesses, on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbgen.cli import app

REPO = Path(__file__).resolve().parents[1]
CBGEN = [sys.executable, "-m", "cbgen.cli"]


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "-q"]


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _run(args, input=None):
    # CliRunner keeps stderr apart so we can check nothing but records reach stdout.
    return CliRunner().invoke(app, ["run", *args], input=input, catch_exceptions=False)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def test_every_input_format(tmp_path, base_args):
    src = _write(tmp_path, "mixed.jsonl", [
        "Tell me a story about a fox",
        json.dumps({"id": "p1", "prompt": "Once upon a time", "max_new_tokens": 5}),
        json.dumps({"id": "m1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.8, "seed": 3}),
        json.dumps({"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}}),
    ])
    r = _run([src, "--max-new-tokens", "6", *base_args])
    assert r.exit_code == 0, r.stderr
    recs = {rec["id"]: rec for rec in _records(r.stdout)}
    assert set(recs) == {"mixed.jsonl:1", "p1", "m1", "o1"}
    assert recs["p1"]["usage"]["completion_tokens"] <= 5
    assert recs["o1"]["usage"]["completion_tokens"] <= 4
    assert recs["m1"]["params"]["temperature"] == 0.8 and recs["m1"]["params"]["seed"] == 3
    assert recs["mixed.jsonl:1"]["params"]["max_new_tokens"] == 6
    for rec in recs.values():
        assert rec["finish_reason"] in ("stop", "length") and rec["error"] is None
        assert set(rec["timings"]) >= {"queue_s", "ttft_s", "total_s", "tokens_per_s"}
        assert rec["usage"]["prompt_tokens"] > 0


def test_shipped_example_files_run(base_args):
    for name in ("chat.jsonl", "plain.txt", "prompts.jsonl", "openai-batch.jsonl"):
        r = _run([str(REPO / "prompts" / name), "--max-new-tokens", "4", *base_args])
        assert r.exit_code == 0, (name, r.stderr)
        assert _records(r.stdout), name


def test_openai_output_format(tmp_path, base_args):
    src = _write(tmp_path, "b.jsonl", [json.dumps({
        "custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}})])
    r = _run([src, "--format", "openai", *base_args])
    assert r.exit_code == 0, r.stderr
    (rec,) = _records(r.stdout)
    assert rec["custom_id"] == "req-1" and rec["error"] is None
    body = rec["response"]["body"]
    assert rec["response"]["status_code"] == 200
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 3


def test_text_mode_prints_only_text(tmp_path, base_args):
    src = _write(tmp_path, "t.txt", ["hello there"])
    r = _run([src, "--text", "--max-new-tokens", "3", *base_args])
    assert r.exit_code == 0
    assert not r.stdout.lstrip().startswith("{")


def test_bad_input_becomes_error_records_and_others_complete(tmp_path, base_args):
    long_prompt = "word " * 3000  # > the tiny model's 2048-token context
    src = _write(tmp_path, "bad.jsonl", [
        json.dumps({"id": "good1", "prompt": "hello", "max_new_tokens": 3}),
        '{"id": "broken", "prompt": "unterminated',                        # malformed JSON
        json.dumps({"id": "noprompt", "temperature": 0.5}),                 # missing prompt
        json.dumps({"id": "wrongtype", "prompt": 42}),                      # wrong type
        json.dumps({"id": "toolong", "prompt": long_prompt}),               # longer than the context
        json.dumps({"id": "badparam", "prompt": "x", "temperature": -1}),   # invalid parameter
        json.dumps({"id": "good2", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3}),
    ])
    r = _run([src, *base_args])
    assert r.exit_code == 1  # some lines failed
    recs = {rec["id"]: rec for rec in _records(r.stdout)}
    assert len(recs) == 7
    for rid in ("good1", "good2"):
        assert recs[rid]["finish_reason"] in ("stop", "length")
    errors = {rid: recs[rid]["error"] for rid in recs if recs[rid]["finish_reason"] == "error"}
    assert set(errors) == {"bad.jsonl:2", "noprompt", "wrongtype", "toolong", "badparam"}
    assert "line 2" in errors["bad.jsonl:2"] and "JSON" in errors["bad.jsonl:2"]
    assert "line 3" in errors["noprompt"] and "prompt" in errors["noprompt"]
    assert "line 4" in errors["wrongtype"] and "'prompt'" in errors["wrongtype"]
    assert "line 5" in errors["toolong"] and "context length" in errors["toolong"]
    assert "line 6" in errors["badparam"] and "temperature" in errors["badparam"]
    # One warning line per bad input on stderr.
    assert r.stderr.count("warning:") == 5


def test_quiet_prints_nothing_and_summary_counts_agree_in_number(tmp_path, base_args):
    src = _write(tmp_path, "one.jsonl", [json.dumps({"id": "a", "prompt": "hello", "max_new_tokens": 3}),
                                         json.dumps({"id": "b", "prompt": 42})])
    # --quiet: no load status (not even the int8 "quantizing" line), no summary, only the one warning.
    r = _run([src, *base_args, "--quantize", "int8"])
    assert r.exit_code == 1 and len(_records(r.stdout)) == 2
    assert r.stderr.count("\n") == 1 and "warning:" in r.stderr, r.stderr
    r = _run([src, *base_args[:-1], "--no-progress"])   # not quiet: the summary line
    summary = [ln for ln in r.stderr.splitlines() if ln.startswith("cbgen:")]
    assert summary and " 2 requests," in summary[0] and " 1 error" in summary[0] and "1 errors" not in summary[0]


def test_order_input_vs_finish(tmp_path, base_args):
    # The first input generates far more tokens than the others, so it finishes last.
    lines = [json.dumps({"id": "slow", "prompt": "a", "max_new_tokens": 120, "ignore_eos": True})]
    lines += [json.dumps({"id": f"fast{i}", "prompt": "b", "max_new_tokens": 2, "ignore_eos": True}) for i in range(4)]
    src = _write(tmp_path, "o.jsonl", lines)
    by_input = [rec["id"] for rec in _records(_run([src, "--order", "input", *base_args]).stdout)]
    by_finish = [rec["id"] for rec in _records(_run([src, "--order", "finish", *base_args]).stdout)]
    assert by_input == ["slow", "fast0", "fast1", "fast2", "fast3"]
    assert by_finish[-1] == "slow" and sorted(by_finish) == sorted(by_input)


def test_validate_reports_without_generating(tmp_path, base_args):
    src = _write(tmp_path, "v.jsonl", ['{"prompt": "ok"}', '{"prompt": 1}'])
    r = _run([src, "--validate", *base_args])
    assert r.exit_code == 1
    assert r.stdout == ""
    assert "1 valid, 1 invalid" in r.stderr and "line 2" in r.stderr


def test_missing_input_file_is_one_line_error(base_args):
    r = _run(["/nonexistent/x.jsonl", *base_args])
    assert r.exit_code == 2
    assert "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- real processes ---------------------------------------------------------

def test_a_small_step_budget_lowers_the_default_batch_and_bad_pools_fail_in_one_line(tmp_path, base_args):
    """--max-batched-tokens below the default --max-num-seqs (256) lowers the default batch
    instead of failing; an explicit --max-num-seqs above the budget and a non-finite
    --kv-cache-gb are one-line usage errors."""
    p = _write(tmp_path, "in.jsonl", ['{"prompt": "Hi", "max_tokens": 2}'])
    r = _run([str(p), *base_args, "--max-batched-tokens", "64"])
    assert r.exit_code == 0 and len(_records(r.stdout)) == 1
    r = _run([str(p), *base_args, "--max-batched-tokens", "64", "--max-num-seqs", "128"])
    # The message names the options typed, not the config fields behind them.
    assert r.exit_code == 2 and "--max-batched-tokens=64" in r.stderr and "--max-num-seqs (128)" in r.stderr
    for gb in ("inf", "nan", "0"):
        r = _run([str(p), *base_args, "--kv-cache-gb", gb])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--kv-cache-gb=" in r.stderr
    r = _run([str(p), *base_args, "--samples", "0"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --samples=0 is invalid: expected an integer in [1, 64]"


def _popen(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*CBGEN, "run", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO, **kw)


@pytest.mark.parametrize("args, expect", [
    (["run", "x.jsonl", "--max-batched-tokens", "abc"], "error: cbgen run: Invalid value for '--max-batched-tokens'"),
    (["chat", "--kv-cache-gb", "1"], "error: cbgen chat: No such option: --kv-cache-gb"),
    (["run", "x.jsonl", "--dry-runn"], "error: cbgen run: No such option: --dry-runn (Possible options: --dry-run)"),
])
def test_a_value_click_cannot_parse_is_one_line_too(args, expect):
    """The console script (cli.main) prints Click's usage errors as one line, not Typer's
    boxed panel, with Click's exit code 2."""
    r = subprocess.run([*CBGEN, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(expect) and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("extra, why", [
    (["--text", "--format", "openai"], "error: --text is --format text; not with --format openai"),
    (["--validate", "--dry-run"], "error: --validate and --dry-run: choose one"),
])
def test_options_that_contradict_each_other_are_refused(tmp_path, base_args, extra, why):
    src = _write(tmp_path, "in.jsonl", ['{"prompt": "Hi", "max_tokens": 2}'])
    r = _run([src, *base_args, *extra])
    assert r.exit_code == 2 and r.stderr.startswith(why) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_output_that_is_an_input_or_cannot_be_written_fails_before_the_model_loads(tmp_path, base_args):
    src = _write(tmp_path, "in.jsonl", ['{"prompt": "Hi", "max_tokens": 2}'] * 3)
    tpl = _write(tmp_path, "t.jinja", ["{{ messages[0]['content'] }}"])
    (tmp_path / "o.parquet.parts").write_text("not a directory")
    for out, extra, why in ((src, [], f"is read by this run ({src!r})"),
                            (tpl, ["--chat-template", tpl], f"is read by this run ({tpl!r})"),
                            (str(tmp_path / "nope" / "o.jsonl"), [], "no such directory"),
                            (str(tmp_path), [], "is a directory"),
                            (str(tmp_path / "o.parquet"), [], "o.parquet.parts' is a file")):
        r = _run([src, "-o", out, *extra, *base_args])
        assert r.exit_code == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(open(src).read().splitlines()) == 3 and len(open(tpl).read().splitlines()) == 1   # untouched
    with open(src, "rb") as stdin:   # stdin redirected from the output file
        p = subprocess.run([*CBGEN, "run", "-", "-o", src, *base_args], stdin=stdin, capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert p.returncode == 2 and "is read by this run (stdin)" in p.stderr, p.stderr
    assert len(open(src).read().splitlines()) == 3


def test_status_lines_stay_one_line_when_stderr_is_a_file(tmp_path, base_args):
    """Rich wraps at 80 columns off a terminal unless told not to; a log file gets each status
    whole (the resume line here is ~200 characters)."""
    src = _write(tmp_path, "in.jsonl", ['{"id": "a", "prompt": "Hi", "max_tokens": 2}'])
    out = tmp_path / ("results-of-a-long-descriptive-run-name-" * 4 + ".jsonl")
    for _ in range(2):
        p = _popen([src, "-o", str(out), "--resume", *base_args])
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    line = f"resume: 1 ids already in {out}, skipping them"
    assert len(line) > 160 and line in err.decode().splitlines()


def test_a_sequence_cut_short_by_the_whole_kv_cache_is_named_in_the_summary(tmp_path, tiny_model_dir):
    """A request alone that outgrows the whole pool ends "length" before its max_tokens;
    the summary says so and names the option to raise."""
    c = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 4
    gb = 64 * per_token / 2**30   # a pool of 64 tokens (4 blocks of 16) in float32
    src = _write(tmp_path, "in.jsonl", ['{"id": "a", "prompt": "a", "max_tokens": 200, "ignore_eos": true}'])
    r = _run([src, "--model", str(tiny_model_dir), "--dtype", "float32", "--kv-cache-gb", repr(gb)])
    assert r.exit_code == 0, r.stderr
    [rec] = _records(r.stdout)
    assert rec["finish_reason"] == "length" and rec["usage"]["completion_tokens"] <= 64
    assert '1 sequence cut short by the whole KV cache (finish_reason "length"; raise --kv-cache-gb)' in r.stderr


def test_stdin_lines_join_a_batch_that_is_already_decoding(base_args):
    p = _popen(["-", *base_args])
    # ~2 s of decoding on the tiny model (1 ms a token): it must still run when the late lines finish.
    slow = {"id": "slow", "prompt": "a", "max_new_tokens": 2000, "ignore_eos": True}
    p.stdin.write((json.dumps(slow) + "\n").encode())
    p.stdin.flush()
    time.sleep(1.0)  # the slow request is decoding by now (model load included, ~0.5 s)
    for i in range(3):
        p.stdin.write((json.dumps({"id": f"late{i}", "prompt": "b", "max_new_tokens": 3}) + "\n").encode())
        p.stdin.flush()
        time.sleep(0.2)
    # The late lines finish while stdin is still open and the slow one still runs.
    first = [json.loads(p.stdout.readline()) for _ in range(3)]
    assert p.poll() is None
    assert [r["id"] for r in first] == ["late0", "late1", "late2"]
    p.stdin.close()
    rest = _records(p.stdout.read().decode())
    p.wait(timeout=120)
    assert [r["id"] for r in rest] == ["slow"]
    assert rest[0]["usage"]["completion_tokens"] == 2000
    # Late lines were admitted at once, not after the slow one: short queue time.
    assert all(r["timings"]["queue_s"] < 1.0 for r in first)


def test_resume_after_sigkill_has_one_record_per_id(tmp_path, base_args):
    ids = [f"r{i}" for i in range(40)]
    src = _write(tmp_path, "in.jsonl", [json.dumps({"id": i, "prompt": "count", "max_new_tokens": 40,
                                                    "ignore_eos": True}) for i in ids])
    out = tmp_path / "out.jsonl"
    p = _popen([src, "-o", str(out), "--max-num-seqs", "4", *base_args])
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = out.read_text()
    assert 5 <= partial.count("\n") < 40, "killed mid-run"
    with open(out, "a") as f:  # what a write cut by the kill looks like
        f.write('{"id": "r39", "line": 40, "te')
    r = subprocess.run([*CBGEN, "run", src, "-o", str(out), "--resume", *base_args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = _records(out.read_text())
    got = [rec["id"] for rec in recs]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


def test_closed_stdout_ends_quietly(tmp_path, base_args):
    src = _write(tmp_path, "h.jsonl", [json.dumps({"prompt": "x", "max_new_tokens": 30}) for _ in range(30)])
    cmd = f"{sys.executable} -m cbgen.cli run {src} {' '.join(base_args)} --max-num-seqs 2 | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_first_ctrl_c_finishes_running_second_aborts(tmp_path, base_args):
    lines = [json.dumps({"id": "quick", "prompt": "x", "max_new_tokens": 1})]
    lines += [json.dumps({"id": f"c{i}", "prompt": "x", "max_new_tokens": 3000, "ignore_eos": True})
              for i in range(6)]
    src = _write(tmp_path, "c.jsonl", lines)
    p = _popen([src, "--max-num-seqs", "3", "--order", "finish", *base_args[:-1]])  # not quiet: we read stderr
    first = json.loads(p.stdout.readline())   # generation is under way
    assert first["id"] == "quick"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    recs = _records(out.decode())
    err = err.decode()
    assert "stopping" in err and "aborting" in err, err
    assert "Traceback" not in err
    assert p.returncode == 130, "an interrupted job exits 130, so a script can tell it is incomplete"
    # The running ones are written with their partial text; the queued ones, never
    # started, get no record (so --resume does them) and stderr says so.
    assert [r["finish_reason"] for r in recs] == ["abort"] * 3
    assert all(0 < r["usage"]["completion_tokens"] < 3000 for r in recs)
    assert "3 inputs never started" in err
