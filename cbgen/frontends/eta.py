"""A model of a ``cbgen run``'s wall time, for ``--dry-run``. No torch, no engine.

Two parts, both fed by the probe (``probe.py``):

* ``StepCost``: seconds per engine step as a linear function of what the step
  does, ``fixed + per_token * tokens forwarded (decode rows + prompt tokens
  prefilled) + per_row * decode rows + per_context * context tokens read by
  those rows``, fitted by non-negative least squares to the probe's measured
  steps. The terms are where a CPU step spends its time: streaming the weights
  once (fixed), one GEMM row per token forwarded, whether it decodes or
  prefills, the LM head and sampling of each decoding row, and attention
  reading each row's KV context. A decode row and a prompt token cost the same
  GEMM row: with them as separate terms, the probe's first steps (the step's
  budget split between both, so their sum is constant) could not tell them
  apart, and the fit put a decode row at a tenth of its cost (ETA -67% on the
  271 dev prompts at 256 sequences, NOTES.md change 21).
* ``simulate``: the scheduler's shape (``engine/scheduler.py``) replayed on
  counters: up to ``slots`` sequences, running decodes first, FIFO admission,
  prefill chunks within the step's token budget; pure-decode stretches are
  summed in closed form, so the cost is O(inputs log slots), not O(steps).

It leaves out the prefix cache except as a fraction of each prompt (the probe's
hit rate) and between the ``n`` samples of one prompt.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""
    seconds: float
    num_decode: int            # rows that forwarded one token
    context_tokens: int        # sum over those rows of the tokens already in their KV context
    num_prefill_tokens: int    # prompt tokens forwarded (prefill chunks)


@dataclass(frozen=True)
class StepCost:
    """Seconds for one step (see the module docstring). All coefficients >= 0."""
    fixed: float
    per_token: float     # a token forwarded: a decode row or a prompt token prefilled
    per_row: float       # on top of per_token, a decoding row (LM head, sampling)
    per_context: float   # a KV token read by a decoding row

    def __call__(self, rows: int, context: int, prefill: int) -> float:
        return (self.fixed + self.per_token * (rows + prefill) + self.per_row * rows
                + self.per_context * context)

    @classmethod
    def fit(cls, samples: Sequence[StepSample]) -> "StepCost":
        """Non-negative least squares (every subset of the four terms is solved, the best
        non-negative one kept), then once more without steps whose residual is over
        3x the median: a step stalled by another process must not set the rate.

        Raises ValueError with fewer than 2 samples.
        """
        if len(samples) < 2:
            raise ValueError(f"samples: need at least 2 measured steps, got {len(samples)}")
        cost = cls._nnls(samples)
        resid = [abs(s.seconds - cost(s.num_decode, s.context_tokens, s.num_prefill_tokens)) for s in samples]
        limit = 3 * statistics.median(resid)
        kept = [s for s, r in zip(samples, resid) if r <= limit]
        return cls._nnls(kept) if limit > 0 and len(kept) >= 2 else cost

    @classmethod
    def _nnls(cls, samples: Sequence[StepSample]) -> "StepCost":
        import numpy as np
        x = np.array([[1.0, s.num_decode + s.num_prefill_tokens, s.num_decode, s.context_tokens] for s in samples])
        y = np.array([s.seconds for s in samples])
        best, best_err = np.zeros(4), float(np.sum(y ** 2))
        for k in range(1, 5):
            for cols in itertools.combinations(range(4), k):
                coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
                if np.any(coef < 0):
                    continue
                err = float(np.sum((x[:, cols] @ coef - y) ** 2))
                if err < best_err - 1e-15:
                    full = np.zeros(4)
                    full[list(cols)] = coef
                    best, best_err = full, err
        return cls(*(float(c) for c in best))


@dataclass(frozen=True)
class SimRow:
    """One sequence of the run: ``context_tokens`` of prompt, of which ``prefill_tokens`` must be
    computed (fewer for the 2nd.. samples of a prompt, which share its cached blocks)."""
    context_tokens: int
    prefill_tokens: int
    output_tokens: int         # >= 1


@dataclass(frozen=True)
class SimResult:
    seconds: float
    steps: int
    preemptions: int


class _Seq:
    """A sequence in ``simulate``: ``context`` tokens to hold, ``todo`` of them still to prefill,
    ``out`` tokens still to generate; once decoding, it joined at ``joined`` and ends at ``finish``."""
    __slots__ = ("context", "todo", "out", "joined", "finish", "alive")

    def __init__(self, context: int, todo: int, out: int) -> None:
        self.context, self.todo, self.out = context, max(todo, 1), out
        self.joined = self.finish = 0
        self.alive = True


def simulate(rows: Iterable[SimRow], cost: StepCost, slots: int, max_batched_tokens: int,
             kv_tokens: int | None = None) -> SimResult:
    """Replay a run of ``rows`` (in admission order) and sum ``cost`` over its steps.

    With ``kv_tokens``, the KV pool holds that many tokens: a sequence is admitted
    only when its prompt fits, and when the decodes outgrow the pool the newest
    decoding sequence is preempted and later recomputed (prompt + its output so
    far), as ``Scheduler._preempt`` does.
    """
    kv = kv_tokens if kv_tokens is not None else math.inf
    waiting = deque(_Seq(r.context_tokens, r.prefill_tokens, r.output_tokens) for r in rows)
    prefilling: deque[_Seq] = deque()
    running: list[_Seq] = []                   # decoding, in admission order (dead ones skipped)
    finishes: list[tuple[int, int, _Seq]] = []  # heap of (step it finishes, tie-break, seq)
    n_dec = ctx = held = step = preemptions = 0   # held: KV tokens of the prefilling sequences
    t = 0.0
    tie = itertools.count()

    def preempt_newest() -> None:
        nonlocal n_dec, ctx, preemptions
        seq = running.pop()
        while not seq.alive:
            seq = running.pop()
        seq.alive = False
        generated = 1 + step - seq.joined
        tokens = seq.context + generated
        ctx -= tokens
        n_dec -= 1
        preemptions += 1
        waiting.appendleft(_Seq(tokens, tokens, seq.out - generated))

    while waiting or prefilling or n_dec:
        while n_dec > 1 and ctx + held + n_dec > kv:
            preempt_newest()
        idle = not prefilling and not n_dec
        can_admit = waiting and n_dec < slots and (idle or ctx + held + waiting[0].context <= kv)
        if not prefilling and not can_admit:
            # Nothing changes but the contexts until a sequence finishes (or the pool fills).
            k = finishes[0][0] - step
            if kv != math.inf:
                k = max(1, min(k, int((kv - ctx - held) // n_dec)))
            t += k * cost(n_dec, 0, 0) + cost.per_context * (k * ctx + n_dec * k * (k - 1) / 2)
            ctx += n_dec * k
            step += k
        else:
            while waiting and n_dec + len(prefilling) < slots and (
                    not (prefilling or n_dec) or ctx + held + waiting[0].context <= kv):
                seq = waiting.popleft()
                prefilling.append(seq)
                held += seq.context
            budget, done = max_batched_tokens - n_dec, 0
            for seq in prefilling:
                take = min(seq.todo, budget - done)
                if take <= 0:
                    break
                seq.todo -= take
                done += take
            t += cost(n_dec, ctx, done)
            step += 1
            ctx += n_dec
            while prefilling and prefilling[0].todo == 0:
                seq = prefilling.popleft()
                held -= seq.context
                seq.out -= 1                     # its first token came with the prefill
                if seq.out > 0:
                    seq.joined, seq.finish = step, step + seq.out
                    heapq.heappush(finishes, (seq.finish, next(tie), seq))
                    running.append(seq)
                    n_dec += 1
                    ctx += seq.context + 1
        while finishes and finishes[0][0] <= step:
            _, _, seq = heapq.heappop(finishes)
            if seq.alive:
                seq.alive = False
                ctx -= seq.context + 1 + step - seq.joined
                n_dec -= 1
    return SimResult(t, step, preemptions)


@dataclass(frozen=True)
class LengthSample:
    """One probe sequence run with its line's own parameters."""
    generated: int
    limit: int                 # its max_new_tokens within the context
    finished: bool             # False: cut at the probe's time limit (it would have gone on)

    @property
    def fraction(self) -> float:
        return self.generated / self.limit if self.finished else 1.0


