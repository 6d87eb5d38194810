"""Two-stage interrupts for front-ends that read a stream (``cbgen run``, piped ``cbgen chat``).

First Ctrl-C: stop reading input and let the running sequences finish.
Second Ctrl-C, or SIGTERM: abort them (their partial text is still written).
The handlers only set flags; the front-end's loop acts on them, because a
signal handler must not take the engine's lock, which that thread may hold.
"""

from __future__ import annotations

import signal


class StopSignals:
    """Context manager installing the handlers (main thread only); ``announced``
    is for the front-end: how many of the two stages it has reported (0..2)."""

    def __init__(self) -> None:
        self.stop_admitting = False
        self.abort = False
        self.announced = 0
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGTERM or self.stop_admitting:
            self.abort = True
        self.stop_admitting = True

    def __enter__(self) -> "StopSignals":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
