"""The --dry-run run model: step-cost fit and the scheduler replay, checked against the real
Scheduler driven step by step (no torch, no model)."""

from __future__ import annotations

import random

import pytest

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.block_manager import BlockManager
from cbgen.engine.request import Request
from cbgen.engine.scheduler import Scheduler
from cbgen.frontends.eta import LengthSample, SimRow, StepCost, StepSample, estimate, simulate

COST = StepCost(fixed=0.02, per_token=0.0001, per_row=0.0004, per_context=2e-6)


def scheduler_replay(rows: list[SimRow], cost: StepCost, max_num_seqs: int, budget: int, num_blocks: int,
                     block_size: int = 16) -> tuple[float, int, int]:
    """The real Scheduler + BlockManager on ``rows`` (distinct prompts, exact output lengths),
    with ``cost`` summed over the steps it schedules."""
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=block_size,
                       num_kv_blocks=num_blocks, enable_prefix_caching=False)
    s = Scheduler(cfg, BlockManager(num_blocks, block_size, False), 100_000)
    for i, r in enumerate(rows):
        prompt = [1000 * i + k for k in range(r.context_tokens)]
        s.add(Request(str(i), prompt, SamplingParams(max_new_tokens=r.output_tokens, ignore_eos=True), frozenset()))
    t, steps = 0.0, 0
    while s.has_unfinished:
        out = s.schedule()
        dec = [x for x in out.scheduled if x.request.num_computed_tokens >= x.request.num_prompt_tokens]
        prefill = sum(x.num_tokens for x in out.scheduled) - len(dec)
        t += cost(len(dec), sum(x.start for x in dec), prefill)
        steps += 1
        s.update(out, [7] * sum(x.samples for x in out.scheduled), None)
    return t, steps, s.num_preemptions


def _rows(n, seed=0, prompt=(5, 120), out=(1, 60)):
    rng = random.Random(seed)
    return [SimRow(p, p, rng.randint(*out)) for p in (rng.randint(*prompt) for _ in range(n))]


@pytest.mark.parametrize("n, slots, budget", [(1, 4, 64), (10, 4, 64), (40, 8, 128), (40, 64, 512), (7, 2, 16)])
def test_simulation_matches_the_scheduler_without_kv_pressure(n, slots, budget):
    rows = _rows(n, seed=n)
    want_t, want_steps, _ = scheduler_replay(rows, COST, slots, budget, num_blocks=10_000)
    got = simulate(rows, COST, slots, budget)
    assert got.steps == want_steps
    assert got.seconds == pytest.approx(want_t, rel=0.02)


def test_simulation_tracks_the_scheduler_when_the_kv_pool_fills():
    rows = _rows(60, seed=3, prompt=(20, 60), out=(40, 120))
    want_t, want_steps, want_pre = scheduler_replay(rows, COST, 32, 256, num_blocks=120)
    got = simulate(rows, COST, 32, 256, kv_tokens=120 * 16)
    assert want_pre > 0 and got.preemptions > 0
    assert got.seconds == pytest.approx(want_t, rel=0.1)
    free = simulate(rows, COST, 32, 256)
    assert free.preemptions == 0 and free.seconds < got.seconds  # a full pool costs time


def test_fit_recovers_the_step_cost_and_ignores_a_stalled_step():
    rng = random.Random(1)
    samples = []
    for _ in range(60):
        rows, ctx, pre = rng.randint(1, 128), rng.randint(0, 30_000), rng.choice([0, 0, rng.randint(1, 400)])
        samples.append(StepSample(COST(rows, ctx, pre), rows, ctx, pre))
    samples.append(StepSample(5.0, 10, 1000, 0))   # another process took the CPU for this one
    fit = StepCost.fit(samples)
    for name in ("fixed", "per_token", "per_row", "per_context"):
        assert getattr(fit, name) == pytest.approx(getattr(COST, name), rel=1e-3)


def test_fit_keeps_coefficients_non_negative():
    # Time falls with the rows here (noise); a plain least squares would give per_row < 0.
    samples = [StepSample(0.05 - 0.0001 * r, r, 0, 0) for r in range(1, 20)]
    fit = StepCost.fit(samples)
    assert min(fit.fixed, fit.per_token, fit.per_row, fit.per_context) >= 0
    with pytest.raises(ValueError, match="at least 2"):
        StepCost.fit(samples[:1])


def test_estimate_scales_with_answer_length_and_states_a_range():
    prompts, limits, n = [50] * 200, [256] * 200, [1] * 200
    short = [LengthSample(64, 256, True)] * 8
    long = [LengthSample(256, 256, True)] * 8
    e_short = estimate(prompts, limits, n, short, COST, 64, 512, 10**9)
    e_long = estimate(prompts, limits, n, long, COST, 64, 512, 10**9)
    assert e_short.output_tokens == 200 * 64 and e_long.output_tokens == e_long.max_output_tokens == 200 * 256
    assert e_long.seconds > 2.5 * e_short.seconds
    mixed = [LengthSample(g, 256, True) for g in (30, 80, 200, 256)] + [LengthSample(40, 256, False)]
    e = estimate(prompts, limits, n, mixed, COST, 64, 512, 10**9)
    assert e.low < e.seconds < e.high and e.output_low < e.output_tokens <= e.output_high <= e.max_output_tokens
    # The cut sequence counts at its limit in the point estimate.
    assert e.output_tokens == sum(round(f * 256) for f in ([30 / 256, 80 / 256, 200 / 256, 1, 1] * 40))
