"""`cbgen chat`: ChatSession logic on the tiny model, the real prompt-toolkit app
driven through a pipe input (``create_pipe_input`` + ``DummyOutput``), piped input
(``PipedChat`` on byte streams) and ``--json-log``. Real processes: test_cli_chat.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from cbgen.cli import app as cli_app
from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.frontends.chat import ChatApp
from cbgen.frontends.chat_commands import handle
from cbgen.frontends.chat_log import JsonLog
from cbgen.frontends.chat_pipe import PipedChat
from cbgen.frontends.chat_session import ChatSession
from cbgen.frontends.chat_view import live_view, render_answer
from cbgen.frontends.driver import Driver
from cbgen.frontends.prompting import encode

# ignore_eos: the tiny model is random, so only max_new_tokens ends an answer predictably.
FIXED = SamplingParams(max_new_tokens=24, ignore_eos=True)


class Watched(Engine):
    """Records the most sequences the engine ever had running after a step."""
    max_running = 0

    def step(self):
        out = super().step()
        self.max_running = max(self.max_running, len(self.scheduler.running))
        return out


@pytest.fixture
def engine(tiny_loaded):
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=256)
    return Watched(tiny_loaded.model, tiny_loaded.tokenizer, cfg, max_model_len=tiny_loaded.max_model_len,
                   eos_token_ids=(tiny_loaded.tokenizer.eos_token_id,))


@pytest.fixture
def chat(engine, tiny_loaded):
    """A started session; ``chat.echoed`` collects the answers as the app prints them (plain text)."""
    with Driver(engine) as driver:
        s = ChatSession(driver, tiny_loaded.tokenizer, FIXED, model_name="tiny")
        s.echoed = []
        s.finished.append(lambda seq: s.echoed.append("".join(t for _, t in render_answer(seq)))
                          if seq.state == "done" else None)
        yield s
        s.close()


def pump(s: ChatSession, until, timeout: float = 120.0) -> None:
    """Feed Driver events to the session (as the front-ends do) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        s.poll(timeout=0.05)


def all_done(s: ChatSession):
    return lambda: not s.running()


# ---- ChatSession -------------------------------------------------------------------
def test_three_prompts_run_in_one_batch(chat, engine):
    for p in ("one", "two", "three"):
        assert handle(chat, p) == ""
    pump(chat, all_done(chat))
    outs = [chat.seqs[n].output for n in (1, 2, 3)]
    assert all(o.finish_reason.value == "length" and len(o.token_ids) == 24 for o in outs)
    assert engine.max_running >= 3
    # Every one started before any finished: they shared the batch.
    assert max(o.metrics.first_scheduled_time for o in outs) < min(o.metrics.finished_time for o in outs)
    assert sorted(e.split(" · ")[0] for e in chat.echoed) == ["── #1", "── #2", "── #3"]


def test_live_view_has_one_line_per_running_sequence(chat):
    chat.defaults = FIXED.replace(max_new_tokens=1500)
    for p in ("one", "two", "three"):
        handle(chat, p)
    pump(chat, lambda: all(chat.seqs[n].num_tokens >= 3 for n in (1, 2, 3)))
    warm = time.monotonic() + 0.25
    pump(chat, lambda: time.monotonic() > warm)   # past the per-sequence tok/s warm-up
    lines = "".join(t for _, t in live_view(chat, 100, 40)).split("\n")
    assert lines[0].startswith("3 running · ") and len(lines) == 4
    for n, line in zip((1, 2, 3), lines[1:]):
        assert line.startswith(f"#{n:<4}decode") and "/1500" in line and len(line) <= 99
        assert line.split()[3].replace(".", "").isdigit()                  # tok/s
        assert " ".join(chat.seqs[n].text.split())[-10:] in line           # the latest words
    handle(chat, "/cancel 3")
    assert "cancelling" in "".join(t for _, t in live_view(chat, 100, 40)).split("\n")[3]
    handle(chat, "/cancel all")
    pump(chat, all_done(chat))
    assert "".join(t for _, t in live_view(chat, 100, 40)).startswith("idle")


