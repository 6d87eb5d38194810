"""How chat sequences read as text: states, the live view, finished answers.

Pure functions of a session (or a sequence) returning plain strings or
prompt-toolkit style ``(style, text)`` fragments; no terminal, no
prompt-toolkit import, so they are testable as data. Lines of the live view
are cut to the width: a wrapped toolbar line would push the prompt up.
"""

from __future__ import annotations

import textwrap
import time

from ..engine.engine import SequenceProgress
from .chat_session import ChatSession, Seq

Fragments = list[tuple[str, str]]
IDLE_HINT = "idle · Enter sends · Esc+Enter newline · /help · Ctrl-C cancels · Ctrl-D quits"


def describe(seq: Seq, live: dict[str, SequenceProgress]) -> tuple[str, str]:
    """(state, tokens) of ``seq`` as /list and the live view show them."""
    if seq.state == "live":
        p = live.get(seq.request_id)
        if p is None:   # not taken in by the engine yet, or finished there but not yet here
            return ("queued", f"0/{seq.params.max_new_tokens}") if seq.output is None else \
                ("finishing", f"{seq.num_tokens}/{seq.params.max_new_tokens}")
        state = "cancelling" if seq.cancelled else p.state
        if p.state == "prefill":
            return state, f"{p.num_computed_tokens}/{p.num_prompt_tokens}p"
        return state, f"{p.num_output_tokens}/{seq.params.max_new_tokens}"
    if seq.state == "held":
        return f"after #{seq.parent}", ""
    if seq.state == "done":
        return f"done {seq.finish_reason}", f"{seq.num_tokens}/{seq.params.max_new_tokens}"
    return seq.state, ""


def live_view(s: ChatSession, columns: int, rows: int) -> Fragments:
    """The bottom toolbar: a header, then one line per running sequence
    (number, state, tokens/max, tok/s, latest words), using at most half the rows."""
    width = max(columns - 1, 20)
    running = s.running()
    if not running:
        return [("class:bar.idle", fit(IDLE_HINT, width))]
    st = s.driver.engine.stats()
    head = (f"{len(running)} running · {s.rate:.0f} tok/s · KV {st.kv_usage:.0%} · "
            f"prefix hits {st.prefix_hit_rate:.0%}" + (f" · thread #{s.thread}" if s.thread else ""))
    out: Fragments = [("class:bar.head", fit(head, width))]
    live, now = s.live_progress(), time.monotonic()
    room = max(rows // 2 - 2, 3)
    for seq in running[:room]:
        state, tokens = describe(seq, live)
        started = seq.first_token_at
        tps = f"{seq.num_tokens / (now - started):.1f}" if started and now > started + 0.2 else ""
        num, rest = f"#{seq.num:<4}", f" {tokens:>9} {tps:>6}  "
        out += [("", "\n"), ("", num), (f"class:state.{state.split()[0]}", f"{state:<10}"), ("", rest),
                ("class:bar.tail", tail(seq.text or seq.prompt, width - len(num) - 10 - len(rest)))]
    if len(running) > room:
        out += [("", "\n"), ("class:bar.idle", f"… and {len(running) - room} more (/list)")]
    return out


def render_answer(seq: Seq, timing: bool = True) -> Fragments:
    """A finished sequence, printed once: a header line (number, finish reason,
    tokens, tok/s unless not ``timing``, the prompt cut to one line), then its full text."""
    o = seq.output
    assert o is not None and o.finished
    tps = o.metrics.tokens_per_s if timing else None
    head = (f"── #{seq.num} · {seq.finish_reason} · {o.metrics.num_generated_tokens} tokens"
            + (f" · {tps:.1f} tok/s" if tps else "") + " ── ")
    style = "class:answer.abort" if seq.finish_reason == "abort" else "class:answer.head"
    return [(style, head), ("class:answer.prompt", one_line(seq.prompt, 60)), ("", "\n"),
            ("class:body", seq.text.rstrip() or "(no text)"), ("", "\n")]


def one_line(text: str, width: int) -> str:
    """``text`` with its whitespace collapsed, cut to ``width`` with an ellipsis."""
    return fit(" ".join(text.split()), width)


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def tail(text: str, width: int) -> str:
    """The last words of ``text`` that fit ``width``, on one line."""
    s = " ".join(text.split())
    if width <= 1 or len(s) <= width:
        return s[:max(width, 0)]
    return "…" + s[-(width - 1):]


def wrap(text: str, width: int) -> str:
    """Word-wrap long lines; indented lines (code, tables) are left for the terminal to wrap."""
    if width < 20:
        return text
    return "\n".join(line if len(line) <= width or line[:1].isspace() else
                     textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n"))
