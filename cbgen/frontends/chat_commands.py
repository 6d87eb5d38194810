"""The /commands of ``cbgen chat`` and ``handle(session, line)``, which every front-end
calls for a typed (or piped) line: a /command, or a prompt to submit.

Every command validates its arguments and answers with one clear line when
they are wrong; none of them raises for user input. A command is one function
registered with ``@command``: the table (``COMMANDS``) drives dispatch, /help,
Tab completion and the "did you mean" hint, so a new command is one function.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import dataclass
from typing import Callable

from ..config import SamplingParams
from ..io.records import ALIASES
from ..io.writer import JsonlWriter
from .chat_log import LOGGED_STATES, seq_record
from .chat_session import ChatSession, Seq
from .chat_structured import KEYS as STRUCTURED_KEYS
from .chat_structured import set_structured
from .chat_view import describe, one_line

HELP_HEAD = """\
Type a prompt and press Enter: it joins the running batch at once; keep typing.
Esc+Enter (or Alt+Enter) inserts a newline; pasted text keeps its newlines.
Up/Down and Ctrl-R search the history (kept in the cbgen cache dir); Tab completes commands."""
HELP_TAIL = """\
Ctrl-C clears the line, or on an empty line cancels the focus: the current thread's
running sequences, else the most recent running one. Start a prompt with // to send a leading /."""

_NOT_SETTABLE = {"n": "chat runs one sample per prompt", "logprobs": "chat does not show logprobs (use cbgen run)",
                 "prompt_logprobs": "chat does not show logprobs (use cbgen run)"}
_NONE_WORDS = ("none", "null", "off", "-")


@dataclass(frozen=True)
class Command:
    """One /command. ``run(session, argument) -> reply``. ``reads_results``: it
    shows or saves answers, so piped input runs it only once every earlier
    prompt has finished (typed, it runs at once and shows what is there)."""

    name: str
    usage: str
    summary: str
    run: Callable[[ChatSession, str], str]
    reads_results: bool = False


COMMANDS: dict[str, Command] = {}           # in /help order
COMMAND_ALIASES = {"/exit": "/quit", "/?": "/help"}


def command(name: str, usage: str, summary: str, *, reads_results: bool = False):
    """Register the decorated ``fn(session, arg) -> str`` as ``name``."""
    def register(fn: Callable[[ChatSession, str], str]) -> Callable[[ChatSession, str], str]:
        COMMANDS[name] = Command(name, usage, summary, fn, reads_results)
        return fn
    return register


def help_text() -> str:
    rows = [f"  {f'{c.name} {c.usage}'.rstrip():<21} {c.summary}" for c in COMMANDS.values()]
    return "\n".join([HELP_HEAD, *rows, HELP_TAIL])


def command_of(line: str) -> Command | None:
    """The registered command a line invokes; None for a prompt or an unknown /name."""
    if not line.startswith("/") or line.startswith("//"):
        return None
    name = line.strip().partition(" ")[0]
    return COMMANDS.get(COMMAND_ALIASES.get(name, name))


def handle(s: ChatSession, line: str, line_no: int | None = None) -> str:
    """One submitted line: a /command, or a prompt (``//x`` sends ``/x``) from
    input line ``line_no``. Returns what to show ("" for nothing)."""
    if not line.strip():
        return ""
    if line.startswith("/") and not line.startswith("//"):
        return run_command(s, line)
    return s.submit(line[1:] if line.startswith("//") else line, line=line_no)


def run_command(s: ChatSession, line: str) -> str:
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    name = COMMAND_ALIASES.get(name, name)
    if name != "/quit":
        s.quit_armed = False   # confirmation only counts when nothing happened in between
    cmd = COMMANDS.get(name)
    if cmd is None:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        return f"unknown command {name}" + (f" (did you mean {close[0]}?)" if close else "") + "; /help lists them"
    return cmd.run(s, arg)


# ---- sequences ---------------------------------------------------------------------
def _seq(s: ChatSession, arg: str) -> Seq | str:
    """The sequence named by ``arg`` (``3`` or ``#3``), or an error message."""
    a = arg.lstrip("#")
    if not a.isdigit() or int(a) not in s.seqs:
        return f"no sequence {arg or '(missing number)'}: expected one of #1..#{len(s.seqs)}" if s.seqs \
            else "no sequences yet"
    return s.seqs[int(a)]


