"""Resume an interrupted run: which ids are already done in the output file, and
the rewrite that leaves one record per id.

Resume is by id (cbgen ``id`` / OpenAI ``custom_id``), never by prompt text.
A record is complete iff its line ends in ``"\\n"``: writers emit the newline
in the same ``write()`` as the record, so a line without one is the tail of a
killed run, and it is cut off so appends start on a clean line. A complete
record is *final* unless it is an abort (cbgen ``finish_reason: "abort"``,
OpenAI ``error.code: "batch_cancelled"``): the partial text a second Ctrl-C
writes. Final ids are done; aborted ones are run again, and their new record
is appended. ``compact`` then rewrites the file atomically (a temporary file
in the same directory, fsync, ``os.replace``) keeping one record per id: the
first final one, else the last abort. Until it has run (a resumed run that is
itself killed) the file may hold an id's partial and final records; the next
``--resume`` compacts them. No step deletes a record before its replacement
is on disk, so an interruption at any point loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterator, NamedTuple, TextIO


class ResumeError(Exception):
    """The file is not a cbgen / OpenAI-format output; refusing to append to it."""


class ResumeState(NamedTuple):
    done_ids: set[str]      # ids with a final record
    num_records: int        # complete records found (a repeated id counts each time)
    truncated_bytes: int    # size of the half-written tail that was cut off
    superseded: int = 0     # aborts and repeated ids, which a rerun may supersede (0: no rewrite needed)


class _Entry(NamedTuple):
    id: str
    final: bool
    start: int              # byte offset of the line
    raw: bytes


def record_key(raw: bytes) -> tuple[str, bool] | None:
    """(id, final) of an output line, or None when it is not a record."""
    try:
        obj = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(obj, dict):
        return None
    # OpenAI output lines also carry "id" (batch_req_...): custom_id is the input's id.
    v = obj.get("custom_id") if "custom_id" in obj else obj.get("id")
    if v is None or isinstance(v, (dict, list, bool)):
        return None
    err = obj.get("error")
    aborted = (obj.get("finish_reason") == "abort"
               or "custom_id" in obj and isinstance(err, dict) and err.get("code") == "batch_cancelled")
    return str(v), not aborted


def _entries(path: str | os.PathLike, f) -> Iterator[_Entry]:
    """Complete records of ``f`` (at offset 0) in file order; stops at a half-written tail."""
    pos = line_no = 0
    while raw := f.readline():
        line_no += 1
        if not raw.endswith(b"\n"):
            return  # the tail of a killed run
        start, pos = pos, pos + len(raw)
        if not raw.strip():
            continue
        got = record_key(raw)
        if got is None:
            raise ResumeError(f"{os.fspath(path)} line {line_no}: not a cbgen or OpenAI output record "
                              "(no 'id' / 'custom_id'); refusing to resume into it")
        yield _Entry(got[0], got[1], start, raw)


def _kept(entries: Iterator[_Entry]) -> tuple[dict[str, int], int, int]:
    """(id -> start of the record to keep, complete records, end of the last complete line)."""
    keep: dict[str, tuple[int, bool]] = {}
    n = end = 0
    for e in entries:
        n += 1
        end = e.start + len(e.raw)
        old = keep.get(e.id)
        if old is None or not old[1]:  # the first final record wins; among aborts, the last
            keep[e.id] = (e.start, e.final)
    return {rid: start for rid, (start, _) in keep.items()}, n, end


def load_done_ids(path: str | os.PathLike) -> ResumeState:
    """Ids of the final records in ``path``, truncating a half-written last
    line. A missing file is an empty state. A complete line without an id
    raises ``ResumeError`` naming it (e.g. a text-format output)."""
    if not os.path.exists(path):
        return ResumeState(set(), 0, 0)
    done: set[str] = set()
    n = good_end = superseded = 0
    seen: set[str] = set()
    with open(path, "r+b") as f:
        for e in _entries(path, f):
            n += 1
            good_end = e.start + len(e.raw)
            superseded += e.id in seen or not e.final
            seen.add(e.id)
            if e.final:
                done.add(e.id)
        size = f.seek(0, os.SEEK_END)
        if size > good_end:
            f.truncate(good_end)
    return ResumeState(done, n, size - good_end, superseded)


def compact(path: str | os.PathLike) -> int:
    """Rewrite ``path`` atomically with one record per id (the first final one,
    else the last abort), in file order; returns how many records were dropped
    (0: the file is left untouched). A half-written tail is dropped too."""
    with open(path, "rb") as f:
        keep, n, end = _kept(_entries(path, f))
        size = f.seek(0, os.SEEK_END)
        if len(keep) == n and size == end:
            return 0
        f.seek(0)
        starts = set(keep.values())
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".cbgen-tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as out:
                for e in _entries(path, f):
                    if e.start in starts:
                        out.write(e.raw)
                out.flush()
                os.fsync(out.fileno())
            shutil.copymode(path, tmp)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never a mix
        except BaseException:
            os.unlink(tmp)
            raise
    _fsync_dir(d)
    return n - len(keep)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_for_append(path: str | os.PathLike) -> tuple[TextIO, ResumeState]:
    """``load_done_ids(path)`` then ``path`` opened for UTF-8 append (created if missing)."""
    state = load_done_ids(path)
    return open(path, "a", encoding="utf-8", newline="\n"), state
