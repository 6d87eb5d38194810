"""Lazy line reading from files and stdin, and a bounded background prefetcher.

Nothing here reads a whole input: bytes are pulled a chunk (64 KiB) at a time
and lines handed out as they complete, so memory is bounded by the
``Prefetcher`` queue, not by the input size. Each source is decoded in the
encoding its first bytes show (UTF-8, or UTF-16/32 by BOM or NUL pattern; see
``encoding``); a line whose bytes do not decode carries a ``problem`` naming
the byte offset, and a binary source is refused, never read line by line.
"""

from __future__ import annotations

import codecs
import itertools
import os
import queue
import sys
import threading
from typing import BinaryIO, Generic, Iterable, Iterator, NamedTuple, TypeVar

from cbgen.io.encoding import ESCAPE, HEAD_BYTES, byte_length, invalid_message, needs_more, sniff
from cbgen.io.records import InputError, InputRecord, LineParser

T = TypeVar("T")


class Line(NamedTuple):
    source: str      # the source's name (``source_names``): base name, or the path; "stdin" for "-"
    line_no: int     # 1-based within its source (numbering restarts per source)
    text: str        # without the line terminator; undecodable bytes kept as lone surrogates
    problem: str | None = None  # why these bytes are not usable text (bad encoding, binary); None if fine


def source_names(sources: list[str]) -> list[str]:
    """The names ``sources`` have in default ids and messages: a file's base name
    (``data/in.jsonl`` -> ``in.jsonl``, so ids do not change with the working
    directory), or the path as given when two inputs share a base name;
    ``stdin`` for ``-``."""
    # normpath: "ds_dir/" (a shell's completion of a dataset directory) is named "ds_dir".
    base = ["stdin" if s == "-" else os.path.basename(os.path.normpath(s)) for s in sources]
    return [b if base.count(b) == 1 or s == "-" else s for s, b in zip(sources, base)]


def _binary(name: str, offset: int) -> str:
    return (f"{name} looks binary (a NUL byte at offset {offset}); refusing to read it: "
            "expected text, JSONL or one prompt per line")


def binary_reason(path: str) -> str | None:
    """Why the file ``path`` is refused as binary (a NUL byte in its first 64 KiB,
    outside UTF-16/32 text), or None. Lets the CLI refuse it before loading a model."""
    with open(path, "rb") as f:
        s = sniff(f.read(HEAD_BYTES))
    return None if s.binary_at is None else _binary(path, s.binary_at)


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    # read1, not read: on a pipe it returns what has arrived, so a line is handed
    # out as soon as its newline is in, without waiting for a full chunk or EOF.
    read = getattr(f, "read1", None) or f.read
    while chunk := read(HEAD_BYTES):
        yield chunk.encode("utf-8", "surrogateescape") if isinstance(chunk, str) else chunk


def _lines(name: str, f: BinaryIO) -> Iterator[Line]:
    """Lines of one source, decoded in the encoding its first bytes show (``encoding.sniff``).

    A NUL byte in the sniffed head refuses the whole source with one ``problem``
    line; one found later (U+0000 after decoding) refuses the rest from that line.
    """
    chunks = _chunks(f)
    head = b""
    for chunk in chunks:
        head += chunk
        if not needs_more(head):
            break
    s = sniff(head)
    if s.binary_at is not None:
        yield Line(name, 1, "", _binary(name, s.binary_at))
        return
    dec = codecs.getincrementaldecoder(s.encoding)(errors=ESCAPE)
    newline = len("\n".encode(s.encoding))
    parts: list[str] = []            # the current line so far (a list: a long line spans many chunks)
    n, pos = 0, s.bom                # pos: file offset of the current line's first byte
    for chunk in itertools.chain([head[s.bom:]], chunks, [None]):
        new = dec.decode(b"" if chunk is None else chunk, final=chunk is None)
        done: list[str] = []
        if "\n" in new:
            first, *middle, rest = new.split("\n")
            done, parts = ["".join(parts) + first, *middle], [rest]
        else:
            parts.append(new)
        if chunk is None and (last := "".join(parts)):
            done.append(last)        # a last line without a terminator
        for text in done:
            n += 1
            if "\0" in text:
                at = pos + byte_length(text[:text.index("\0")], s.encoding)
                yield Line(name, n, "", f"NUL byte at offset {at} in the file: {name} looks binary from here on; "
                                        "its remaining lines are skipped")
                return
            yield Line(name, n, text.rstrip("\r"), invalid_message(text, s.encoding, pos))
            pos += byte_length(text, s.encoding) + newline  # past the last line it no longer matters


