"""What one system did on one workload, and the figures derived from it. No torch.

Timing contract for the offline workloads (uniform, real): every request is
submitted at ``t0``; ``ttft`` is first token - t0 and ``latency`` is finish - t0,
so queueing behind earlier requests counts. ``tpot`` is (finish - first token)
/ (tokens - 1). A system that cannot expose a figure leaves it None and says
why in ``notes``.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field

from ..engine.outputs import mean_tpot


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, ``q`` in [0, 100]; None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def max_rss_mb() -> float:
    """The process-wide high-water mark since start (``getrusage``): never goes down."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024


class RssSampler:
    """Peak RSS of this process while the ``with`` block runs (sampled every ``interval`` s).

    RSS is process-wide: it includes the model weights and whatever earlier
    systems left allocated, hence ``start_mb`` alongside ``peak_mb``.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import psutil
        self._proc = psutil.Process()   # once: the sampler runs during timed work
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def _rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def __enter__(self) -> "RssSampler":
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


@dataclass
class RequestTiming:
    """One request, times in seconds from the workload start (or from its own arrival)."""
    num_tokens: int
    ttft: float | None = None
    latency: float | None = None

    @property
    def tpot(self) -> float | None:
        return mean_tpot(self.ttft, self.latency, self.num_tokens)


@dataclass
class RunResult:
    """One system on one workload. ``wall_s`` covers generation only (setup is ``setup_s``)."""
    system: str
    workload: str
    num_requests: int             # requests in the workload
    measured_requests: int        # requests actually run (< num_requests when capped)
    wall_s: float                 # over the measured requests
    requests: list[RequestTiming] = field(default_factory=list)   # one per measured request
    setup_s: float | None = None
    peak_rss_mb: float | None = None
    start_rss_mb: float | None = None
    load_avg: tuple[float, float] | None = None   # 1-min load average before and after
    cpu_s: float | None = None    # process CPU time (all threads) during the run
    notes: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # for the agreement check
    meta: dict = field(default_factory=dict)   # system parameters a row is told apart by (llama.cpp: gguf, np)

    @property
    def generated_tokens(self) -> int:
        return sum(t.num_tokens for t in self.requests)

    @property
    def extrapolated(self) -> bool:
        """Only some of the requests ran; whole-workload times are projected from them."""
        return self.measured_requests < self.num_requests

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def req_s(self) -> float:
        return self.measured_requests / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def projected_wall_s(self) -> float:
        """Wall time for the whole workload: measured, or scaled per request when capped."""
        return self.wall_s * self.num_requests / self.measured_requests

    def summary(self) -> dict:
        r = lambda v, d=4: None if v is None else round(v, d)  # noqa: E731
        ttfts = [t.ttft for t in self.requests]
        tpots = [t.tpot for t in self.requests]
        lats = [t.latency for t in self.requests]
        return {
            "system": self.system, "workload": self.workload,
            "num_requests": self.num_requests, "measured_requests": self.measured_requests,
            "extrapolated": self.extrapolated,
            "generated_tokens": self.generated_tokens,
            "wall_s": r(self.wall_s, 3), "projected_wall_s": r(self.projected_wall_s, 3),
            "setup_s": r(self.setup_s, 3),
            "tok_s": r(self.tok_s, 2), "req_s": r(self.req_s, 4),
            "ttft_p50_s": r(percentile(ttfts, 50)), "ttft_p99_s": r(percentile(ttfts, 99)),
            "tpot_p50_s": r(percentile(tpots, 50)), "tpot_p99_s": r(percentile(tpots, 99)),
            "latency_p50_s": r(percentile(lats, 50)), "latency_p99_s": r(percentile(lats, 99)),
            "peak_rss_mb": r(self.peak_rss_mb, 1), "start_rss_mb": r(self.start_rss_mb, 1),
            "cpu_s": r(self.cpu_s, 3),
            "load_avg_before_after": list(self.load_avg) if self.load_avg else None,
            "notes": self.notes,
            **self.meta,
        }


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s in which some runnable task waited for a CPU (None if unavailable)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg60=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def now() -> float:
    """The clock every system is timed with (cbgen's engine uses time.monotonic too)."""
    return time.monotonic()
