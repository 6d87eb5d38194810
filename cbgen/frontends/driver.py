"""Driver: the one loop every front-end uses to run the engine.

The engine steps on the process's compute thread (``cbgen.compute``: the thread
that loaded the model, so torch keeps one OpenMP team). A front-end submits and
aborts from its own thread (the engine queues both for its next step) and
receives every ``RequestOutput`` in ``events``.

Each step is one job on the compute thread, and a step that leaves work behind
queues the next. So an idle driver holds nothing (the next submit queues a
step), and other compute jobs (a second model load, a bench baseline) run
between two steps instead of waiting for the driver to close.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from ..compute import compute_thread
from ..config import SamplingParams
from ..engine.engine import Engine
from ..engine.outputs import RequestOutput
from ..engine.structured_params import StructuredOutputsParams


@dataclass(frozen=True)
class EngineFailed:
    """Put in ``events`` when a step raised: the front-end reports it and stops."""
    error: BaseException


class Driver:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events: "queue.Queue[RequestOutput | EngineFailed]" = queue.Queue()
        self._compute = compute_thread()
        self._lock = threading.Lock()
        # Invariant: _armed is True exactly while a step job is queued or running;
        # _idle is its negation as an Event, for close() to wait on.
        self._armed = False
        self._idle = threading.Event()
        self._idle.set()
        self._started = self._closing = self._failed = False

    def start(self) -> "Driver":
        self._started = True
        self._kick()
        return self

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               extra: dict[str, Any] | None = None, structured: StructuredOutputsParams | None = None) -> None:
        """Raises ValueError (naming the field) for a request the engine refuses."""
        self.engine.add_request(request_id, prompt_token_ids, params, extra=extra, structured=structured)
        self._kick()

    def abort(self, request_id: str) -> bool:
        ok = self.engine.abort(request_id)
        self._kick()
        return ok

    def abort_all(self) -> None:
        for rid in self.engine.live_ids():
            self.engine.abort(rid)
        self._kick()

    def set_deterministic(self, on: bool) -> None:
        """Engine.set_deterministic, run on the compute thread between two steps (so no step
        sees half the switch). Raises what it raises (UnsupportedModelError)."""
        self._compute.call(self.engine.set_deterministic, on)

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished

    def _kick(self) -> None:
        """Queue a step unless one is queued or running (it will see the new work:
        the request was added to the engine before this call)."""
        with self._lock:
            if self._armed or not self._started or self._closing or self._failed:
                return
            self._armed = True
            self._idle.clear()
        self._compute.submit(self._step)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except BaseException as e:  # surfaced to the front-end, which owns the exit
            self.events.put(EngineFailed(e))
            with self._lock:
                self._failed, self._armed = True, False
                self._idle.set()
            return
        for o in outputs:
            self.events.put(o)
        with self._lock:
            # Checked under the lock _kick takes: a request added after this check
            # finds _armed False and queues the next step itself.
            self._armed = not self._closing and self.engine.has_unfinished
            if not self._armed:
                self._idle.set()
        if self._armed:
            self._compute.submit(self._step)

    def close(self) -> None:
        """Stop stepping (live requests stay in the engine) once the running step ends."""
        with self._lock:
            self._closing = True
        if not self._compute.is_current:
            self._idle.wait(timeout=30)

    def __enter__(self) -> "Driver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
