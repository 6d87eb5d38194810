"""Step-time overhead of top-k logprobs: 64 sequences decoding, 1 in 8 asking for 5 top
logprobs, against the same 64 with none. Run on a quiet machine:

    python benchmarks/logprobs_overhead.py                    # 64 seqs, 64 tokens, 4 rounds
    python benchmarks/logprobs_overhead.py --num-seqs 8 --max-new-tokens 4 --rounds 1   # smoke

Both arms go through the engine path ``cbgen run`` uses (``Driver`` stepping an
``Engine`` on its thread, the default model, dtype and forward), with the same
prompts, greedy and ``ignore_eos``, so they compute the same tokens. Arms
alternate A B B A ... so drift (thermal, other load) hits both alike. A step is
timed inside ``Engine.step``; only pure decode steps of all sequences (forwarded
tokens == num_seqs) count, so prefill never mixes in. Reports the median step
time per arm, their ratio per round and overall (target: <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cbgen.bench.workloads import DEFAULT_PROMPTS, load_prompts  # noqa: E402
from cbgen.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from cbgen.engine.engine import Engine  # noqa: E402
from cbgen.frontends.driver import Driver, EngineFailed  # noqa: E402
from cbgen.models import load_model  # noqa: E402


class TimedEngine:
    """Wraps ``engine.step`` to record the duration of every full-batch decode step."""

    def __init__(self, engine: Engine, num_seqs: int) -> None:
        self.engine, self.num_seqs, self.times = engine, num_seqs, []
        self._step = engine.step
        engine.step = self.step  # type: ignore[method-assign]

    def step(self):
        before = self.engine.runner.num_forward_tokens
        t0 = time.perf_counter()
        out = self._step()
        dt = time.perf_counter() - t0
        if self.engine.runner.num_forward_tokens - before == self.num_seqs:
            self.times.append(dt)
        return out


def run_arm(driver: Driver, timed: TimedEngine, prompts: list[list[int]], params: list[SamplingParams],
            tag: str) -> list[float]:
    timed.times = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        driver.submit(f"{tag}-{i}", p, sp)
    left = sum(sp.n for sp in params)
    while left:
        ev = driver.events.get()
        if isinstance(ev, EngineFailed):
            raise ev.error
        left -= ev.finished
    return list(timed.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--ask-every", type=int, default=8, help="1 in N sequences asks for logprobs")
    ap.add_argument("--top-logprobs", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="each round runs both arms (order alternates)")
    ap.add_argument("--prompts", default=str(REPO / DEFAULT_PROMPTS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype))
    if os.path.isfile(args.prompts):
        prompts = [ids for _, ids in load_prompts(args.prompts, loaded.tokenizer, args.num_seqs)]
    else:   # e.g. run from a worktree: the prompt length hardly matters for decode steps
        print(f"note: {args.prompts} not found; using generated prompts", flush=True)
        prompts = [loaded.tokenizer.encode(f"Write a short story about the number {i}.") for i in range(args.num_seqs)]
    while len(prompts) < args.num_seqs:   # a short prompt file: reuse prompts (same in both arms)
        prompts.append(prompts[len(prompts) % max(1, len(prompts))])
    base = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    asked = base.replace(logprobs=args.top_logprobs)
    arms = {"none": [base] * args.num_seqs,
            "logprobs": [asked if i % args.ask_every == 0 else base for i in range(args.num_seqs)]}
    engine = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=args.num_seqs))
    timed = TimedEngine(engine, args.num_seqs)
    print(f"model {loaded.name} dtype {loaded.model.dtype}; {args.num_seqs} sequences, "
          f"{sum(p.logprobs is not None for p in arms['logprobs'])} asking for {args.top_logprobs} top logprobs, "
          f"{args.max_new_tokens} new tokens, {args.rounds} rounds", flush=True)
    medians: dict[str, list[float]] = {"none": [], "logprobs": []}
    with Driver(engine) as driver:
        run_arm(driver, timed, prompts, arms["none"], "warmup")
        for r in range(args.rounds):
            order = ["none", "logprobs"] if r % 2 == 0 else ["logprobs", "none"]
            got = {}
            for arm in order:
                times = run_arm(driver, timed, prompts, arms[arm], f"{arm}{r}")
                if not times:
                    sys.exit("no full-batch decode step was timed: raise --max-new-tokens")
                got[arm] = statistics.median(times)
                medians[arm].append(got[arm])
            print(f"round {r + 1}: none {got['none'] * 1e3:8.2f} ms/step   logprobs {got['logprobs'] * 1e3:8.2f} "
                  f"ms/step   ratio {got['logprobs'] / got['none']:.3f}", flush=True)
    a, b = statistics.median(medians["none"]), statistics.median(medians["logprobs"])
    ratios = [y / x for x, y in zip(medians["none"], medians["logprobs"])]
    print(f"median step: none {a * 1e3:.2f} ms, logprobs {b * 1e3:.2f} ms; ratio {b / a:.3f} "
          f"(per-round ratios median {statistics.median(ratios):.3f}); target <= 1.05: "
          f"{'PASS' if statistics.median(ratios) <= 1.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
