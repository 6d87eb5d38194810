"""A short measured probe of this machine through the real engine, for ``--dry-run``.

Three parts, all on the run's own engine (same model, dtype, threads, kernels,
``max_num_seqs`` and token budget) and on the run's own prompts:

1. warm-up: one tiny request, untimed (first-forward set-up is not a rate);
2. concurrency: sampled prompts at once, as the run would start, each decoding
   (``ignore_eos``) long enough that all of them are prefilled and then decode
   together for ``decode_steps`` steps: prefill-chunk and big-batch decode
   steps. As many as the run will run at once (``rows``), but no more than
   ``PREFILL_STEPS`` full steps of prompt tokens, so that the big-batch decode
   steps happen within the part's time: at 256 rows the dev prompts' prefill
   alone outlasted it, the probe measured only steps that split the budget
   between prefill and decode, and the ETA came out 67% low (NOTES.md change
   21). The step cost is linear in the rows, so a measured 50 extrapolates;
3. lengths: ``length_samples`` sampled prompts with their own parameters, run
   to their natural end (EOS, stop, limit) or until ``length_limit``: how long
   the answers are, and small-batch decode steps. This part is given far more
   time than the rest because a cut answer only says "at least this long":
   counted at its ``max_new_tokens`` it biases the ETA high (+35% on the 271
   dev prompts on a float32 CPU, where a 15 s probe let none of 16 end). A
   batch of 16 decodes at about the speed of one sequence, so the part needs
   about ``max_new_tokens`` decode steps, ~60 s at 256 tokens on a slow CPU.

Every engine step is timed with what it did (``eta.StepSample``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from dataclasses import dataclass

from ..config import SamplingParams
from ..engine.engine import Engine
from ..engine.outputs import FinishReason
from .eta import LengthSample, StepSample
from .validate import CheckedPrompt


PREFILL_STEPS = 8   # the concurrency part's prompt tokens: at most this many full steps' budget


@dataclass(frozen=True)
class ProbeResult:
    steps: list[StepSample]
    lengths: list[LengthSample]
    rows: int                  # sequences the run will have at once (min(inputs, max_num_seqs))
    probe_rows: int            # sequences at once in the concurrency part (<= rows)
    prefix_hit_rate: float     # prompt tokens the prefix cache served in the concurrency part
    seconds: float             # wall time of the whole probe

    @property
    def num_cut(self) -> int:
        """Length samples the time limit cut (their answers would have gone on)."""
        return sum(not s.finished for s in self.lengths)


def timed_step(engine: Engine) -> tuple[StepSample, list]:
    """``engine.step()`` timed, with its decode rows, their context and its prefill tokens. A call
    that ran several greedy steps at once (EngineConfig.num_scheduler_steps) gives their mean:
    the ETA replays the scheduler one step at a time."""
    decoding = [s for s in engine.progress() if s.state == "decode"]
    forwarded, steps = engine.runner.num_forward_tokens, engine.num_steps
    t0 = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - t0
    n = max(1, engine.num_steps - steps)
    prefill = engine.runner.num_forward_tokens - forwarded - n * len(decoding)
    return StepSample(seconds / n, len(decoding), sum(s.num_computed_tokens for s in decoding),
                      max(prefill, 0)), outputs


def _drain(engine: Engine, deadline: float, steps: list[StepSample], min_steps: int = 3,
           stop: threading.Event | None = None) -> dict[tuple[str, int], object]:
    """Step until nothing is live or ``deadline`` (then abort the rest, but not before ``min_steps``
    steps were measured: a fit needs points), or at once when ``stop`` is set; the last output
    per sample."""
    last: dict[tuple[str, int], object] = {}
    aborted = False
    first = len(steps)
    while engine.has_unfinished:
        if not aborted and ((stop is not None and stop.is_set())
                            or (time.monotonic() > deadline and len(steps) - first >= min_steps)):
            for rid in engine.live_ids():
                engine.abort(rid)
            aborted = True
        sample, outputs = timed_step(engine)
        if not aborted and sample.num_decode + sample.num_prefill_tokens:
            steps.append(sample)
        for o in outputs:
            last[(o.request_id, o.index)] = o
    return last


def _probe_params(p: SamplingParams, new_tokens: int) -> SamplingParams:
    return dataclasses.replace(p, max_new_tokens=new_tokens, min_new_tokens=0, ignore_eos=True, n=1,
                               stop=(), stop_token_ids=())


def run_probe(engine: Engine, sample: list[CheckedPrompt], *, rows: int, length_samples: int = 48,
              decode_steps: int = 8, time_limit: float = 15.0, length_limit: float = 90.0,
              stop: threading.Event | None = None) -> ProbeResult:
    """Measure ``engine`` on ``sample`` (random valid inputs with token ids) after a warm-up request.

    The concurrency part gets at most 45% of ``time_limit`` seconds. The lengths
    part runs until its sequences end, or until ``length_limit`` seconds from the
    probe's start (never less than ``time_limit``); a sequence still running
    then is aborted and reported as cut (``LengthSample.finished`` False).
    ``stop`` (set from another thread, e.g. on Ctrl-C): abort what runs at the next step and
    return at once, the engine left idle. Raises ValueError for an empty sample.
    """
    if not sample:
        raise ValueError("sample: need at least one valid input to probe")
    engine.generate([sample[0].token_ids[:8]], SamplingParams(max_new_tokens=2))
    start = time.monotonic()
    steps: list[StepSample] = []

    rows = max(1, min(rows, engine.config.max_num_seqs))
    chosen, prompt_tokens = [], 0
    for p in itertools.islice(itertools.cycle(sample), rows):
        prompt_tokens += p.num_prompt_tokens
        if chosen and prompt_tokens > PREFILL_STEPS * engine.config.max_num_batched_tokens:
            break
        chosen.append(p)
    budget = max(16, engine.config.max_num_batched_tokens - len(chosen))
    new_tokens = math.ceil(sum(p.num_prompt_tokens for p in chosen) / budget) + decode_steps
    bm = engine.block_manager
    hits0, looked0 = bm.prefix_hits, bm.prefix_queries
    for i, p in enumerate(chosen):
        limit = min(new_tokens, engine.max_model_len - p.num_prompt_tokens)
        engine.add_request(f"probe-{i}", p.token_ids, _probe_params(p.params, max(1, limit)))
    _drain(engine, start + 0.45 * time_limit, steps, stop=stop)
    looked = bm.prefix_queries - looked0
    hit_rate = (bm.prefix_hits - hits0) / looked if looked else 0.0

    measured = sample[:length_samples]
    for i, p in enumerate(measured):
        engine.add_request(f"length-{i}", p.token_ids, p.params)
    last = _drain(engine, start + max(time_limit, length_limit), steps, stop=stop)
    lengths = []
    for i, p in enumerate(measured):
        limit = min(p.params.max_new_tokens, engine.max_model_len - p.num_prompt_tokens)
        for k in range(p.params.n):
            o = last.get((f"length-{i}", k))
            generated = len(o.token_ids) if o is not None else 0
            lengths.append(LengthSample(generated, limit, o is not None and o.finish_reason is not FinishReason.ABORT))
    return ProbeResult(steps, lengths, rows, len(chosen), hit_rate, time.monotonic() - start)