def test_cancel_2_stops_only_2(chat):
    chat.defaults = FIXED.replace(max_new_tokens=80)
    for p in ("one", "two", "three"):
        handle(chat, p)
    pump(chat, lambda: chat.seqs[2].num_tokens >= 2)
    assert handle(chat, "/cancel 2") == "cancelling #2"
    pump(chat, all_done(chat))
    reasons = {n: chat.seqs[n].finish_reason for n in (1, 2, 3)}
    assert reasons == {1: "length", 2: "abort", 3: "length"}
    assert 2 <= chat.seqs[2].num_tokens < 80 and chat.seqs[2].text  # its partial answer is kept
    assert handle(chat, "/cancel 2") == "#2 is not running (done)"
    assert handle(chat, "/cancel 9").startswith("no sequence 9")


def test_set_deterministic_switches_the_engine_between_steps(chat, engine):
    """/set deterministic on|off (EngineConfig.deterministic): an answer is then the same bits
    alone and beside others (tests/test_deterministic.py checks every other way in depth)."""
    assert handle(chat, "/set deterministic") == "deterministic=off"
    assert handle(chat, "/set deterministic maybe") == "deterministic: 'maybe' is not on or off"
    assert handle(chat, "/set deterministic on").startswith("deterministic on:")
    assert engine.config.deterministic and engine.runner.row_tile is not None
    assert handle(chat, "/set deterministic") == "deterministic=on"
    handle(chat, "/set temperature 0")
    handle(chat, "Tell me a story about the sea")
    pump(chat, all_done(chat))
    for p in ("one two three", "Tell me a story about the sea", "four five six seven"):
        handle(chat, p)
    pump(chat, all_done(chat))
    assert chat.seqs[1].text == chat.seqs[3].text and chat.seqs[1].num_tokens == 24
    assert handle(chat, "/set deterministic off").startswith("deterministic off")
    assert not engine.config.deterministic and engine.runner.row_tile is None


def test_set_deterministic_is_refused_where_it_cannot_hold(chat, engine, monkeypatch):
    monkeypatch.setattr(engine.runner, "kernel", None)
    assert handle(chat, "/set deterministic on").startswith(
        "deterministic cannot be switched on: deterministic needs the native attention kernel")
    assert not engine.config.deterministic


def test_set_validates_through_sampling_params(chat):
    assert handle(chat, "/set temperature -1") == \
        "temperature=-1.0 is invalid: expected a number in [0, 100] (0 = greedy)"
    assert chat.defaults.temperature == 0.0
    assert handle(chat, "/set temperature abc") == "temperature: 'abc' is not a number"
    assert handle(chat, "/set temprature 1") == "unknown setting 'temprature' (did you mean 'temperature'?); " \
                                               "/set lists them"
    assert handle(chat, "/set n 2").startswith("n cannot be set")
    assert handle(chat, "/set logprobs 2").startswith("logprobs cannot be set: chat does not show logprobs")
    assert handle(chat, "/set temperature 0.5") == "temperature=0.5 for new prompts"
    assert handle(chat, "/set max_tokens 7") == "max_new_tokens=7 for new prompts"
    assert handle(chat, '/set stop "a b" c') == "stop=['a b', 'c'] for new prompts"
    assert handle(chat, "/set seed none") == "seed=None for new prompts"
    assert handle(chat, "/set ignore_eos maybe") == "ignore_eos: 'maybe' is not true or false"
    assert chat.defaults == FIXED.replace(temperature=0.5, max_new_tokens=7, stop=("a b", "c"))
    handle(chat, "hi")
    assert chat.seqs[1].params.temperature == 0.5   # new prompts take the new defaults


def test_save_writes_run_records(chat, tmp_path, tiny_model_dir):
    chat.defaults = FIXED.replace(max_new_tokens=5)
    for p in ("one", "two", "three"):
        handle(chat, p)
    pump(chat, all_done(chat))
    path = tmp_path / "session.jsonl"
    assert handle(chat, f"/save {path}") == f"saved 3 records to {path}"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["1", "2", "3"]
    assert [r["text"] for r in recs] == [chat.seqs[n].text for n in (1, 2, 3)]
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5 for r in recs)
    # The prompts travel with their answers.
    assert [r["messages"][-1]["content"] for r in recs] == ["one", "two", "three"]
    # The keys of a `cbgen run` record, plus the input messages.
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    run = CliRunner().invoke(cli_app, ["run", str(src), "-n", "3", "-q", "--model", str(tiny_model_dir)])
    assert run.exit_code == 0, run.stderr
    assert all(set(r) == set(json.loads(run.stdout)) | {"messages"} for r in recs)
    assert handle(chat, "/save /nonexistent-dir/x.jsonl").startswith("cannot save to /nonexistent-dir/x.jsonl")


