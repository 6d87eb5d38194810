"""One Ray worker: an engine in an actor, fed in batches, polled for finished requests.

``EngineWorker`` is a plain class (no ``import ray`` here): ``RayPool`` wraps it
with ``ray.remote`` and runs it as a *threaded* actor, so a ``poll`` that blocks
waiting for results never delays a ``submit``. The engine steps on the local
``Driver``'s thread, exactly as in a single-process ``cbgen run``.

Why polling rather than a push per output: one ``poll`` RPC carries every
request that finished since the last one, so the per-request cost of Ray
falls as load rises, and intermediate per-token outputs never cross the
network (the driver's progress view gets a ``EngineStats`` snapshot instead).

A request is reported only when *all* its ``n`` samples have finished, in one
report. So a worker that dies has delivered each request wholly or not at all,
and the pool can re-queue the rest without ever splitting or duplicating one.
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineConfig, ModelConfig, SamplingParams
from ..engine.engine import EngineStats, SequenceProgress
from ..engine.outputs import RequestOutput


PROGRESS_EVERY = 0.5  # s between sequence lists in a worker's reports (they cost ~1 us a sequence)


@dataclass(frozen=True)
class WorkItem:
    """One request as dispatched to a worker (token ids are made by the driver)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    extra: dict[str, Any] = field(default_factory=dict)
    structured: Any = None          # StructuredOutputsParams: compiled on the worker (plain data travels)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its model is loaded."""
    node: str               # host name of the node it runs on
    pid: int
    model_name: str
    threads: int            # torch threads of its engine
    load_seconds: float


@dataclass(frozen=True)
class WorkerReport:
    """One poll's harvest: whole finished requests, refusals, and the engine's counters."""
    finished: list[list[RequestOutput]]     # each inner list: all samples of one request
    rejected: list[tuple[str, str]]         # (request_id, message) refused by add_request
    stats: EngineStats
    num_live: int                           # requests accepted and not yet reported
    error: str | None = None                # the engine's step raised: this worker is unusable
    sequences: list[SequenceProgress] | None = None  # live sequences, at most every PROGRESS_EVERY s


class EngineWorker:
    """Lives in a Ray actor. ``load`` first; then ``submit`` / ``poll`` / ``abort`` from the pool."""

    def __init__(self) -> None:
        self._driver = None
        self._partial: dict[str, list[RequestOutput]] = {}
        self._rejected: list[tuple[str, str]] = []
        self._error: str | None = None
        self._progress_at = 0.0
        self._aborting = False

    def load(self, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> WorkerInfo:
        """Load the model and start the engine. Raises ``ModelError`` / ``ValueError`` with the reason."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a worker never downloads
        import torch

        from ..compute import compute_thread
        from ..engine.engine import Engine
        from ..models import load_model
        from .driver import Driver

        # Load and build on the compute thread, where the Driver steps: one OpenMP team (cbgen/compute.py).
        ct = compute_thread()
        loaded = ct.call(load_model, model_cfg)
        engine = ct.call(Engine.from_loaded, loaded, engine_cfg)
        gc.freeze()  # as in the CLI: keeps the first full collection out of the early steps
        self._driver = Driver(engine).start()
        return WorkerInfo(socket.gethostname(), os.getpid(), loaded.name, ct.call(torch.get_num_threads),
                          round(loaded.load_seconds, 3))

    def submit(self, items: list[WorkItem]) -> None:
        for it in items:
            try:
                self._driver.submit(it.request_id, it.prompt_token_ids, it.params, extra=it.extra,
                                    structured=it.structured)
            except ValueError as e:
                self._rejected.append((it.request_id, str(e)))
                continue
            if self._aborting:  # a threaded actor may run a submit after a later abort_all
                self._driver.abort(it.request_id)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._driver.abort(rid)

    def abort_all(self) -> None:
        self._aborting = True
        self._driver.abort_all()

    def poll(self, timeout: float) -> WorkerReport:
        """Wait up to ``timeout`` s for the first finished request, then take all that are ready."""

        finished: list[list[RequestOutput]] = []
        deadline = time.monotonic() + timeout
        while not finished and self._error is None:
            left = deadline - time.monotonic()
            try:
                ev = self._driver.events.get(timeout=left) if left > 0 else self._driver.events.get_nowait()
            except queue.Empty:
                break
            while True:
                self._take(ev, finished)
                try:
                    ev = self._driver.events.get_nowait()
                except queue.Empty:
                    break
            if self._rejected:
                break
        rejected, self._rejected = self._rejected, []
        engine = self._driver.engine
        seqs = None
        if time.monotonic() - self._progress_at >= PROGRESS_EVERY:  # for the view's ETA and lines; throttled
            self._progress_at, seqs = time.monotonic(), engine.progress()
        return WorkerReport(finished, rejected, engine.stats(), len(engine.live_ids()), self._error, seqs)

    def _take(self, ev, finished: list[list[RequestOutput]]) -> None:
        from .driver import EngineFailed

        if isinstance(ev, EngineFailed):
            self._error = f"{type(ev.error).__name__}: {ev.error}"
            return
        if not ev.finished:
            return  # per-token outputs stay here; the driver sees counters
        samples = self._partial.setdefault(ev.request_id, [])
        samples.append(ev)
        if len(samples) == ev.num_samples:
            finished.append(self._partial.pop(ev.request_id))

    def shutdown(self) -> None:
        if self._driver is not None:
            self._driver.close()