@dataclass(frozen=True)
class Estimate:
    seconds: float             # point estimate (cut probe sequences counted at their limit)
    low: float                 # output fractions 2 standard errors lower, cut sequences at what they had
    high: float                # 2 standard errors higher
    output_tokens: int
    output_low: int
    output_high: int
    max_output_tokens: int
    preemptions: int           # in the point estimate: sequences the full KV pool sends back


def _shifted(fractions: list[float], delta: float) -> list[float]:
    return [min(1.0, max(0.0, f + delta)) for f in fractions]


def estimate(prompt_tokens: Sequence[int], limits: Sequence[int], num_samples: Sequence[int],
             lengths: Sequence[LengthSample], cost: StepCost, max_num_seqs: int, max_batched_tokens: int,
             kv_tokens: int, block_size: int = 16, cached_fraction: float = 0.0) -> Estimate:
    """Expected wall time of generating for every input.

    Input ``i`` (``prompt_tokens[i]``, limit ``limits[i]``, ``num_samples[i]``
    samples) gets the output fraction of length sample ``i mod len(lengths)``
    (so the spread of lengths, not only their mean, reaches the tail of the
    run). ``cached_fraction`` of each first sample's prompt is served by the
    prefix cache (the probe's hit rate: shared system prompts); later samples
    prefill only their last partial block. ``kv_tokens`` is the KV pool (see ``simulate``).
    Raises ValueError when ``lengths`` is empty.
    """
    if not lengths:
        raise ValueError("lengths: need at least one probe sequence")
    point = [s.fraction for s in lengths]
    seen = [s.generated / s.limit for s in lengths]
    se = statistics.stdev(point) / math.sqrt(len(point)) if len(point) > 1 else 0.5
    total_max = sum(m * n for m, n in zip(limits, num_samples))

    def rows_for(fractions: list[float]) -> list[SimRow]:
        rows = []
        for i, (p, m, n) in enumerate(zip(prompt_tokens, limits, num_samples)):
            out = max(1, round(fractions[i % len(fractions)] * m))
            first = max(1, round(p * (1 - cached_fraction)))
            rows += [SimRow(p, first if k == 0 else p % block_size, out) for k in range(n)]
        return rows

    def run(fractions: list[float]) -> tuple[float, int, int]:
        rows = rows_for(fractions)
        sim = simulate(rows, cost, max_num_seqs, max_batched_tokens, kv_tokens)
        return sim.seconds, sum(r.output_tokens for r in rows), sim.preemptions

    seconds, out, preemptions = run(point)
    low, out_low, _ = run(_shifted(seen, -2 * se))
    high, out_high, _ = run(_shifted(point, 2 * se))
    return Estimate(seconds, min(low, seconds), max(high, seconds), out, min(out_low, out), max(out_high, out),
                    total_max, preemptions)
