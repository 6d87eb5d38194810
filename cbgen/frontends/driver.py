"""Driver: the one loop every front-end uses to run the engine.

The engine steps on a background thread; a front-end submits and aborts from
its own thread (the engine queues both for its next step) and receives every
``RequestOutput`` in ``events``. The engine thread sleeps while nothing is
unfinished and wakes on the next submit.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

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
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="cbgen-engine", daemon=True)

    def start(self) -> "Driver":
        self._thread.start()
        return self

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               extra: dict[str, Any] | None = None, structured: StructuredOutputsParams | None = None) -> None:
        """Raises ValueError (naming the field) for a request the engine refuses."""
        self.engine.add_request(request_id, prompt_token_ids, params, extra=extra, structured=structured)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        ok = self.engine.abort(request_id)
        self._wake.set()
        return ok

    def abort_all(self) -> None:
        for rid in self.engine.live_ids():
            self.engine.abort(rid)
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished

    def _loop(self) -> None:
        while not self._closing:
            if not self.engine.has_unfinished:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # surfaced to the front-end, which owns the exit
                self.events.put(EngineFailed(e))
                return
            for o in outputs:
                self.events.put(o)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> "Driver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
