"""Resume an interrupted run: which ids are already in the output file.

Resume is by id (cbgen ``id`` / OpenAI ``custom_id``), never by prompt text.
A record counts as done iff its line ends in ``"\\n"``: writers emit the
newline in the same ``write()`` as the record, so a line without one is the
tail of a killed run, and it is cut off so appends start on a clean line.
Every complete record is done, errors and aborts included; a driver that wants
aborted inputs retried must not write them.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, TextIO


class ResumeError(Exception):
    """The file is not a cbgen / OpenAI-format output; refusing to append to it."""


class ResumeState(NamedTuple):
    done_ids: set[str]
    num_records: int        # complete records found (a repeated id counts each time)
    truncated_bytes: int    # size of the half-written tail that was cut off


def _record_id(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(obj, dict):
        return None
    # OpenAI output lines also carry "id" (batch_req_...): custom_id is the input's id.
    v = obj.get("custom_id") if "custom_id" in obj else obj.get("id")
    return None if v is None or isinstance(v, (dict, list, bool)) else str(v)


def load_done_ids(path: str | os.PathLike) -> ResumeState:
    """Ids of the complete records in ``path``, truncating a half-written last
    line. A missing file is an empty state. A complete line without an id
    raises ``ResumeError`` naming it (e.g. a text-format output)."""
    if not os.path.exists(path):
        return ResumeState(set(), 0, 0)
    ids: set[str] = set()
    n = good_end = line_no = 0
    with open(path, "r+b") as f:
        while raw := f.readline():
            line_no += 1
            if not raw.endswith(b"\n"):
                break  # the tail of a killed run
            good_end += len(raw)
            if not raw.strip():
                continue
            rid = _record_id(raw)
            if rid is None:
                raise ResumeError(f"{os.fspath(path)} line {line_no}: not a cbgen or OpenAI output record "
                                  "(no 'id' / 'custom_id'); refusing to resume into it")
            ids.add(rid)
            n += 1
        size = f.seek(0, os.SEEK_END)
        if size > good_end:
            f.truncate(good_end)
    return ResumeState(ids, n, size - good_end)


def open_for_append(path: str | os.PathLike) -> tuple[TextIO, ResumeState]:
    """``load_done_ids(path)`` then ``path`` opened for UTF-8 append (created if missing)."""
    state = load_done_ids(path)
    return open(path, "a", encoding="utf-8", newline="\n"), state