def test_show_and_list(chat):
    chat.defaults = FIXED.replace(max_new_tokens=6)
    handle(chat, "tell me about the fox")
    handle(chat, "and the dog")
    pump(chat, all_done(chat))
    shown = handle(chat, "/show 1")
    assert shown.startswith("#1 · done length · 6/6 tokens\n> tell me about the fox\n")
    assert shown.endswith(chat.seqs[1].text)
    assert handle(chat, "/show #2").startswith("#2 · done length")
    assert handle(chat, "/show 3") == "no sequence 3: expected one of #1..#2"
    rows = handle(chat, "/list").splitlines()
    assert len(rows) == 2 and rows[0].startswith("#1   done length") and "tell me about the fox" in rows[0]


def test_thread_builds_a_multi_turn_prompt(chat):
    chat.defaults = FIXED.replace(max_new_tokens=4)
    handle(chat, "/system Be brief.")
    handle(chat, "first question")
    assert handle(chat, "/thread 1").startswith("thread #1: next prompts continue its conversation (they start")
    assert handle(chat, "second question") == "#2 will start when #1 finishes"   # #1 still answering
    assert chat.seqs[2].state == "held"
    pump(chat, all_done(chat))
    one, two = chat.seqs[1], chat.seqs[2]
    assert two.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": one.text}, {"role": "user", "content": "second question"}]
    assert two.output.metrics.num_prompt_tokens == len(encode(chat.tokenizer, messages=two.messages))
    handle(chat, "third")                      # the thread follows its newest turn
    assert chat.seqs[3].parent == 2 and len(chat.seqs[3].messages) == 6
    assert handle(chat, "/thread off").startswith("thread off")
    handle(chat, "fresh")
    assert chat.seqs[4].parent is None and len(chat.seqs[4].messages) == 2
    pump(chat, all_done(chat))


def test_interrupt_cancels_the_focus_and_quit_asks_first(chat):
    chat.defaults = FIXED.replace(max_new_tokens=200)
    handle(chat, "a")
    handle(chat, "b")
    assert chat.interrupt() == "cancelling #2"          # the most recent running one
    assert handle(chat, "/quit").startswith("1 sequence still running")
    assert not chat.exit_requested
    handle(chat, "/list")                                # anything in between disarms the confirmation
    assert handle(chat, "/quit").startswith("1 sequence still running")
    assert handle(chat, "/quit") == "" and chat.exit_requested
    pump(chat, lambda: chat.seqs[2].state == "done")
    assert chat.seqs[2].finish_reason == "abort"


def test_unknown_commands_and_escaped_slash(chat):
    assert handle(chat, "/lsit") == "unknown command /lsit (did you mean /list?); /help lists them"
    assert "/thread N" in handle(chat, "/help")
    chat.defaults = FIXED.replace(max_new_tokens=2)
    handle(chat, "//etc/passwd is a path")
    assert chat.seqs[1].prompt == "/etc/passwd is a path"
    pump(chat, all_done(chat))
    assert "KV cache" in handle(chat, "/stats")


# ---- the real prompt-toolkit app ------------------------------------------------------
def drive(chat: ChatSession, script, timeout: float = 120.0, refresh: float | None = 0.05) -> tuple[int, list[str]]:
    """Run ChatApp on a pipe input; ``script(inp, wait, app, printed)`` types keys while it
    runs. Returns (exit code, what was printed above the prompt). A hang fails the test."""
    printed: list[str] = []

    async def main() -> int:
        with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
            app = ChatApp(chat, printer=lambda frags: printed.append("".join(t for _, t in frags)),
                          refresh_interval=refresh)
            task = asyncio.create_task(app.run())

            async def wait(cond, limit: float = 60.0) -> None:
                deadline = time.monotonic() + limit
                while not cond():
                    assert not task.done(), "the app exited early"
                    assert time.monotonic() < deadline, "timed out"
                    await asyncio.sleep(0.02)

            await script(inp, wait, app, printed)
            return await asyncio.wait_for(task, timeout)

    return asyncio.run(asyncio.wait_for(main(), timeout)), printed


