"""One thread for every torch op of the process: loading, packing and stepping.

Why one thread: libgomp (torch's OpenMP runtime on Linux) gives every OS thread
that opens a parallel region a team of its own. Load a model on the main thread
and step it on another, and the process holds two teams, more OpenMP threads than
cores; libgomp then throttles spin-waiting (``gomp_throttled_spin_count``), so the
stepping team's workers sleep and are woken by futex at every op. Measured on 2
cores (embedded model, 1 sequence, benchmarks/driver_overhead.py): 86 voluntary
context switches per decode step instead of 1, and process CPU time = wall time
(the second core idle). With load and step on one thread there is one team.

So front-ends never call torch themselves: they run ``compute_thread().call(...)``
for loading and engine construction, and the ``Driver`` steps on the same thread.
The thread is a process-wide resource (there is one OpenMP runtime per process),
hence the one accessor below rather than an object passed around.
"""

from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread running submitted callables one at a time, in order.

    Daemon, not a ThreadPoolExecutor: Ctrl-C during a long load must let the
    process exit without joining the thread first."""

    def __init__(self, name: str = "cbgen-compute") -> None:
        self._jobs: "queue.Queue[tuple[Callable[[], Any], Future]]" = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, which owns the error
                fut.set_exception(e)

    @property
    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """Queue ``fn(*args, **kwargs)``; jobs run in submission order. A job that
        never returns (the Driver's loop, until it is closed) holds the thread."""
        fut: Future = Future()
        self._jobs.put((functools.partial(fn, *args, **kwargs), fut))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the compute thread and return its result (or raise its
        exception). Called from the compute thread itself, it runs inline."""
        if self.is_current:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()


@functools.cache
def compute_thread() -> ComputeThread:
    """The process's compute thread, started on first use."""
    return ComputeThread()
