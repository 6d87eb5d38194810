"""RayPool: the ``Backend`` for ``cbgen run --ray``: N engines in Ray actors, one driver.

Ray Core actors, not a Ray Data pipeline: ``cbgen run`` already owns lazy
reading, admission with backpressure, ordering, resume and signals
(``BatchRun``); what it lacks is engines on other machines. Actors give exactly
that, keep one model load per worker for the whole run, and let the driver
re-queue a dead worker's requests itself, so the no-loss/no-duplicate rule is
decided in one place (here) rather than by a task-retry policy.

Threads: ``BatchRun`` calls ``submit`` / ``abort*`` (they only touch the queue
under ``_lock``); the pool's own thread dispatches, polls and handles deaths.

Invariant (no loss, no duplicate): every submitted request that has not ended
is in exactly one place: ``_queue`` (not yet dispatched) or one live worker's
``in_flight``. A result is accepted only from the worker whose ``in_flight``
holds its id (removed on acceptance), and a dead worker's results are never
read again, so a request re-queued after a death is reported once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import EngineConfig, ModelConfig, SamplingParams
from ..engine.engine import EngineStats, SequenceProgress
from ..engine.outputs import FinishReason, RequestMetrics, RequestOutput
from .backend import BackendLost, Notice, Rejected
from .driver import EngineFailed
from .ray_worker import EngineWorker, WorkerInfo, WorkerReport, WorkItem

RAY_EXTRA = "cbgen[ray]"


class RayUnavailable(Exception):
    """``--ray`` without Ray installed."""


class PoolError(Exception):
    """The pool cannot start (one line: the resources missing, or a worker's load error)."""


def import_ray():
    """``ray``, or ``RayUnavailable`` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: pip install '{RAY_EXTRA}'") from None
    return ray


@dataclass(frozen=True)
class PoolOptions:
    workers: int | None = None           # None: one per node with CPUs
    cpus_per_worker: int | None = None   # None: a node's cores (shared out when workers > nodes)
    address: str | None = None           # None: $RAY_ADDRESS, else a new local instance
    poll_timeout: float = 0.05           # s a worker's poll waits for a first finished request

    def __post_init__(self) -> None:
        for name in ("workers", "cpus_per_worker"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"--{name.replace('_', '-')} {v!r}: expected an integer >= 1")


def in_flight_cap(engine_cfg: EngineConfig) -> int:
    """Requests one worker may hold: its batch plus a refill margin (as ``BatchRun`` locally),
    so a freed slot is refilled at its next step without waiting for the driver."""
    return engine_cfg.max_num_seqs + max(8, engine_cfg.max_num_seqs // 4)


@dataclass(frozen=True)
class WorkerRow:
    """One worker's line in the progress view."""
    name: str
    node: str
    alive: bool
    running: int
    waiting: int
    done: int
    tokens_per_s: float


@dataclass
class _Worker:
    index: int
    actor: Any
    info: WorkerInfo | None = None
    alive: bool = True
    in_flight: dict[str, WorkItem] = field(default_factory=dict)
    poll_ref: Any = None
    stats: EngineStats | None = None
    sequences: list[SequenceProgress] = field(default_factory=list)
    done: int = 0
    rate: deque = field(default_factory=lambda: deque(maxlen=32))  # (monotonic s, generated tokens)

    @property
    def name(self) -> str:
        return f"w{self.index}"

    @property
    def node(self) -> str:
        return self.info.node if self.info else "?"

    @property
    def generated(self) -> int:
        return self.stats.num_generated_tokens if self.stats else 0


def _cause(e: BaseException) -> str:
    """The user-facing line of a Ray error: the original exception for a task error."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _never_started(item: WorkItem) -> RequestOutput:
    """The abort output of a request cancelled before any worker started it (``BatchRun``
    writes no record for it, so ``--resume`` runs it later)."""
    now = time.monotonic()
    m = RequestMetrics(now, None, None, now, len(item.prompt_token_ids), 0, 0)
    return RequestOutput(item.request_id, 0, [], "", "", [], True, FinishReason.ABORT, m,
                         num_samples=item.params.n, extra=item.extra)


class RayPool:
    """The ``Backend`` over Ray workers. ``connect()`` first (errors: ``PoolError``,
    ``RayUnavailable``), then use as a context manager; ``close()`` always."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, opts: PoolOptions | None = None,
                 status: Callable[[str], None] | None = None) -> None:
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.opts = opts or PoolOptions()
        self.status = status or (lambda _m: None)
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.workers: list[_Worker] = []
        self.cap = in_flight_cap(engine_cfg)
        self._ray = None
        self._owns_ray = False
        self._lock = threading.Lock()
        self._queue: deque[WorkItem] = deque()
        self._aborting = False
        self._abort_sent = False              # abort_all forwarded to the workers
        self._aborts: list[str] = []          # single aborts for the pool thread to route
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="cbgen-ray-pool", daemon=True)

    # ---- start-up ---------------------------------------------------------------
    def connect(self) -> "RayPool":
        """Join or start Ray, place the workers and load the model in each (in parallel)."""
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            address = self.opts.address or os.environ.get("RAY_ADDRESS")
            # Workers' own logs stay on their nodes: the driver's stderr is for cbgen's status.
            quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address:
                self.status(f"ray: connecting to {address}")
                ray.init(address=address, **quiet)
            else:
                self.status("ray: starting a local instance (set RAY_ADDRESS to use a cluster)")
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            self._owns_ray = True
        workers, per = self._plan(ray)
        cls = ray.remote(EngineWorker)
        model_cfg = dataclasses.replace(self.model_cfg, threads=per)  # torch threads = its Ray CPUs
        for i in range(workers):
            actor = cls.options(num_cpus=per, max_concurrency=4, max_restarts=0,
                                scheduling_strategy="SPREAD").remote()
            self.workers.append(_Worker(i, actor))
        self.status(f"ray: {workers} workers x {per} CPUs, loading the model in each")
        loads = {w.actor.load.remote(model_cfg, self.engine_cfg): w for w in self.workers}
        while loads:
            ready, _ = ray.wait(list(loads), num_returns=1)
            w = loads.pop(ready[0])
            try:
                w.info = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - any failure to load fails the run, with its reason
                raise PoolError(f"Ray worker {w.name} cannot start: {_cause(e)}") from None
        nodes = sorted({w.node for w in self.workers})
        self.status(f"ray: {workers} workers ready on {len(nodes)} node(s): {', '.join(nodes)}")
        return self

    def _plan(self, ray) -> tuple[int, int]:
        """(workers, CPUs per worker), checked against the cluster's nodes so a request
        that cannot be placed fails now instead of waiting forever."""
        cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        cpus = [c for c in cpus if c > 0]
        if not cpus:
            raise PoolError("the Ray cluster has no node with CPUs")
        workers = self.opts.workers or len(cpus)
        per = self.opts.cpus_per_worker or max(1, min(max(cpus), sum(cpus) // workers))
        if per > max(cpus):
            raise PoolError(f"--cpus-per-worker {per}: no Ray node has that many CPUs (largest: {max(cpus)})")
        fits = sum(c // per for c in cpus)
        if workers > fits:
            raise PoolError(f"--workers {workers} x {per} CPUs do not fit the Ray cluster (nodes' CPUs: "
                            f"{', '.join(map(str, cpus))}; room for {fits}): lower --workers or --cpus-per-worker")
        return workers, per

    # ---- Backend: called from BatchRun's thread ---------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self.cap * max(1, len(self.workers))

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               extra: dict[str, Any] | None = None, structured=None) -> None:
        with self._lock:
            self._queue.append(WorkItem(request_id, list(prompt_token_ids), params, dict(extra or {}), structured))

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._aborts.append(request_id)
        return True

    def abort_all(self) -> None:
        with self._lock:
            self._aborting = True

    def progress_view(self):
        from .ray_progress import RayProgressView
        return RayProgressView(self)

    # ---- figures (engine-like, for ProgressView) -----------------------------------------
    def progress(self) -> list[SequenceProgress]:
        """Live sequences of all live workers, as last reported (up to ``PROGRESS_EVERY`` s old)."""
        return [s for w in self._live() for s in w.sequences]

    @property
    def num_generated_tokens(self) -> int:
        return sum(w.generated for w in self.workers)

    def stats(self) -> EngineStats:
        live = [w.stats for w in self.workers if w.alive and w.stats is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        with self._lock:
            queued = len(self._queue)
        return EngineStats(
            num_running=sum(s.num_running for s in live), num_waiting=sum(s.num_waiting for s in live) + queued,
            kv_usage=mean([s.kv_usage for s in live]), num_kv_blocks=sum(s.num_kv_blocks for s in live),
            prefix_hit_rate=mean([s.prefix_hit_rate for s in live]),
            num_preemptions=sum(s.num_preemptions for s in live),
            num_kv_exhausted=sum(s.num_kv_exhausted for s in live), num_steps=sum(s.num_steps for s in live),
            num_forward_tokens=sum(s.num_forward_tokens for s in live),
            num_generated_tokens=self.num_generated_tokens)

    def worker_rows(self) -> list[WorkerRow]:
        rows = []
        for w in self.workers:
            s = w.stats
            r = list(w.rate)
            tps = (r[-1][1] - r[0][1]) / (r[-1][0] - r[0][0]) if len(r) > 1 and r[-1][0] > r[0][0] else 0.0
            rows.append(WorkerRow(w.name, w.node, w.alive, s.num_running if s and w.alive else 0,
                                  s.num_waiting if s and w.alive else 0, w.done, tps if w.alive else 0.0))
        return rows

    # ---- the pool thread --------------------------------------------------------------------
    def _live(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def _loop(self) -> None:
        ray = self._ray
        for w in self.workers:
            w.poll_ref = w.actor.poll.remote(self.opts.poll_timeout)
        try:
            while not self._closing:
                self._route_aborts()
                self._dispatch()
                refs = {w.poll_ref: w for w in self._live()}
                if not refs:
                    return
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.01)
                for ref in ready:
                    self._collect(refs[ref], ref)
        except BaseException as e:  # noqa: BLE001 - surfaced to BatchRun, which owns the exit
            self.events.put(EngineFailed(e))

    def _dispatch(self) -> None:
        """Deal queued requests to live workers, least loaded first, none beyond ``cap``."""
        live = self._live()
        if not live:
            return
        batches: dict[int, list[WorkItem]] = {}
        with self._lock:
            while self._queue:
                w = min(live, key=lambda x: len(x.in_flight))
                if len(w.in_flight) >= self.cap:
                    break
                item = self._queue.popleft()
                w.in_flight[item.request_id] = item
                batches.setdefault(w.index, []).append(item)
        for i, items in batches.items():
            self.workers[i].actor.submit.remote(items)  # a dead actor fails its next poll instead

    def _route_aborts(self) -> None:
        """Cancel queued requests here (they never started) and forward the rest to their workers."""
        with self._lock:
            aborts, self._aborts = self._aborts, []
            abort_all = self._aborting and not self._abort_sent
            self._abort_sent = self._abort_sent or abort_all
            dropped = [i for i in self._queue if self._aborting or i.request_id in aborts]
            for item in dropped:
                self._queue.remove(item)
        for item in dropped:
            self.events.put(_never_started(item))
        for w in self._live():
            if abort_all:
                w.actor.abort_all.remote()
            elif mine := [rid for rid in aborts if rid in w.in_flight]:
                w.actor.abort.remote(mine)

    def _collect(self, w: _Worker, ref) -> None:
        try:
            rep: WorkerReport = self._ray.get(ref)
        except Exception as e:  # noqa: BLE001 - RayActorError, ActorDiedError, a failed poll: the worker is gone
            self._lost(w, _cause(e))
            return
        w.stats = rep.stats
        if rep.sequences is not None:
            w.sequences = rep.sequences
        w.rate.append((time.monotonic(), rep.stats.num_generated_tokens))
        for outs in rep.finished:
            if w.in_flight.pop(outs[0].request_id, None) is None:
                continue  # not this worker's any more (cannot happen while the invariant holds)
            w.done += 1
            for o in outs:
                self.events.put(o)
        for rid, message in rep.rejected:
            if w.in_flight.pop(rid, None) is not None:
                self.events.put(Rejected(rid, message))
        if rep.error is not None:
            self._lost(w, f"its engine failed: {rep.error}")
            return
        w.poll_ref = w.actor.poll.remote(self.opts.poll_timeout)

    def _lost(self, w: _Worker, reason: str) -> None:
        """Re-queue a dead worker's requests at the front (they were admitted first)."""
        w.alive = False
        try:  # one merely unreachable must not go on generating what others now redo
            self._ray.kill(w.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        items = list(w.in_flight.values())
        w.in_flight.clear()
        with self._lock:
            aborting = self._aborting
            if not aborting:
                self._queue.extendleft(reversed(items))
        if aborting:  # the user is stopping: no record, so --resume redoes them
            for item in items:
                self.events.put(_never_started(item))
        live = self._live()
        if live:
            self.events.put(Notice(f"Ray worker {w.name} on {w.node} died ({reason}); re-queued its "
                                   f"{len(items)} in-flight requests to the {len(live)} other worker(s)"))
        else:
            self.events.put(EngineFailed(BackendLost(
                f"all {len(self.workers)} Ray workers died (the last, {w.name} on {w.node}: {reason})")))

    # ---- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> "RayPool":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pool thread, kill the actors, and shut Ray down if this pool started it."""
        self._closing = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._ray is None:
            return
        for w in self.workers:
            try:
                self._ray.kill(w.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False