def test_app_three_prompts_share_the_batch_and_print_answers(chat, engine):
    async def script(inp, wait, app, printed):
        inp.send_text("one\rtwo\rthree\r")
        await wait(lambda: len(chat.seqs) == 3)
        await wait(lambda: app.toolbar() and "running" in "".join(t for _, t in app.toolbar()))
        await wait(lambda: not chat.running())
        inp.send_text("/quit\r")

    code, printed = drive(chat, script)
    assert code == 0 and chat.exit_requested
    assert engine.max_running >= 3
    answers = [p for p in printed if p.startswith("── #")]
    assert sorted(a[:5] for a in answers) == ["── #1", "── #2", "── #3"]
    assert all(chat.seqs[n].text.rstrip() in "".join(answers) for n in (1, 2, 3))


def test_app_redraws_when_sequences_come_and_go_not_per_token(chat):
    # A redraw per batch of events took CPU from the engine (benchmarks/chat_concurrency.py);
    # with the timer refresh off, a whole answer must cost a redraw or two, not one per poll.
    chat.defaults = FIXED.replace(max_new_tokens=1500)
    busy: list[bool] = []
    poll = chat.poll
    chat.poll = lambda timeout=0.0: busy.append(poll(timeout)) or busy[-1]

    async def script(inp, wait, app, printed):
        inp.send_text("long one\r")
        await wait(lambda: chat.seqs.get(1) is not None and chat.seqs[1].num_tokens > 0)
        renders, polled = app.prompt.app.render_counter, len(busy)
        await wait(lambda: not chat.running())
        await asyncio.sleep(0.2)   # the pump's next rounds
        with_events = sum(busy[polled:])
        assert with_events >= 10, f"decoding took only {with_events} polls: the test shows nothing"
        assert app.prompt.app.render_counter - renders <= 2, (app.prompt.app.render_counter - renders, with_events)
        inp.send_text("/quit\r")

    code, _ = drive(chat, script, refresh=None)
    assert code == 0


def test_app_ctrl_d_with_running_sequences_asks_first(chat):
    chat.defaults = FIXED.replace(max_new_tokens=2000)

    async def script(inp, wait, app, printed):
        inp.send_text("long one\r")
        await wait(lambda: chat.seqs.get(1) is not None and chat.seqs[1].num_tokens > 0)
        inp.send_text("\x04")   # Ctrl-D: asks
        await wait(lambda: any("still running" in p for p in printed))
        assert not chat.exit_requested and chat.seqs[1].running
        inp.send_text("\x04")   # Ctrl-D again: confirms

    code, printed = drive(chat, script)
    assert code == 0 and chat.exit_requested
    assert any("1 sequence still running: Ctrl-D or /quit again" in p for p in printed)


def test_app_ctrl_c_clears_the_line_then_cancels(chat):
    chat.defaults = FIXED.replace(max_new_tokens=2000)

    async def script(inp, wait, app, printed):
        inp.send_text("running\r")
        await wait(lambda: chat.seqs.get(1) is not None and chat.seqs[1].num_tokens > 0)
        inp.send_text("half-typed")
        await wait(lambda: app.prompt.default_buffer.text == "half-typed")
        inp.send_text("\x03")   # Ctrl-C with text: clears the line only
        await wait(lambda: app.prompt.default_buffer.text == "")
        assert chat.seqs[1].running
        inp.send_text("\x03")   # Ctrl-C on an empty line: cancels #1, the session goes on
        await wait(lambda: chat.seqs[1].state == "done")
        inp.send_text("multi\x1b\rline\r")   # Esc+Enter inserts a newline
        await wait(lambda: 2 in chat.seqs)
        inp.send_text("/cancel all\r/quit\r")

    code, printed = drive(chat, script)
    assert code == 0
    assert chat.seqs[1].finish_reason == "abort" and chat.seqs[2].prompt == "multi\nline"
    assert "cancelling #1" in printed