@command("/list", "", "every sequence: number, state, tokens, prompt, answer so far", reads_results=True)
def _list(s: ChatSession, arg: str) -> str:
    if not s.seqs:
        return "no sequences yet"
    live = s.live_progress()
    rows = []
    for seq in s.seqs.values():
        state, tokens = describe(seq, live)
        thread = f"↳#{seq.parent} " if seq.parent else ""
        rows.append(f"#{seq.num:<3} {state:<12} {tokens:>9}  {thread}{one_line(seq.prompt, 28):<28}  → "
                    f"{one_line(seq.error or seq.text, 40)}")
    return "\n".join(rows)


@command("/show", "N", "the full prompt and answer of #N, so far", reads_results=True)
def _show(s: ChatSession, arg: str) -> str:
    seq = _seq(s, arg)
    if isinstance(seq, str):
        return seq
    state, tokens = describe(seq, s.live_progress())
    turns = (seq.messages or [])[:-1]
    head = f"#{seq.num} · {state}" + (f" · {tokens} tokens" if tokens else "") + \
        (f" · continues #{seq.parent} ({len(turns)} earlier messages)" if seq.parent else "")
    body = seq.error if seq.state in ("error", "dropped") else (seq.text or "(no text yet)")
    return f"{head}\n> {seq.prompt}\n{body}"


@command("/cancel", "N... | all", "stop #N (its answer so far is kept) or every running sequence")
def _cancel(s: ChatSession, arg: str) -> str:
    if arg == "all":
        nums = s.cancel([q for q in s.running() if q.active])
        return ("cancelling " + ", ".join(f"#{n}" for n in nums)) if nums else "nothing running"
    if not arg:
        return "usage: /cancel N... | all"
    targets = []
    for a in arg.split():
        seq = _seq(s, a)
        if isinstance(seq, str):
            return seq
        if not seq.running:
            return f"#{seq.num} is not running ({seq.state})"
        targets.append(seq)
    return "cancelling " + ", ".join(f"#{n}" for n in s.cancel(targets))


# ---- settings ----------------------------------------------------------------------
def _parse(key: str, raw: str):
    """``raw`` as the type of SamplingParams field ``key``; ValueError names the key."""
    default = SamplingParams.__dataclass_fields__[key].default
    low = raw.lower()
    if key == "seed":
        return None if low in _NONE_WORDS else _number(key, raw, int)
    if key in ("stop", "stop_token_ids"):
        items = [] if low in _NONE_WORDS else shlex.split(raw)
        return tuple(items) if key == "stop" else tuple(_number(key, x, int) for x in items)
    if isinstance(default, bool):
        if low in ("true", "on", "yes", "1"):
            return True
        if low in ("false", "off", "no", "0"):
            return False
        raise ValueError(f"{key}: {raw!r} is not true or false")
    return _number(key, raw, type(default))


def _number(key: str, raw: str, kind: type):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw!r} is not {'an integer' if kind is int else 'a number'}") from None


@command("/set", "[KEY [VALUE]]", "show or change a sampling default for new prompts "
         "(e.g. /set temperature 0.2); /set json on|off, /set schema FILE|off: JSON answers; "
         "/set deterministic on|off: answers independent of the batch")
def _set(s: ChatSession, arg: str) -> str:
    current = s.defaults.to_dict()
    if not arg:
        return "  ".join(f"{k}={v!r}" for k, v in current.items() if k not in _NOT_SETTABLE)
    key, _, raw = arg.partition(" ")
    key, raw = ALIASES.get(key, key), raw.strip()
    if key in STRUCTURED_KEYS:
        return set_structured(s, key, raw)
    if key == "deterministic":
        return _set_deterministic(s, raw)
    if key in _NOT_SETTABLE:
        return f"{key} cannot be set: {_NOT_SETTABLE[key]}"
    if key not in current:
        close = difflib.get_close_matches(key, list(current), n=1, cutoff=0.6)
        return f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
            "; /set lists them"
    if not raw:
        return f"{key}={current[key]!r}"
    try:
        s.defaults = s.defaults.replace(**{key: _parse(key, raw)})
    except ValueError as e:
        return str(e)
    return f"{key}={s.defaults.to_dict()[key]!r} for new prompts"


