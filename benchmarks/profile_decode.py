"""Where a decode step's time goes at low batch (issue 11): torch.profiler over decode steps.

    python benchmarks/profile_decode.py [--seqs 1,4,16] [--dtype bfloat16] [--quantize int8] [--steps 32]

Loads the embedded model on this thread, prefills ``--seqs`` prompts, then profiles
``--steps`` decode steps and prints the top ops by self CPU time, plus the wall time per step
and the share of it no profiled op accounts for (Python and dispatch). A diagnostic, not a
speed claim: the speed figures come from `cbgen run` (benchmarks/lowbatch.py).
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from cbgen.config import EngineConfig, ModelConfig
from cbgen.engine.engine import Engine
from cbgen.engine.request import SamplingParams
from cbgen.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1,4,16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    loaded = load_model(ModelConfig(dtype=a.dtype, quantize=a.quantize))
    for n in [int(s) for s in a.seqs.split(",")]:
        eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=max(n, 1)))
        params = SamplingParams(max_new_tokens=a.steps * 3 + 8, temperature=0.0, ignore_eos=True)
        for i in range(n):
            eng.add_request(f"r{i}", loaded.tokenizer.encode(f"Story number {i}: once upon a time"), params)
        for _ in range(a.steps):   # prefill, pack, warm up
            eng.step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        wall = (time.perf_counter() - t0) / a.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                eng.step()
        ka = prof.key_averages()
        ops = sum(e.self_cpu_time_total for e in ka) / a.steps / 1e3
        print(f"\n== {n} seqs, {a.dtype}, quantize {a.quantize}: {wall:.1f} ms/step unprofiled; "
              f"profiled ops self time {ops:.1f} ms/step")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