def test_app_exits_1_when_the_engine_fails(chat, engine):
    def boom():
        raise RuntimeError("kaput")
    engine.step = boom

    async def script(inp, wait, app, printed):
        inp.send_text("hi\r")

    code, printed = drive(chat, script)
    assert code == 1 and printed[-1] == "error: the engine failed: RuntimeError('kaput')"


def test_app_finishes_running_sequences_when_the_input_closes(chat):
    async def script(inp, wait, app, printed):
        inp.send_text("hello\rworld\r")
        await wait(lambda: len(chat.seqs) == 2)
        inp.close()   # like `printf ... | cbgen chat` reaching EOF

    code, printed = drive(chat, script)
    assert code == 0
    assert [chat.seqs[n].finish_reason for n in (1, 2)] == ["length", "length"]
    assert sum(p.startswith("── #") for p in printed) == 2


def test_app_json_log_has_each_record_as_soon_as_it_finishes(chat, tmp_path):
    path = tmp_path / "log.jsonl"
    chat.finished.append(JsonLog(str(path), "tiny"))
    chat.defaults = FIXED.replace(max_new_tokens=4)

    async def script(inp, wait, app, printed):
        inp.send_text("quick\r")
        await wait(lambda: 1 in chat.seqs and chat.seqs[1].state == "done")
        logged = [json.loads(line) for line in path.read_text().splitlines()]   # flushed, not at exit
        assert [(r["id"], r["text"]) for r in logged] == [("1", chat.seqs[1].text)]
        inp.send_text("/set max_tokens 6\rsecond\r")
        await wait(lambda: 2 in chat.seqs and chat.seqs[2].state == "done")
        inp.send_text("/quit\r")

    code, _ = drive(chat, script)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert code == 0 and [r["id"] for r in recs] == ["1", "2"]
    assert [r["usage"]["completion_tokens"] for r in recs] == [4, 6]
    assert recs[1]["messages"] == [{"role": "user", "content": "second"}] and recs[1]["params"]["max_new_tokens"] == 6


