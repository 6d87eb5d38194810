"""`cbgen chat` with stdin a file or a pipe (not a terminal), on the tiny model: real processes,
and Typer's CliRunner where no process is needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbgen.cli import app

REPO = Path(__file__).resolve().parents[1]
CHAT = [sys.executable, "-m", "cbgen.cli", "chat"]


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32"]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def test_stdin_a_file_answers_every_line_and_logs_records(tmp_path, base_args):
    # The chat-from-pipe case with our own input: `cbgen chat --max-new-tokens 8 < file`.
    src, log = tmp_path / "prompts.txt", tmp_path / "log.jsonl"
    src.write_bytes(b"Say hello.\n\nSay goodbye.\n")
    with open(src, "rb") as stdin:
        r = subprocess.run([*CHAT, "--max-new-tokens", "8", "--json-log", str(log), *base_args], stdin=stdin,
                           capture_output=True, cwd=REPO, env=_env(), timeout=120)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert "not a terminal" not in err and "Traceback" not in err
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((x["id"], x["line"]) for x in recs) == [("1", 1), ("2", 3)]
    by_id = {x["id"]: x for x in recs}
    # stdout is only the two answers, in input order, each whole under its header.
    expected = "".join(f"── #{i} · {by_id[i]['finish_reason']} · {by_id[i]['usage']['completion_tokens']} tokens "
                       f"── {prompt}\n{by_id[i]['text'].rstrip() or '(no text)'}\n\n"
                       for i, prompt in (("1", "Say hello."), ("2", "Say goodbye.")))
    assert out == expected
    assert all(x["usage"]["completion_tokens"] <= 8 and x["messages"][-1]["role"] == "user" for x in recs)


def test_stdin_closed_at_once_exits_0_quietly(base_args):
    # In-process (CliRunner's stdin is not a terminal either): the same CLI path, no process start.
    r = CliRunner().invoke(app, ["chat", *base_args], input="", catch_exceptions=False)
    assert r.exit_code == 0 and r.stdout == ""


def test_json_log_that_cannot_be_opened_fails_before_loading(tmp_path):
    r = CliRunner().invoke(app, ["chat", "--json-log", str(tmp_path / "no-dir" / "log.jsonl")], input="")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --json-log ") and "No such file or directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pipe_answers_while_open_and_ctrl_c_twice_prints_partial_answers(base_args):
    p = subprocess.Popen([*CHAT, *base_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=REPO, env=_env())
    p.stdin.write(b"/set max_tokens 3\nquick\n")
    p.stdin.flush()
    # Answered while stdin is still open: lines are read as they come, not at EOF.
    assert p.stdout.readline().decode().startswith("── #1 · ")
    p.stdin.write(b"/set max_tokens 1500\n/set ignore_eos on\nlong\n")
    p.stdin.flush()
    while not p.stdout.readline().strip() == b"":   # the rest of #1's answer, up to its blank line
        pass
    # The reply to line 4 means "long" (line 5) is read next, at once. Other status lines
    # (a missing C compiler's notice) may come first.
    _stderr_until(p, "line 4: ignore_eos=True for new prompts")
    p.send_signal(signal.SIGINT)   # stop reading; #2 keeps running
    _stderr_until(p, "stopping: no more input read; finishing 1 running")
    p.send_signal(signal.SIGINT)   # cancel it: its partial answer is printed
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    head = out.decode().splitlines()[0]
    assert head.startswith("── #2 · abort · ") and head.endswith(" ── long")
    assert 0 < int(head.split(" · ")[2].split()[0]) < 1500
    assert "cancelling: printing partial answers" in err.decode() and b"Traceback" not in err


def _stderr_until(p: subprocess.Popen, prefix: str) -> None:
    """Read ``p``'s stderr up to a line starting with ``prefix`` (EOF first fails the test)."""
    seen = []
    while not (line := p.stderr.readline().decode()).startswith(prefix):
        assert line, f"stderr ended without {prefix!r}: {seen}"
        seen.append(line)


def test_closed_stdout_ends_quietly(base_args):
    cmd = (f"printf 'a\\nb\\nc\\nd\\n' | {sys.executable} -m cbgen.cli chat {' '.join(base_args)} "
           "--max-new-tokens 30 --max-num-seqs 2 | head -1")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("── #1 · ") and len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
