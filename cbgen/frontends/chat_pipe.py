"""``cbgen chat`` with stdin a pipe or a file: every line is read as if typed.

``cbgen chat < prompts.txt > answers.txt``, ``printf 'hi\\nbye\\n' | cbgen chat``.

* Each non-blank line is a prompt, numbered #1, #2, ... like typed ones; it is
  sent as soon as it is read, so the prompts generate concurrently in one
  batch (at most ``max_pending`` unanswered at once; reading waits beyond).
* /commands work as typed (``/set temperature 0.5`` applies to the lines after
  it, ``/system``, ``/thread``, ``/cancel``, ...), except: ``/quit`` ends the
  input like EOF (nobody is there to confirm; what runs still finishes), and a
  command that shows or saves answers (``/list``, ``/show``, ``/stats``,
  ``/save``) waits until every prompt before it has finished.
* stdout has only the answers, each whole, in INPUT order (a script can pair
  them with its prompts), each after a header naming it:
  ``── #1 · stop · 8 tokens ── <the prompt, cut to one line>``, then a blank
  line. Replies to commands and errors go to stderr, prefixed with their line
  number; the banner only when stderr is a terminal.
* Bad input never stops the chat: a line that is not UTF-8 or a prompt the
  engine refuses (too long) is an error on stderr naming the line, and the
  exit code is 1 at the end; otherwise 0 at EOF (an empty input included).
* Ctrl-C (``interrupts.StopSignals``): the first stops reading and lets the
  running prompts finish; the second (or SIGTERM) cancels them and prints
  their partial answers (``abort``). A closed stdout (``| head``) ends quietly.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO, TextIO

from ..io.reader import Line, Prefetcher, iter_lines
from ..io.writer import OutputClosed
from .chat_commands import command_of, handle
from .chat_session import ChatSession, Seq
from .chat_view import render_answer
from .interrupts import StopSignals

READ_AHEAD = 64            # lines read and decoded ahead of the loop
POLL_SECONDS = 0.05        # longest wait for an engine event or an input line


class PipedChat:
    def __init__(self, session: ChatSession, *, stdin: BinaryIO | None = None, out: TextIO | None = None,
                 err: TextIO | None = None, max_pending: int | None = None, banner: bool | None = None) -> None:
        self.session = session
        self.stdin, self.out, self.err = stdin, out or sys.stdout, err or sys.stderr
        # Sent but unanswered prompts; twice the engine's slots so a freed slot refills at the next step.
        self.max_pending = max_pending or 2 * session.driver.engine.config.max_num_seqs
        self.banner = self.err.isatty() if banner is None else banner
        self._next_out = 1                  # the next sequence number to print (input order)
        self._waiting: Line | None = None   # a line read but not yet handled (no room, or a barrier)
        session.notify = self._status
        session.finished.append(self._on_finished)

    # ---- output -----------------------------------------------------------------
    def _status(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def _on_finished(self, seq: Seq) -> None:
        if seq.state == "dropped":   # errors were reported with their line already
            self._status(f"line {seq.line}: #{seq.num}: not sent: {seq.error}")

    def _print_ready(self) -> None:
        """Print the answers that are next in input order; refused prompts have none."""
        s = self.session
        while self._next_out in s.seqs and not s.seqs[self._next_out].running:
            seq = s.seqs[self._next_out]
            self._next_out += 1
            if seq.state == "done":
                text = "".join(t for _, t in render_answer(seq, timing=False)) + "\n"
                try:
                    self.out.write(text)
                    self.out.flush()
                except BrokenPipeError as e:
                    raise OutputClosed(str(e)) from e

    # ---- input ------------------------------------------------------------------
    def _read(self, lines: Prefetcher) -> bool:
        """Handle the lines that are ready while there is room; False once the input is over."""
        s = self.session
        while len(s.running()) < self.max_pending:
            if self._waiting is None:
                try:
                    got = lines.get_many(1, timeout=0 if s.running() else POLL_SECONDS)
                except OSError as e:
                    self._status(f"error: cannot read stdin: {e}")
                    return False
                if not got:
                    return not lines.exhausted
                self._waiting = got[0]
            ln = self._waiting
            cmd = command_of(ln.text)
            if cmd is not None and cmd.reads_results and s.running():
                return True   # a barrier: runs once the answers before it are in
            self._waiting = None
            if cmd is not None and cmd.name == "/quit":
                return False
            self._line(ln)
        return True

    def _line(self, ln: Line) -> None:
        s = self.session
        error = ln.problem or _not_text(ln.text)   # the reader's verdict on the bytes first
        if error is not None:   # never generate from mis-decoded bytes
            shown = ln.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\0", "")
            seq = s.reject(shown, error, line=ln.line_no)
            self._status(f"line {ln.line_no}: #{seq.num}: error: {seq.error}")
            return
        reply = handle(s, ln.text, line_no=ln.line_no)
        if reply:   # a multi-line reply (/list, /stats) starts on its own line
            self._status(f"line {ln.line_no}:" + ("\n" if "\n" in reply else " ") + reply)

    # ---- the loop ---------------------------------------------------------------
    def run(self) -> int:
        """Read stdin to its end (or /quit, or Ctrl-C), answer everything, print it.
        Returns 1 if a prompt got no answer or the engine failed, else 0."""
        s = self.session
        if self.banner:
            self._status(f"cbgen chat · {s.model_name or 'model'} · reading prompts from stdin, one per line; "
                         "answers on stdout in input order")
        lines = Prefetcher(iter_lines(["-"], self.stdin), maxsize=READ_AHEAD)
        reading = True
        with StopSignals() as sig:
            try:
                while s.failed is None:
                    if sig.stop_admitting and sig.announced == 0:
                        sig.announced, reading = 1, False
                        self._status(f"stopping: no more input read; finishing {len(s.running())} running "
                                     "(Ctrl-C again to cancel them)")
                    if sig.abort and sig.announced < 2:
                        sig.announced, reading = 2, False
                        self._status("cancelling: printing partial answers")
                        s.cancel([q for q in s.running() if q.active])
                    if reading:
                        reading = self._read(lines)
                    s.poll(timeout=POLL_SECONDS if s.running() else 0)
                    self._print_ready()
                    if not reading and not s.running():
                        break
            except OutputClosed:
                s.driver.abort_all()
                try:   # Python's final flush would report the broken pipe again.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                except (OSError, ValueError):   # stdout is not a file (an in-process test)
                    pass
                return 0
            finally:
                lines.close()
                s.close()
        if s.failed is not None:
            self._status(f"error: the engine failed: {s.failed!r}")
            return 1
        return 1 if any(q.state == "error" for q in s.seqs.values()) else 0


def _not_text(line: str) -> str | None:
    """Why ``line`` is not UTF-8 text, or None. Invalid bytes arrive as lone
    surrogates (the reader's surrogateescape); a NUL means binary input or
    UTF-16 (PowerShell's ``>``), whose every other byte is 0."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid UTF-8 at character {e.start + 1}: expected UTF-8 text"
    if "\0" in line:
        return (f"NUL character at character {line.index(chr(0)) + 1}: expected UTF-8 text "
                "(a UTF-16 file? save it as UTF-8)")
    return None
