"""Throughput of a JSON-schema batch job vs the same job unconstrained, side by side.

    PYTHONPATH=. python benchmarks/structured_speed.py --prompts ../shared/bench/prompts-dev.jsonl
    PYTHONPATH=. python benchmarks/structured_speed.py --lines 4 --max-new-tokens 16 --repeats 1   # smoke

The job: 64 extraction lines (benchmarks/make_extraction.py) sharing one schema,
greedy, on the embedded model, through the engine's step loop (what `cbgen run`
drives). Fairness: the unconstrained run generates exactly as many tokens per
line as the constrained run did (``min_new_tokens = max_new_tokens = n_i``,
``ignore_eos``), so both runs have the same step schedule and batch sizes; the
ratio is constrained tok/s over unconstrained tok/s. Rounds alternate them
(paired per round) so a busy neighbour hits both alike; each round also runs the
constrained job with masks filled inline before the forward
(``CBGEN_MASK_OVERLAP=0``), since on 2 cores the mask worker competes with the
forward's threads and which way wins is a measurement.

Also printed: how many constrained outputs validate (jsonschema) and how many
were cut by ``max_new_tokens``; the in-run mask fill and wait per step; and the
per-step mask time at 1 / 16 / 64 sequences, measured on cbgen's own
``BitmaskWorker`` walking the run's real outputs token by token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_extraction import SCHEMA, extraction_lines  # noqa: E402

from cbgen.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from cbgen.engine.engine import Engine  # noqa: E402
from cbgen.engine.structured import BitmaskWorker  # noqa: E402
from cbgen.engine.structured_params import StructuredOutputsParams  # noqa: E402
from cbgen.frontends.prompting import encode  # noqa: E402
from cbgen.models import load_model  # noqa: E402


def run_job(eng: Engine, prompts, params, spec) -> tuple[float, dict[str, object]]:
    """Wall seconds and final outputs of one batch (all lines added at once, like a file run)."""
    t0 = time.perf_counter()
    for i, (ids, p) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), ids, p, structured=spec)
    finals = {}
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o
    return time.perf_counter() - t0, finals


def mask_time_per_step(eng: Engine, spec, outputs: list[list[int]], n: int) -> float | None:
    """Mean seconds for cbgen's BitmaskWorker to fill ``n`` masks per step while each
    matcher walks one of the run's outputs."""
    outs = [o for o in outputs if o][:n]
    if len(outs) < n:
        return None
    grammar = eng.grammars.compile(spec)
    ms = [grammar.new_matcher() for _ in outs]
    worker = BitmaskWorker()
    words = -(-eng.vocab_size // 32)
    buf = torch.zeros((n, words), dtype=torch.int32)
    times = []
    for s in range(max(len(o) for o in outs)):
        live = [i for i in range(n) if s < len(outs[i]) and not ms[i].is_stopped]
        if not live:
            break
        t0 = time.perf_counter()
        worker.submit([ms[i] for i in live], buf.data_ptr(), words * 4, n).result()
        times.append(time.perf_counter() - t0)
        for i in live:
            assert ms[i].accept(outs[i][s])
    worker.close()
    return statistics.mean(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="../shared/bench/prompts-dev.jsonl")
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="paired rounds (constrained, then unconstrained)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    loaded = load_model(ModelConfig(dtype=args.dtype, threads=args.threads))
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=max(64, args.lines)))
    lines = extraction_lines(args.prompts, args.lines)
    prompts = [encode(loaded.tokenizer, prompt=None, messages=line["messages"]) for line in lines]
    spec = StructuredOutputsParams.json_schema(SCHEMA, "extraction")
    greedy = SamplingParams(max_new_tokens=args.max_new_tokens)
    eng.grammars.compile(spec)   # the llguidance tokenizer (~1 s, once per run) is not part of the job

    # Warm-up: one constrained run fixes each line's token count for the unconstrained twin.
    _, finals = run_job(eng, prompts, [greedy] * len(prompts), spec)
    counts = [len(finals[str(i)].token_ids) for i in range(len(prompts))]
    twin = [SamplingParams(max_new_tokens=c, min_new_tokens=c, ignore_eos=True) for c in counts]
    total = sum(counts)

    worker = eng.runner.mask_worker
    ratios, inline_ratios, con_rates, free_rates = [], [], [], []
    for r in range(args.repeats):
        before = (worker.times.steps, worker.times.fill_s, worker.times.wait_s)
        t_con, fin_con = run_job(eng, prompts, [greedy] * len(prompts), spec)   # masks overlap the forward
        t = worker.times
        steps = t.steps - before[0]
        fill_ms, wait_ms = (t.fill_s - before[1]) / steps * 1e3, (t.wait_s - before[2]) / steps * 1e3
        t_free, fin_free = run_job(eng, prompts, twin, None)
        worker.inline = True                                                     # masks before the forward
        t_inline, fin_inline = run_job(eng, prompts, [greedy] * len(prompts), spec)
        worker.inline = False
        for fin in (fin_free, fin_con, fin_inline):
            assert [len(fin[str(i)].token_ids) for i in range(len(prompts))] == counts, "greedy must repeat"
        con_rates.append(total / t_con)
        free_rates.append(total / t_free)
        ratios.append(con_rates[-1] / free_rates[-1])
        inline_ratios.append(t_free / t_inline)
        print(f"round {r + 1}: constrained {con_rates[-1]:.1f} tok/s, unconstrained {free_rates[-1]:.1f} tok/s, "
              f"ratio {ratios[-1]:.3f} (masks inline instead of overlapped: {inline_ratios[-1]:.3f}); "
              f"in-run mask fill {fill_ms:.2f} ms/step, wait after forward {wait_ms:.2f} ms/step", flush=True)

    stop = [finals[str(i)] for i in range(len(prompts)) if finals[str(i)].finish_reason.value == "stop"]
    cut = [o for o in finals.values() if o.finish_reason.value == "length"]
    valid = 0
    try:
        import jsonschema
        for o in stop:
            jsonschema.validate(json.loads(o.text), SCHEMA)
            valid += 1
        validity = f"{valid}/{len(stop)} stop outputs validate (jsonschema)"
    except ImportError:
        validity = "jsonschema not installed: validity not checked"
    print(f"\n{len(prompts)} lines, {total} tokens each way, max_new_tokens {args.max_new_tokens}: "
          f"{len(stop)} stop, {len(cut)} length cuts; {validity}")
    print(f"throughput ratio constrained/unconstrained: median {statistics.median(ratios):.3f} "
          f"(per round: {', '.join(f'{x:.3f}' for x in ratios)}; target >= 0.85)")
    print(f"  with masks computed inline (CBGEN_MASK_OVERLAP=0): median {statistics.median(inline_ratios):.3f}")
    print(f"tok/s median: constrained {statistics.median(con_rates):.1f}, unconstrained {statistics.median(free_rates):.1f}")
    outs = [finals[str(i)].token_ids for i in range(len(prompts))]
    for n in (1, 16, 64):
        t = mask_time_per_step(eng, spec, outs, n)
        print(f"mask time per step at {n:>2} sequences: " + ("n/a (fewer lines)" if t is None else f"{t * 1e3:.3f} ms"))


if __name__ == "__main__":
    main()
