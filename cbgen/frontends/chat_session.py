"""ChatSession: the state and logic of ``cbgen chat``, with no terminal.

The session owns the numbered sequences (#1, #2, ... in submission order), the
sampling defaults, the system message and the current thread. The app around
it submits prompts (``submit``; ``chat_commands.handle`` parses a typed line),
calls ``on_event`` for every Driver event and ``tick()`` periodically, all from
ONE thread (the front-end's loop), so the session needs no locks; it reads the
engine only through the thread-safe ``progress()`` / ``stats()``.

The session renders nothing: a sequence reaching its final state (done, error,
dropped) is announced to every callable in ``finished``, and a message that
answers no typed line (a held turn refused when released) goes to ``notify``.

Dependencies go one way: chat_session <- chat_view <- chat_commands <- chat
(the prompt-toolkit app) and chat_pipe (stdin not a terminal).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..config import SamplingParams
from ..engine.engine import SequenceProgress
from ..engine.outputs import RequestOutput
from ..io.records import InputRecord
from ..engine.structured_params import StructuredOutputsParams
from .driver import Driver, EngineFailed
from .prompting import PromptError, encode


@dataclass
class Seq:
    """One submitted prompt and its answer. ``state`` is the session's view:
    held (waiting for its thread parent) | live (in the engine) | done |
    error (the engine refused it) | dropped (cancelled while held: never sent)."""

    num: int
    prompt: str
    params: SamplingParams
    parent: int | None                       # the sequence this one continues (/thread)
    line: int = 0                            # the input line it came from (piped), else ``num``
    messages: list[dict] | None = None       # what was sent; None while held or for raw prompts
    record: InputRecord | None = None        # set once encoded; /save builds its record from it
    state: str = "held"
    text: str = ""
    output: RequestOutput | None = None      # the latest (the final one once done)
    error: str | None = None
    first_token_at: float | None = None      # our clock, for the live tok/s
    cancelled: bool = False                  # abort sent; its final output is on the way
    structured: StructuredOutputsParams | None = None   # the output constraint when it was typed

    @property
    def request_id(self) -> str:
        return str(self.num)

    @property
    def running(self) -> bool:
        return self.state in ("held", "live")

    @property
    def active(self) -> bool:
        """Running and not already being cancelled: what Ctrl-C and /quit care about."""
        return self.running and not self.cancelled

    @property
    def finish_reason(self) -> str | None:
        if self.state in ("error", "dropped"):
            return "error" if self.state == "error" else "abort"
        o = self.output
        return o.finish_reason.value if o is not None and o.finished and o.finish_reason else None

    @property
    def num_tokens(self) -> int:
        return len(self.output.token_ids) if self.output is not None else 0


class ChatSession:
    def __init__(self, driver: Driver, tokenizer, defaults: SamplingParams, *, system: str | None = None,
                 model_name: str | None = None) -> None:
        self.driver, self.tokenizer = driver, tokenizer
        self.defaults = defaults
        self.system = system
        self.model_name = model_name
        self.finished: list[Callable[[Seq], None]] = []   # called once per sequence, in finishing order
        self.notify: Callable[[str], None] = lambda text: None
        self.seqs: dict[int, Seq] = {}
        self.thread: int | None = None           # tip of the current conversation, or None
        self.failed: BaseException | None = None  # the engine died; the app exits
        self.exit_requested = False
        self.quit_armed = False                  # a first /quit or Ctrl-D asked; anything else disarms
        self._samples: deque[tuple[float, int]] = deque(maxlen=40)  # (time, engine generated tokens)
        self.busy_seconds = 0.0
        self._last_tick: float | None = None
        self.chat = bool(getattr(tokenizer, "chat_template", None))  # else raw completion prompts
        self.structured: StructuredOutputsParams | None = None   # /set json | /set schema

    # ---- input ----------------------------------------------------------
    @property
    def next_num(self) -> int:
        return len(self.seqs) + 1

    def submit(self, text: str, line: int | None = None) -> str:
        """Number ``text`` and send it to the engine (it joins the batch at the next step).

        In a thread the new sequence continues the tip's conversation and
        becomes the new tip; while the tip is still answering it is held and
        sent when the tip finishes. ``line`` is the input line (default: the
        sequence number). Returns a message to show ("" if none)."""
        self.quit_armed = False
        seq = Seq(self.next_num, text, self.defaults, parent=self.thread, line=line or self.next_num,
                  structured=self.structured)
        self.seqs[seq.num] = seq
        if self.thread is not None:
            self.thread = seq.num
            if self.seqs[seq.parent].running:
                return f"#{seq.num} will start when #{seq.parent} finishes"
        return self._send(seq)

    def _history(self, seq: Seq) -> list[dict]:
        if seq.parent is None:
            return [{"role": "system", "content": self.system}] if self.system else []
        p = self.seqs[seq.parent]
        return [*(p.messages or []), {"role": "assistant", "content": p.text}]

    def _send(self, seq: Seq) -> str:
        """Encode and submit ``seq``; a refusal (too long, no template) marks it ``error``."""
        if self.chat:
            seq.messages = [*self._history(seq), {"role": "user", "content": seq.prompt}]
        seq.record = InputRecord(seq.request_id, seq.line, "messages" if self.chat else "prompt",
                                 None if self.chat else seq.prompt, seq.messages, seq.params, "cbgen",
                                 structured=seq.structured)
        try:
            ids = encode(self.tokenizer, prompt=seq.record.prompt, messages=seq.messages)
            self.driver.submit(seq.request_id, ids, seq.params, structured=seq.structured)
        except (PromptError, ValueError) as e:
            seq.state, seq.error = "error", str(e)
            self._finish(seq)
            self._drop_children(seq)
            return f"#{seq.num}: error: {e}"
        seq.state = "live"
        return ""

    def reject(self, text: str, error: str, line: int | None = None) -> Seq:
        """Number an input that cannot be a prompt (e.g. invalid UTF-8): an
        ``error`` sequence, never sent, so numbering and logs keep every input."""
        seq = Seq(self.next_num, text, self.defaults, parent=None, line=line or self.next_num,
                  state="error", error=error)
        self.seqs[seq.num] = seq
        self._finish(seq)
        return seq

    def _finish(self, seq: Seq) -> None:
        for listener in self.finished:
            listener(seq)

    # ---- engine events ------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> bool:
        """Apply every Driver event waiting (waiting up to ``timeout`` s for the
        first one), then ``tick()``. Returns whether there was any."""
        got = False
        while True:
            try:
                ev = self.driver.events.get(timeout=timeout) if timeout > 0 and not got \
                    else self.driver.events.get_nowait()
            except queue.Empty:
                break
            self.on_event(ev)
            got = True
        self.tick()
        return got

    def on_event(self, ev: RequestOutput | EngineFailed) -> None:
        if isinstance(ev, EngineFailed):
            self.failed = ev.error
            return
        seq = self.seqs.get(int(ev.request_id))
        if seq is None or seq.state != "live":
            return
        seq.output, seq.text = ev, ev.text
        if ev.token_ids and seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if ev.finished:
            seq.state = "done"
            self._finish(seq)
            self._release_children(seq)

    def _release_children(self, parent: Seq) -> None:
        for child in self.seqs.values():
            if child.parent == parent.num and child.state == "held":
                msg = self._send(child)
                if msg:
                    self.notify(msg)

    def _drop_children(self, parent: Seq) -> None:
        """A turn with no answer to continue from drops the held turns after it."""
        for child in self.seqs.values():
            if child.parent == parent.num and child.state == "held":
                child.state, child.error = "dropped", f"#{parent.num} has no answer to continue"
                self._finish(child)
                self._drop_children(child)

    def tick(self, now: float | None = None) -> None:
        """Sample the engine's token counter (for tok/s) and count busy time."""
        now = time.monotonic() if now is None else now
        if self._last_tick is not None and any(s.state == "live" for s in self.seqs.values()):
            self.busy_seconds += now - self._last_tick
        self._last_tick = now
        self._samples.append((now, self.driver.engine.num_generated_tokens))

    @property
    def rate(self) -> float:
        """Engine tokens/s over the last ~2 s of ticks."""
        if len(self._samples) < 2:
            return 0.0
        (t0, g0), (t1, g1) = self._samples[0], self._samples[-1]
        return (g1 - g0) / (t1 - t0) if t1 > t0 else 0.0

    # ---- focus, cancel, quit ---------------------------------------------------
    def running(self) -> list[Seq]:
        return [s for s in self.seqs.values() if s.running]

    def thread_chain(self) -> list[Seq]:
        """The current thread, tip first, back to its first turn."""
        out, n = [], self.thread
        while n is not None:
            out.append(self.seqs[n])
            n = self.seqs[n].parent
        return out

    def cancel(self, seqs: list[Seq]) -> list[int]:
        """Cancel the running ones of ``seqs``; returns their numbers. A held
        sequence never reached the engine, so it is simply dropped as aborted."""
        done = []
        for s in seqs:
            if s.state == "live":
                s.cancelled = True
                self.driver.abort(s.request_id)   # its final output (abort) arrives as an event
            elif s.state == "held":
                s.state, s.error = "dropped", "cancelled before it started"
                self._finish(s)
                self._drop_children(s)
            else:
                continue
            done.append(s.num)
        return done

    def interrupt(self) -> str:
        """Ctrl-C on an empty line: cancel the focus, i.e. the running
        sequences of the current thread, else the most recent running one."""
        active = [s for s in self.running() if s.active]
        focus = [s for s in self.thread_chain() if s.active] or active[-1:]
        if not focus:
            return "nothing running (Ctrl-D or /quit to exit)"
        nums = self.cancel(focus)
        return "cancelling " + ", ".join(f"#{n}" for n in nums)

    def request_quit(self) -> str:
        """/quit or Ctrl-D: quits at once when idle; with sequences running the
        first call asks and a second one (nothing else in between) confirms."""
        live = [s for s in self.running() if s.active]
        if not live or self.quit_armed:
            self.exit_requested = True
            return ""
        self.quit_armed = True
        return (f"{len(live)} sequence{'s' if len(live) > 1 else ''} still running: "
                "Ctrl-D or /quit again to cancel and quit")

    def close(self) -> None:
        self.driver.abort_all()

    def live_progress(self) -> dict[str, SequenceProgress]:
        """The engine's view of its live sequences, by request id (thread-safe read)."""
        return {p.request_id: p for p in self.driver.engine.progress() if p.index == 0}


__all__ = ["ChatSession", "Seq"]
