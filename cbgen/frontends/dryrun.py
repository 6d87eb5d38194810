"""``cbgen run --dry-run``: everything but the generation, and how long the generation would take.

Parse and encode every line (``validate.check_inputs``: problems go to stderr
as with ``--validate``), then probe this machine through the real engine
(``probe.py``, a few seconds) and model the run (``eta.py``). The report goes
to stdout: counts, the longest prompts, the probe's rates and the ETA as a
point and a range, with its assumptions stated.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from rich.console import Console

from ..config import SamplingParams
from ..engine.engine import Engine
from .eta import Estimate, StepCost, estimate
from .interrupts import StopSignals
from .probe import ProbeResult, run_probe
from ..compute import compute_thread
from .validate import InputCheck, check_inputs

SAMPLE_SIZE = 256          # prompts kept with their token ids for the probe (>= the default max_num_seqs)


def _dur(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _report(check: InputCheck, probe: ProbeResult, cost: StepCost, est: Estimate, max_len: int,
            startup_s: float | None, out: TextIO) -> None:
    w = lambda line="": print(line, file=out)  # noqa: E731
    p = check.prompt_tokens
    w(f"prompt tokens: {sum(p):,} in total, mean {sum(p) / len(p):.0f}, max {max(p):,} "
      f"(context length {max_len:,})")
    cut = probe.num_cut
    ended = [s for s in probe.lengths if s.finished]
    basis = (f"{len(ended)} of {len(probe.lengths)} sampled sequences ran to their end in the probe"
             + (f" at {sum(s.fraction for s in ended) / len(ended):.0%} of their limit on average" if ended else "")
             + (f"; {cut} cut at the probe's time limit, counted at their limit" if cut else ""))
    w(f"output tokens: at most {est.max_output_tokens:,} (max_new_tokens); expected ~{est.output_tokens:,} "
      f"(range {est.output_low:,}-{est.output_high:,}): {basis}")
    w("longest prompts:")
    for c in check.longest:
        w(f"  {c.num_prompt_tokens:>7,} tokens  {c.id} (line {c.line_no})")
    ctx = sum(p) / len(p) + est.output_tokens / max(1, sum(check.num_samples)) / 2
    full = cost(probe.rows, round(probe.rows * ctx), 0)
    small = cost(1, round(ctx), 0)
    prefill = f"prefill ~{1 / cost.per_token:,.0f} tok/s; " if cost.per_token > 0 else ""
    most = max((st.num_decode for st in probe.steps), default=0)
    w(f"probe: {probe.seconds:.1f}s, {len(probe.steps)} steps measured (up to {most} decoding at once): {prefill}decode "
      f"{full * 1000:.0f} ms/step at {probe.rows} sequences ({probe.rows / full:,.0f} tok/s), "
      f"{small * 1000:.0f} ms/step at 1")
    start = f" + {startup_s:.1f}s start-up" if startup_s is not None else ""
    w(f"ETA: {_dur(est.seconds)} (range {_dur(est.low)}-{_dur(est.high)}) for generation{start}")
    w(f"  assumes: the machine as loaded as during the probe; answers as long as the sample's "
      f"(range: 2 standard errors); {est.preemptions} preemptions when the KV cache is full")


def dry_run(inputs: list[str], loaded, engine: Engine, defaults: SamplingParams, system: str | None,
            err: Console, *, startup_s: float | None = None, out: TextIO | None = None,
            probe_seconds: float = 15.0, length_seconds: float = 90.0, spec=None) -> int:
    """Check every input, probe, print the report to ``out`` (stdout); returns the exit code
    (1 if any input is invalid, as ``--validate``)."""
    out = out or sys.stdout
    check = check_inputs(inputs, loaded.tokenizer, engine.max_model_len, defaults, system,
                         lambda p: err.print(f"invalid: {p}", highlight=False, soft_wrap=True),
                         sample_size=max(SAMPLE_SIZE, engine.config.max_num_seqs), spec=spec,
                         kv_tokens=engine.block_manager.num_tokens)
    code = 1 if check.num_invalid else 0
    print(f"dry run: {check.num_valid + check.num_invalid} inputs, {check.num_valid} valid, "
          f"{check.num_invalid} invalid; model {loaded.name}", file=out, flush=True)
    if not check.num_valid:
        print("nothing to generate", file=out)
        return code
    err.print(f"probing this machine ({probe_seconds:.0f}s, then up to {length_seconds:.0f}s "
              "until the sampled answers end)...", style="dim", highlight=False)
    # On the compute thread, where the model was loaded and `cbgen run` steps (cbgen/compute.py).
    # Ctrl-C stops the probe at its next step and waits for it: leaving the thread inside torch
    # while the interpreter exits aborted the process (SIGABRT, "terminate called ...").
    stop = threading.Event()
    job = compute_thread().submit(run_probe, engine, check.sample, rows=sum(check.num_samples),
                                  time_limit=probe_seconds, length_limit=length_seconds, stop=stop)
    try:
        probe = job.result()
    except KeyboardInterrupt:
        stop.set()
        err.print("interrupted: the probe stopped; no ETA", highlight=False)
        with StopSignals():   # a second Ctrl-C while the step ends must not abort either
            job.exception()
        return 130
    cost = StepCost.fit(probe.steps)
    if 2 * probe.num_cut > len(probe.lengths):
        err.print(f"warning: the probe's time ran out before {probe.num_cut} of {len(probe.lengths)} sampled answers ended "
                  "(a busy machine?); they count at their max_new_tokens, so the ETA leans high",
                  style="yellow", highlight=False, soft_wrap=True)
    bm = engine.block_manager
    est = estimate(check.prompt_tokens, check.max_new_tokens, check.num_samples, probe.lengths, cost,
                   engine.config.max_num_seqs, engine.config.max_num_batched_tokens,
                   bm.num_tokens, bm.block_size, cached_fraction=probe.prefix_hit_rate)
    _report(check, probe, cost, est, engine.max_model_len, startup_s, out)
    return code
