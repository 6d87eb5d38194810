"""cbgen's own runs: offline workloads, Poisson arrivals, the concurrency sweep, busy-batch TTFT.

Each run takes ``make_engine``, a zero-argument factory, and builds a fresh
engine so that no run sees another's prefix cache. The ``cbgen`` figure runs
through the Driver, the loop `cbgen run` and `cbgen chat` use (stepping on the
compute thread, requests and events on this one); ``Engine.generate`` stepped
inline is kept only as the ``cbgen-direct`` diagnostic. Loops that step the
engine themselves (arrivals, the concurrency sweep) are run on the compute
thread by the caller, so the process never has a second OpenMP team.
"""

from __future__ import annotations

import random
import time
from typing import Callable

from ..config import SamplingParams
from ..engine.engine import Engine
from ..frontends.driver import Driver, EngineFailed
from .measure import RequestTiming, RunResult, now, percentile
from .workloads import Workload, poisson_arrivals

EngineFactory = Callable[[], Engine]


def _params(wl: Workload) -> SamplingParams:
    return SamplingParams(max_new_tokens=wl.max_new_tokens, ignore_eos=wl.ignore_eos)


def _result(system: str, workload: str, wl: Workload, outs: list, wall: float,
            keep_token_ids: bool = False) -> RunResult:
    """A RunResult from the engine's final outputs, in request order."""
    timings = [RequestTiming(len(o.token_ids), o.metrics.ttft, o.metrics.total_time) for o in outs]
    return RunResult(system, workload, wl.num_requests, wl.num_requests, wall, requests=timings,
                     token_ids=[list(o.token_ids) for o in outs] if keep_token_ids else [])


