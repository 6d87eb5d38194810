"""Lazy line reading from files and stdin, and a bounded background prefetcher.

Nothing here reads a whole input: lines are pulled one at a time, so memory is
bounded by the ``Prefetcher`` queue, not by the input size.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import BinaryIO, Generic, Iterable, Iterator, NamedTuple, TypeVar

from cbgen.io.records import InputError, InputRecord, LineParser

T = TypeVar("T")


class Line(NamedTuple):
    source: str      # the path as given; "stdin" for "-"
    line_no: int     # 1-based within its source (numbering restarts per source)
    text: str        # without the line terminator; invalid UTF-8 bytes kept as lone surrogates


def _lines(name: str, f: BinaryIO) -> Iterator[Line]:
    # readline, not block iteration: on a pipe it returns as soon as one line has arrived.
    n = 0
    while raw := f.readline():
        n += 1
        # surrogateescape: a bad byte becomes a lone surrogate that parse_line reports
        # as an error on this line, instead of a crash of the whole run.
        text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        if n == 1:
            text = text.removeprefix("\ufeff")  # UTF-8 BOM from some editors
        yield Line(name, n, text.rstrip("\r\n"))


def iter_lines(sources: list[str], stdin: BinaryIO | None = None) -> Iterator[Line]:
    """Lines of each source in turn; ``-`` is ``stdin`` (default ``sys.stdin.buffer``).

    Files are opened only when reached; an ``OSError`` (missing file) is raised
    from the iteration at that point.
    """
    for src in sources:
        if src == "-":
            yield from _lines("stdin", stdin or getattr(sys.stdin, "buffer", sys.stdin))
        else:
            with open(src, "rb") as f:
                yield from _lines(src, f)


def read_records(sources: list[str], parser: LineParser,
                 stdin: BinaryIO | None = None) -> Iterator[InputRecord | InputError]:
    """Parsed records of ``sources`` in input order (blank and resumed lines dropped).

    Default ids are ``"<line_no>"`` for one source, ``"<source>:<line_no>"`` for several.
    """
    multi = len(sources) > 1
    for ln in iter_lines(sources, stdin):
        r = parser(ln.text, ln.line_no, ln.source if multi else None)
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