# ---- piped input (stdin not a terminal) ------------------------------------------------
def piped(chat: ChatSession, data: bytes) -> tuple[int, str, str]:
    """PipedChat over ``data`` as stdin; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = PipedChat(chat, stdin=io.BytesIO(data), out=out, err=err, banner=False).run()
    return code, out.getvalue(), err.getvalue()


def heads(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("── #")]


def test_piped_answers_print_whole_in_input_order_from_one_batch(chat):
    code, out, err = piped(chat, b"/set max_tokens 40\nslow one\r\n\n   \n/set max_tokens 3\nquick two\nquick three\n")
    assert code == 0
    assert err == "line 1: max_new_tokens=40 for new prompts\nline 5: max_new_tokens=3 for new prompts\n"
    assert heads(out) == ["── #1 · length · 40 tokens ── slow one", "── #2 · length · 3 tokens ── quick two",
                          "── #3 · length · 3 tokens ── quick three"]
    # Each answer whole, right under its own header, then a blank line.
    blocks = out.split("── #")[1:]
    for n, block in zip((1, 2, 3), blocks):
        assert block.split("\n", 1)[1] == (chat.seqs[n].text.rstrip() or "(no text)") + "\n\n"
    assert [chat.seqs[n].line for n in (1, 2, 3)] == [2, 6, 7]   # blank lines skipped, still counted
    m = [chat.seqs[n].output.metrics for n in (1, 2, 3)]
    assert m[1].finished_time < m[0].finished_time              # #2 finished first, printed second
    assert max(x.first_scheduled_time for x in m) < min(x.finished_time for x in m)   # one batch


def test_piped_commands_work_as_typed(chat):
    chat.defaults = FIXED.replace(max_new_tokens=4)
    src = (b"/system Be brief.\nfirst\n/thread 1\nsecond\n/thread off\n//slash\n/lsit\n"
           b"/list\n/quit\nnever read\n")
    code, out, err = piped(chat, src)
    assert code == 0 and len(chat.seqs) == 3                       # /quit ended the input
    assert chat.seqs[2].messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": chat.seqs[1].text}, {"role": "user", "content": "second"}]
    assert chat.seqs[3].prompt == "/slash" and chat.seqs[3].parent is None
    assert "line 7: unknown command /lsit (did you mean /list?); /help lists them\n" in err
    # /list waited for the prompts before it: every row is done.
    rows = err.split("line 8:\n", 1)[1].splitlines()[:3]
    assert [r[:16] for r in rows] == ["#1   done length", "#2   done length", "#3   done length"]
    assert [h.split(" ── ")[1] for h in heads(out)] == ["first", "second", "/slash"]


def test_piped_bad_lines_are_errors_and_the_rest_is_answered(chat, tmp_path):
    chat.defaults = FIXED.replace(max_new_tokens=3)
    path = tmp_path / "log.jsonl"
    chat.finished.append(JsonLog(str(path), "tiny"))
    too_long = b"fox " * 3000
    # (Binary input, e.g. UTF-16 without a BOM after UTF-8 lines, is the reader's: tests/test_io_encoding.py.)
    code, out, err = piped(chat, b"ok one\nbad \xff byte\n" + too_long + b"\nok two\n")
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "line 2: #2: error: invalid UTF-8: byte 0xff at offset 4 in the line (11 in the file)"
    assert lines[1].startswith("line 3: #3: error: ") and "context length" in lines[1]
    assert [h.split(" ── ")[1] for h in heads(out)] == ["ok one", "ok two"]
    recs = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert sorted(recs) == ["1", "2", "3", "4"]
    assert [(recs[i]["line"], recs[i]["finish_reason"]) for i in "1234"] == \
        [(1, "length"), (2, "error"), (3, "error"), (4, "length")]
    assert recs["2"]["error"] == "invalid UTF-8: byte 0xff at offset 4 in the line (11 in the file)"
    assert recs["4"]["text"] == chat.seqs[4].text and recs["4"]["messages"][-1]["content"] == "ok two"


def test_piped_empty_input_exits_0_with_no_output(chat):
    assert piped(chat, b"") == (0, "", "")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_json_log_write_failure_is_reported_once_and_the_chat_goes_on(chat):
    notes = []
    chat.finished.append(JsonLog("/dev/full", "tiny", notify=notes.append))
    chat.defaults = FIXED.replace(max_new_tokens=2)
    code, out, _ = piped(chat, b"one\ntwo\n")
    assert code == 0 and len(heads(out)) == 2
    assert len(notes) == 1 and notes[0].startswith("--json-log /dev/full: cannot write (")


@pytest.mark.e2e
def test_piped_chat_on_the_embedded_model(embedded_model):
    """The chat-from-pipe case on the real model, with our own prompts: two lines, two answers."""
    engine = Engine.from_loaded(embedded_model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    with Driver(engine) as driver:
        s = ChatSession(driver, embedded_model.tokenizer, SamplingParams(max_new_tokens=12),
                        model_name=embedded_model.name)
        code, out, err = piped(s, b"What is the capital of France?\nSay goodbye.\n")
    assert code == 0 and err == ""
    assert heads(out)[0].endswith(" ── What is the capital of France?") and heads(out)[1].endswith(" ── Say goodbye.")
    assert "Paris" in s.seqs[1].text and s.seqs[2].text.strip()


# ---- module structure ------------------------------------------------------------------
CHAT_LAYERS = ["chat_session", "chat_view", "chat_log", "chat_commands", "chat_pipe", "chat"]


def test_chat_modules_import_one_way_at_module_level():
    """Each chat module imports only chat modules before it in CHAT_LAYERS, and only at
    the top: no import inside a function to dodge a cycle."""
    import ast
    from pathlib import Path

    import cbgen.frontends as fe
    root = Path(fe.__file__).parent
    for i, name in enumerate(CHAT_LAYERS):
        tree = ast.parse((root / f"{name}.py").read_text())
        top = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        nested = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in top]
        assert not nested, f"{name}.py imports inside a function at lines {nested}"
        used = {n.module for n in top if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module in CHAT_LAYERS}
        assert used <= set(CHAT_LAYERS[:i]), f"{name}.py imports {sorted(used - set(CHAT_LAYERS[:i]))}"