def _set_deterministic(s: ChatSession, raw: str) -> str:
    """/set deterministic on|off: the engine's batch-invariant mode (EngineConfig.deterministic)."""
    engine = s.driver.engine
    if not raw:
        return f"deterministic={'on' if engine.config.deterministic else 'off'}"
    if raw.lower() not in ("on", "off", "true", "false", "1", "0"):
        return f"deterministic: {raw!r} is not on or off"
    on = raw.lower() in ("on", "true", "1")
    try:
        s.driver.set_deterministic(on)
    except ValueError as e:   # UnsupportedModelError: this model or kernel cannot
        return f"deterministic cannot be switched on: {e}"
    if not on:
        return "deterministic off: outputs may again depend on what runs beside them"
    return ("deterministic on: a greedy or seeded answer now depends only on its prompt and settings "
            "(prompts already running keep what they computed before)")


@command("/system", "[TEXT | off]", "show or set the system message of new conversations")
def _system(s: ChatSession, arg: str) -> str:
    if not arg:
        return f"system: {s.system!r}" if s.system else "no system message (the model's template default applies)"
    s.system = None if arg.lower() in _NONE_WORDS else arg
    return ("system message cleared" if s.system is None else "system message set") + \
        " for new conversations (threads keep theirs)"


@command("/thread", "N | off", "next prompts continue #N's conversation (multi-turn); off ends it")
def _thread(s: ChatSession, arg: str) -> str:
    if not arg:
        return f"in thread #{s.thread} (/thread off ends it)" if s.thread else "not in a thread (/thread N starts one)"
    if arg.lower() in _NONE_WORDS:
        s.thread = None
        return "thread off: next prompts start new conversations"
    if not s.chat:
        return "this model has no chat template: /thread needs one"
    seq = _seq(s, arg)
    if isinstance(seq, str):
        return seq
    if seq.state in ("error", "dropped"):
        return f"#{seq.num} has no answer to continue ({seq.error})"
    s.thread = seq.num
    wait = f" (they start when #{seq.num} finishes)" if seq.running else ""
    return f"thread #{seq.num}: next prompts continue its conversation{wait}; /thread off ends it"


# ---- output ------------------------------------------------------------------------
@command("/save", "FILE", "write every finished prompt's record as JSONL (the `cbgen run` format)",
         reads_results=True)
def _save(s: ChatSession, arg: str) -> str:
    if not arg:
        return "usage: /save FILE"
    path = shlex.split(arg)[0] if arg[0] in "'\"" else arg
    done = [q for q in s.seqs.values() if q.state in LOGGED_STATES]
    try:
        with open(path, "w", encoding="utf-8") as f:
            w = JsonlWriter(f)
            for q in done:
                w.write(seq_record(q, s.model_name))
    except OSError as e:
        return f"cannot save to {path}: {e.strerror or e}"
    left = len(s.running())
    return f"saved {len(done)} record{'s' * (len(done) != 1)} to {path}" + \
        (f" ({left} still running, not saved)" if left else "")


@command("/stats", "", "throughput, KV cache use, prefix-cache hit rate", reads_results=True)
def _stats(s: ChatSession, arg: str) -> str:
    st = s.driver.engine.stats()
    done = [q.output.metrics.tokens_per_s for q in s.seqs.values() if q.state == "done" and q.output]
    rates = [r for r in done if r]
    mean = s.driver.engine.num_generated_tokens / s.busy_seconds if s.busy_seconds > 0 else 0.0
    return "\n".join([
        f"sequences   {len(s.seqs)} submitted, {len(s.running())} running, {st.num_waiting} waiting in the engine",
        f"throughput  now {s.rate:.1f} tok/s · mean {mean:.1f} tok/s while busy ({st.num_generated_tokens} tokens, "
        f"{s.busy_seconds:.1f}s, {st.num_steps} steps)"
        + (f" · per sequence {sum(rates) / len(rates):.1f} tok/s" if rates else ""),
        f"KV cache    {st.kv_usage:.0%} of {st.num_kv_blocks} blocks in use · {st.num_preemptions} preemptions"
        + (f" · {st.num_kv_exhausted} cut short by the whole cache" if st.num_kv_exhausted else ""),
        f"prefix      {st.prefix_hit_rate:.0%} of prompt tokens served from the prefix cache",
    ])


@command("/help", "", "this list")
def _help(s: ChatSession, arg: str) -> str:
    return help_text()


@command("/quit", "", "exit (asks first while sequences run); also Ctrl-D on an empty line")
def _quit(s: ChatSession, arg: str) -> str:
    return s.request_quit()

