"""Chat sequences as ``cbgen run`` records: ``/save`` and ``--json-log``.

One record format for both: ``io.writer``'s ``result_from_outputs`` (an
answer) or ``error_result`` (a prompt that got none), plus ``messages``, the
input the session built (system message and earlier turns included), so a
prompt travels with its answer. ``id`` is the sequence number, ``line`` the
input line (the sequence number when typed).
"""

from __future__ import annotations

from typing import Callable, TextIO

from ..io.records import InputError
from ..io.writer import JsonlWriter, OutputClosed, ResultRecord, error_result, result_from_outputs
from .chat_session import Seq

LOGGED_STATES = ("done", "error")   # a dropped turn was never sent: it has no record


def seq_record(seq: Seq, model: str | None) -> ResultRecord:
    """The record of a finished (``done``) or refused (``error``) sequence."""
    assert seq.state in LOGGED_STATES, seq.state
    if seq.state == "done":
        rec = result_from_outputs(seq.record, [seq.output], model)
    elif seq.record is not None:   # valid input the engine refused (too long, no template)
        rec = error_result(seq.record, seq.error, model)
    else:                          # input that never became a prompt (``ChatSession.reject``)
        rec = error_result(InputError(seq.request_id, seq.line, "prompt", seq.error), model=model)
    rec.messages = seq.messages
    return rec


class JsonLog:
    """``--json-log FILE``: a listener for ``ChatSession.finished`` that appends
    each finished sequence's record to FILE, one write + flush per record, in
    finishing order. A write that fails (disk full) is reported once through
    ``notify`` and logging stops; the chat goes on.

    Raises OSError from the constructor when FILE cannot be opened."""

    def __init__(self, path: str, model: str | None, notify: Callable[[str], None] = lambda text: None) -> None:
        self.path, self.model, self.notify = path, model, notify
        self._file: TextIO | None = open(path, "a", encoding="utf-8")
        self._writer = JsonlWriter(self._file)

    def __call__(self, seq: Seq) -> None:
        if self._file is None or seq.state not in LOGGED_STATES:
            return
        try:
            self._writer.write(seq_record(seq, self.model))
        except (OSError, OutputClosed) as e:
            self.notify(f"--json-log {self.path}: cannot write ({e}); logging stopped")
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:   # the flush of a failed write: already reported
                pass
            self._file = None