def _drive(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    """Every prompt submitted through a Driver at once; the final outputs (sample 0) in order."""
    final = {}
    with Driver(engine) as driver:
        for i, ids in enumerate(prompts):
            driver.submit(str(i), ids, params)
        while len(final) < len(prompts):
            ev = driver.events.get(timeout=600)
            if isinstance(ev, EngineFailed):
                raise ev.error
            if ev.finished and ev.index == 0:
                final[int(ev.request_id)] = ev
    return [final[i] for i in range(len(prompts))]


def run_cbgen(make_engine: EngineFactory, wl: Workload, system: str = "cbgen") -> RunResult:
    """All requests submitted at t0 through the Driver (as `cbgen run` does); ``cbgen-direct``
    steps ``Engine.generate`` on the compute thread instead (a diagnostic: no event queue)."""
    from ..compute import compute_thread
    engine = make_engine()
    t0 = now()
    if system == "cbgen-direct":
        outs = compute_thread().call(engine.generate, wl.prompts, _params(wl))
    else:
        outs = _drive(engine, wl.prompts, _params(wl))
    res = _result(system, wl.name, wl, outs, now() - t0, keep_token_ids=True)
    st = engine.stats()
    res.notes.append(f"path={'Engine.generate (diagnostic)' if system == 'cbgen-direct' else 'Driver'}, "
                     f"attention={'native' if engine.runner.kernel else 'torch'}, "
                     f"forward={type(engine.model).__name__}, "
                     f"max_num_seqs={engine.config.max_num_seqs}, budget={engine.config.max_num_batched_tokens} "
                     f"tokens/step, {st.num_kv_blocks} KV blocks, {st.num_steps} steps, "
                     f"prefix hit rate {st.prefix_hit_rate:.0%}, "
                     f"{st.num_preemptions} preemptions")
    return res


def run_arrivals(make_engine: EngineFactory, wl: Workload, rate: float, seed: int = 0) -> RunResult:
    """Requests join at Poisson arrival times; TTFT and latency count from each one's arrival."""
    engine = make_engine()
    params = _params(wl)
    offsets = poisson_arrivals(wl.num_requests, rate, seed)
    final = {}
    i = 0
    t0 = now()
    while i < wl.num_requests or engine.has_unfinished:
        t = now() - t0
        while i < wl.num_requests and offsets[i] <= t:
            engine.add_request(str(i), wl.prompts[i], params, arrival_time=t0 + offsets[i])
            i += 1
        if not engine.has_unfinished:
            time.sleep(max(0.0, offsets[i] - (now() - t0)))
            continue
        for o in engine.step():
            if o.finished:
                final[int(o.request_id)] = o
    res = _result("cbgen", "arrivals", wl, [final[i] for i in range(wl.num_requests)], now() - t0)
    res.notes.append(f"Poisson arrivals at {rate} req/s (seed {seed}), last arrival at {offsets[-1]:.1f} s; "
                     "ttft/latency from each request's own arrival")
    return res


def decode_throughput(make_engine: EngineFactory, prompts: list[list[int]], concurrency: int,
                      steps: int) -> dict:
    """Aggregate decode tok/s with ``concurrency`` sequences all decoding.

    The requests prefill first (not timed); then ``steps`` calls of ``engine.step`` are
    timed, each of which forwards one token per sequence per step it runs (several, for
    greedy batches the multi-step path takes: EngineConfig.num_scheduler_steps).
    """
    engine = make_engine()
    # Early joiners decode while later ones prefill: leave room so none finishes in the timed window.
    params = SamplingParams(max_new_tokens=steps + 1024, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(str(i), prompts[i % len(prompts)], params)
    started: set[str] = set()
    while len(started) < concurrency:
        started.update(o.request_id for o in engine.step())
    t0, steps0 = now(), engine.num_steps
    for _ in range(steps):
        outs = engine.step()
        assert len(outs) == concurrency, f"expected {concurrency} decodes, got {len(outs)}"
    dt = now() - t0
    steps = engine.num_steps - steps0
    ctx = sum(len(prompts[i % len(prompts)]) for i in range(concurrency)) / concurrency
    for rid in engine.live_ids():
        engine.abort(rid)
    while engine.has_unfinished:
        engine.step()
    return {"concurrency": concurrency, "steps": steps, "tok_s": round(concurrency * steps / dt, 2),
            "step_ms": round(1000 * dt / steps, 2), "mean_prompt_tokens": round(ctx, 1)}


def busy_batch_ttft(make_engine: EngineFactory, background: list[list[int]], probes: list[list[int]],
                    *, busy: int = 32, seed: int = 0) -> dict:
    """TTFT of a probe submitted while ``busy`` sequences decode.

    The engine steps on the Driver's thread (as in ``cbgen run`` / ``chat``);
    each probe is submitted from this thread at a random moment, so it may land
    mid-step. TTFT is the engine's own (first token - add_request).
    """
    engine = make_engine()
    rng = random.Random(seed)
    bg = SamplingParams(max_new_tokens=4096, ignore_eos=True)
    probe_params = SamplingParams(max_new_tokens=1)
    ttfts, running = [], []
    with Driver(engine) as driver:
        for i in range(busy):
            driver.submit(f"bg{i}", background[i % len(background)], bg)
        started: set[str] = set()
        while len(started) < busy:
            ev = driver.events.get(timeout=120)
            if isinstance(ev, EngineFailed):
                raise ev.error
            started.add(ev.request_id)
        for k, ids in enumerate(probes):
            time.sleep(rng.uniform(0.05, 0.3))
            running.append(engine.stats().num_running)
            driver.submit(f"probe{k}", ids, probe_params)
            while True:
                ev = driver.events.get(timeout=120)
                if isinstance(ev, EngineFailed):
                    raise ev.error
                if ev.request_id == f"probe{k}" and ev.finished:
                    ttfts.append(ev.metrics.ttft)
                    break
        driver.abort_all()
    p50 = percentile(ttfts, 50)
    return {"busy": busy, "probes": len(ttfts), "ttft_s": [round(t, 4) for t in ttfts],
            "ttft_p50_s": round(p50, 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "ttft_max_s": round(max(ttfts), 4), "running_at_submit": running,
            "mean_probe_prompt_tokens": round(sum(map(len, probes)) / len(probes), 1),
            "target_s": 1.0, "holds": p50 < 1.0}
