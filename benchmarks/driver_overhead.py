"""Regression check: stepping through the Driver (what `cbgen run` and `cbgen chat`
do) must be within 10% of stepping the engine directly on the main thread.

Each mode runs in a fresh subprocess (its own OpenMP runtime), alternating, for
``--rounds`` rounds at each batch size; the figure is the median per-step decode
time. Exit code 1 if the driver is more than ``--limit`` (default 1.10) times the
direct loop at any batch size.

    .venv/bin/python benchmarks/driver_overhead.py [--seqs 1,64] [--rounds 3] [--tokens 128]

Modes:
  direct   load_model + Engine on the main thread, ``engine.step()`` in a loop there
           (the old `cbgen bench` path).
  driver   the CLI path: load and build on the compute thread (cbgen.compute), a
           Driver stepping there, requests submitted and events read on the main thread.
  split    the pre-fix front-end path, for reference: load on the main thread, step on
           a separate thread (two OpenMP teams). Only with --with-split.

Also printed: voluntary context switches per step (all threads) and process
CPU time / wall time during decode, the two signs of sleeping OpenMP workers.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import time

CHILD = r'''
import glob, json, os, sys, threading, time
mode, nseq, tokens, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def ctx():
    n = 0
    for f in glob.glob("/proc/self/task/*/status"):
        try:
            n += sum(int(l.split()[1]) for l in open(f) if l.startswith("voluntary_ctxt"))
        except OSError:
            pass
    return n

from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.models import load_model

mcfg, ecfg = ModelConfig(dtype=dtype), EngineConfig(max_num_seqs=nseq)
params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
prompt = list(range(100, 140))

def measure(wait_first_tokens, wait_done, steps):
    wait_first_tokens()
    s0, c0, t0, p0 = steps(), ctx(), time.perf_counter(), time.process_time()
    wait_done()
    dt, n = time.perf_counter() - t0, steps() - s0
    return {"step_ms": dt / n * 1e3, "ctx_per_step": (ctx() - c0) / n, "cpu_per_wall": (time.process_time() - p0) / dt}

def direct(engine):
    for i in range(nseq):
        engine.add_request(str(i), prompt, params)
    seen = set()
    def first():
        while len(seen) < nseq:
            seen.update(o.request_id for o in engine.step() if o.new_token_ids)
    def done():
        while engine.has_unfinished:
            engine.step()
    return measure(first, done, lambda: engine.num_steps)

if mode == "direct":
    res = direct(Engine.from_loaded(load_model(mcfg), ecfg))
elif mode == "split":
    engine = Engine.from_loaded(load_model(mcfg), ecfg)
    box = {}
    t = threading.Thread(target=lambda: box.update(direct(engine)))
    t.start(); t.join()
    res = box
else:
    from cbgen.compute import compute_thread
    from cbgen.frontends.driver import Driver
    ct = compute_thread()
    engine = ct.call(Engine.from_loaded, ct.call(load_model, mcfg), ecfg)
    with Driver(engine) as driver:
        for i in range(nseq):
            driver.submit(str(i), prompt, params)
        seen, finished = set(), set()
        def pump(cond):
            while not cond():
                o = driver.events.get()
                if o.new_token_ids:
                    seen.add(o.request_id)
                if o.finished:
                    finished.add(o.request_id)
        res = measure(lambda: pump(lambda: len(seen) == nseq), lambda: pump(lambda: len(finished) == nseq),
                      lambda: engine.num_steps)
print("RESULT " + json.dumps(res))
'''


def run_child(mode: str, nseq: int, tokens: int, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(nseq), str(tokens), dtype],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--limit", type=float, default=1.10)
    ap.add_argument("--with-split", action="store_true")
    a = ap.parse_args()
    modes = ["direct", "driver"] + (["split"] if a.with_split else [])
    worst = 0.0
    print(f"| seqs | mode | step ms (median of {a.rounds}) | vol. ctx switches / step | CPU / wall |")
    print("|---:|---|---:|---:|---:|")
    for nseq in (int(x) for x in a.seqs.split(",")):
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(a.rounds):
            for m in modes:
                runs[m].append(run_child(m, nseq, a.tokens, a.dtype))
        med = {m: statistics.median(r["step_ms"] for r in runs[m]) for m in modes}
        for m in modes:
            print(f"| {nseq} | {m} | {med[m]:.1f} | {statistics.median(r['ctx_per_step'] for r in runs[m]):.0f} "
                  f"| {statistics.median(r['cpu_per_wall'] for r in runs[m]):.2f} |")
        ratio = med["driver"] / med["direct"]
        worst = max(worst, ratio)
        print(f"| {nseq} | driver / direct | {ratio:.3f} | | |")
    ok = worst <= a.limit
    print(f"\n{'PASS' if ok else 'FAIL'}: worst driver/direct = {worst:.3f} (limit {a.limit})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