def iter_lines(sources: list[str], stdin: BinaryIO | None = None) -> Iterator[Line]:
    """Lines of each source in turn; ``-`` is ``stdin`` (default ``sys.stdin.buffer``).

    Files are opened only when reached; an ``OSError`` (missing file) is raised
    from the iteration at that point.
    """
    for src, name in zip(sources, source_names(sources)):
        yield from source_lines(src, name, stdin)


def _stdin_bytes() -> BinaryIO:
    """The process's stdin as unbuffered bytes where it has a file descriptor.

    Why raw: the Prefetcher reads on a daemon thread that may still be blocked in
    a read when the process exits (Ctrl-C with the writer of a pipe still open). A
    daemon thread inside ``sys.stdin.buffer`` holds its lock, and CPython aborts at
    shutdown ("could not acquire lock for <_io.BufferedReader name='<stdin>'>");
    a raw ``FileIO`` read has no Python-level lock. ``read(n)`` on it returns what
    has arrived, one system call, so lines still stream as they come.
    """
    try:
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    except (AttributeError, OSError, ValueError):   # no descriptor (a test's stand-in)
        return getattr(sys.stdin, "buffer", sys.stdin)


def source_lines(src: str, name: str, stdin: BinaryIO | None = None) -> Iterator[Line]:
    """Lines of the one source ``src`` (``-``: stdin), named ``name`` in ids and messages."""
    if src == "-":
        yield from _lines(name, stdin or _stdin_bytes())
    else:
        with open(src, "rb") as f:
            yield from _lines(name, f)


def read_records(sources: list[str], parser: LineParser,
                 stdin: BinaryIO | None = None) -> Iterator[InputRecord | InputError]:
    """Parsed records of ``sources`` in input order (blank and resumed lines dropped).

    Default ids are ``"<source>:<line_no>"`` (see ``records``).
    """
    for ln in iter_lines(sources, stdin):
        r = parser(ln.text, ln.line_no, ln.source, problem=ln.problem)
        if r is not None:
            yield r


class _End(NamedTuple):
    error: BaseException | None


class Prefetcher(Generic[T]):
    """Runs ``items`` on a daemon thread into a ``queue.Queue(maxsize)``.

    Backpressure: the thread blocks while ``maxsize`` items wait, so it is at
    most ``maxsize + 1`` items (the one it holds) ahead of the consumer. Items
    come out in order; an exception from ``items`` is re-raised by ``get_many``
    after every item before it was delivered.
    """

    def __init__(self, items: Iterable[T], maxsize: int = 64) -> None:
        assert maxsize >= 1
        self._q: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._done = False                       # the end marker reached the consumer
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), name="cbgen-prefetch", daemon=True)
        self._thread.start()

    def _run(self, items: Iterable[T]) -> None:
        end = _End(None)
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            end = _End(e)
        self._put(end)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():  # the timeout lets close() stop a blocked put
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Up to ``max_items`` items. Waits up to ``timeout`` s for the first one
        (``None`` = until one arrives or the input ends, ``0`` = not at all)."""
        out: list[T] = []
        while len(out) < max_items and not self._done:
            try:
                item = self._q.get(block=not out and timeout != 0, timeout=timeout)
            except queue.Empty:
                break
            if isinstance(item, _End):
                self._done, self._error = True, item.error
                break
            out.append(item)
        if not out and self._error is not None:
            err, self._error = self._error, None
            raise err
        return out

    def get_nowait_many(self, max_items: int) -> list[T]:
        """Up to ``max_items`` items that are ready now; never blocks."""
        return self.get_many(max_items, timeout=0)

    @property
    def exhausted(self) -> bool:
        """Every item was delivered (and any reader error raised)."""
        return self._done and self._error is None

    @property
    def waiting(self) -> int:
        """Items parsed and queued, not yet taken (approximate, for progress)."""
        return self._q.qsize()

    def close(self) -> None:
        """Stop reading. The thread exits at its next put; one blocked on a
        silent stdin stays until the process exits (it is a daemon)."""
        self._stop.set()
