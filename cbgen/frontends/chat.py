"""``cbgen chat``: a prompt-toolkit REPL around ``ChatSession`` (stdin a terminal),
or ``chat_pipe.PipedChat`` when stdin is a pipe or a file.

Screen: the input line (its prompt is the next sequence number, ``#4>``) with
the live view as its bottom toolbar (a header plus one line per running
sequence, redrawn every 0.25 s). Finished answers and command replies are
printed above the prompt with ``print_formatted_text`` (which goes through
``run_in_terminal`` while the prompt is up), and ``patch_stdout`` sends any
stray print or warning the same way, so output never tears the input line.

Threads: the engine steps on the Driver's thread. Everything else (key
handlers, the toolbar, the event pump) runs on the asyncio loop's thread, the
only one that touches the ChatSession.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Callable

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import Condition, has_focus
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from ..config import SamplingParams, cache_root
from ..engine.engine import Engine
from .chat_commands import COMMANDS, handle
from .chat_log import JsonLog
from .chat_pipe import PipedChat
from .chat_session import ChatSession, Seq
from .chat_view import Fragments, live_view, render_answer, wrap
from .driver import Driver

STYLE = Style.from_dict({
    "bottom-toolbar": "noreverse", "bottom-toolbar.text": "",
    "bar.head": "bold", "bar.idle": "ansibrightblack", "bar.tail": "ansibrightblack",
    "state.queued": "ansibrightblack", "state.prefill": "ansiyellow", "state.decode": "ansigreen",
    "state.after": "ansibrightblack", "state.cancelling": "ansiyellow",
    "prompt": "bold", "prompt.thread": "ansicyan",
    "answer.head": "bold ansicyan", "answer.abort": "bold ansiyellow", "answer.prompt": "italic",
    "notice": "ansibrightblack", "error": "ansired",
})
PUMP_SECONDS = 0.05   # how often finished sequences are picked up from the Driver


class _CommandCompleter(Completer):
    """Tab completes a /command name at the start of the line, nothing else."""

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for c in COMMANDS:   # the registered names, in /help order
                if c.startswith(text):
                    yield Completion(c, start_position=-len(text))


class ChatApp:
    def __init__(self, session: ChatSession, *, history: History | None = None,
                 printer: Callable[[Fragments], None] | None = None, refresh_interval: float = 0.25) -> None:
        self.session = session
        self.print = printer or self._print_above
        session.finished.append(self._on_finished)
        session.notify = lambda text: self.print([("class:error", text)])
        self.prompt = PromptSession(
            history=history or InMemoryHistory(), bottom_toolbar=self.toolbar, refresh_interval=refresh_interval,
            key_bindings=self._keys(), style=STYLE, completer=_CommandCompleter(), complete_while_typing=False)

    def _print_above(self, frags: Fragments) -> None:
        """Print above the prompt; ``class:body`` text (answers, replies) is word-wrapped to the width."""
        width = self.prompt.app.output.get_size().columns - 1
        frags = [(st, wrap(t, width) if st == "class:body" else t) for st, t in frags]
        print_formatted_text(FormattedText(frags), style=STYLE)

    # ---- keys --------------------------------------------------------------------
    def _keys(self) -> KeyBindings:
        kb = KeyBindings()
        on_input = has_focus(DEFAULT_BUFFER)
        empty = Condition(lambda: not self.prompt.default_buffer.text)

        @kb.add("escape", "enter", filter=on_input)
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        @kb.add("c-c", filter=on_input)
        @kb.add("<sigint>", filter=on_input)
        def _interrupt(event) -> None:
            # Clears the line if there is text; never ends the session.
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                self.notice(self.session.interrupt())

        @kb.add("c-d", filter=on_input & empty)
        def _eof(event) -> None:
            msg = self.session.request_quit()
            if self.session.exit_requested:
                event.app.exit(result="")
            else:
                self.notice(msg)

        return kb

    def _on_finished(self, seq: Seq) -> None:
        # Refusals and drops were already answered (the reply to the line, /cancel's reply).
        if seq.state == "done":
            self.print(render_answer(seq))

    def notice(self, text: str, style: str = "class:notice") -> None:
        if text:
            self.print([(style, text)])

    # ---- views -------------------------------------------------------------------
    def message(self) -> FormattedText:
        s = self.session
        thread = [("class:prompt.thread", f" ↳#{s.thread}")] if s.thread else []
        return FormattedText([("class:prompt", f"#{s.next_num}"), *thread, ("class:prompt", "> ")])

    def toolbar(self) -> FormattedText:
        size = self.prompt.app.output.get_size()
        return FormattedText(live_view(self.session, size.columns, size.rows))

    # ---- the loop --------------------------------------------------------------
    async def _pump(self) -> None:
        """Move Driver events into the session; stop the prompt if the engine died.

        Redraws at once only when a sequence joins or leaves the view; token counts move
        at the toolbar's own refresh (``refresh_interval``). A redraw per batch of events
        (20 a second while decoding) took 1.5 s of CPU per 11 s of decode from the
        engine's thread on 2 cores and cost 18% of chat's tok/s (benchmarks/chat_concurrency.py)."""
        s = self.session
        shown = -1   # running sequences at the last redraw we asked for
        while True:
            s.poll()
            if s.failed is not None and self.prompt.app.is_running:
                self.prompt.app.exit(result="")
            if len(s.running()) != shown:
                shown = len(s.running())
                self.prompt.app.invalidate()   # a no-op while no prompt is up
            await asyncio.sleep(PUMP_SECONDS)

    async def run(self) -> int:
        """Prompt until /quit or Ctrl-D (confirmed), or until the input closes and
        what runs has finished; 1 if the engine failed, else 0."""
        s = self.session
        pump = asyncio.create_task(self._pump())
        try:
            # Between two prompts the terminal is not in raw mode, so Ctrl-C arrives as
            # SIGINT, not as our key binding: it must never end the session.
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        self.notice(f"cbgen chat · {s.model_name or 'model'} · /help for commands · "
                    "Esc+Enter inserts a newline · Ctrl-D quits")
        try:
            while not s.exit_requested and s.failed is None:
                try:
                    line = await self.prompt.prompt_async(self.message)
                except KeyboardInterrupt:   # defensive: our binding takes Ctrl-C
                    continue
                except EOFError:   # the input closed (a pipe ran dry; Ctrl-D is our binding): finish, exit
                    while s.running() and s.failed is None:
                        await asyncio.sleep(PUMP_SECONDS)
                    break
                if s.failed is None and not s.exit_requested:
                    self.notice(handle(s, line), style="class:body")   # word-wrapped
        finally:
            pump.cancel()
            s.close()
        if s.failed is not None:
            self.print([("class:error", f"error: the engine failed: {s.failed!r}")])
            return 1
        return 0


def _history() -> History:
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        return FileHistory(str(root / "chat_history"))
    except OSError:   # a read-only home must not stop the chat
        return InMemoryHistory()


def run_chat(engine: Engine, loaded, defaults: SamplingParams, *, system: str | None = None,
             json_log: str | None = None, interactive: bool | None = None) -> int:
    """Chat on ``engine`` until the user quits or the input ends; returns the exit code.

    ``interactive`` (default: stdin is a terminal) picks the REPL, else every
    stdin line is read as typed (``PipedChat``). ``json_log``: append each
    finished prompt's record to that file (raises OSError if it cannot be opened)."""
    async def main() -> int:
        # patch_stdout inside the loop: its proxy prints through the loop that is current.
        with patch_stdout():
            return await ChatApp(session, history=_history()).run()

    if interactive is None:
        interactive = sys.stdin.isatty()
    with Driver(engine) as driver:
        session = ChatSession(driver, loaded.tokenizer, defaults, system=system, model_name=loaded.name)
        # A lambda: the front-end installs its own ``session.notify`` after this.
        log = JsonLog(json_log, loaded.name, notify=lambda text: session.notify(text)) if json_log else None
        if log is not None:
            session.finished.append(log)
        try:
            return asyncio.run(main()) if interactive else PipedChat(session).run()
        finally:
            if log is not None:
                log.close()
