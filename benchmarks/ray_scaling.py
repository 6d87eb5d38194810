"""Ray scale-out on one box: plain `cbgen run` vs `--ray --workers 2` (1 CPU each) vs `--ray --workers 1`.

Runs the three one after another on the same prompts (default: the 271 dev
prompts) and prints, side by side:

* e2e wall: the whole command, start-up included (Ray start + a model load per worker);
* run wall: the generation phase only (cbgen's own summary line: from the first
  input read to the last record written), so start-up does not blur the ratio;
* tok/s over the run wall, and each Ray run's ratio to plain;
* Ray's overhead per request: (run wall of --workers 1 - run wall of plain) / requests,
  both with all the box's cores in one engine, so the difference is Ray's dispatch,
  polling and serialisation (negative or within noise = not measurable here);
* driver CPU ms per request: CPU time of the driver process itself (from
  /proc/<pid>/stat, all its threads, sampled every 50 ms) between its first
  record and its last, divided by the records written meanwhile: steady
  state, start-up and shutdown excluded.
  For plain runs the engine is in that process too; for Ray runs it is what
  bounds how many requests/s one driver can feed (benchmarks/NOTES.md,
  "Scaling out on Ray"). Needs enough records to mean anything (not --limit 6).
* same texts: whether every record's text equals plain's (greedy: it must).

Take figures on a quiet machine only. Smoke test (seconds, not a measurement):

    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --limit 6 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUMMARY = re.compile(r"cbgen: (\d+) requests?, (\d+) tokens generated in ([\d.]+)s")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    e2e_s: float
    run_s: float
    requests: int
    tokens: int
    driver_cpu_s_per_record: float   # steady state (see the module docstring)
    texts: dict

    @property
    def tok_s(self) -> float:
        return self.tokens / self.run_s if self.run_s else 0.0


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime of this process (all its threads)


def _count(path: str) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def run(name: str, extra: list[str], args, prompts: str, out_dir: str) -> Result:
    out = os.path.join(out_dir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "cbgen.cli", "run", prompts, "-o", out, "--order", "input", "--no-progress",
           "--max-new-tokens", str(args.max_new_tokens), *args.cbgen_args, *extra]
    env = dict(os.environ) if args.use_ray_address else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print(f"# {name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    cpu = 0.0
    # (driver CPU s, records written) when the first record appeared and when the count last grew:
    # the window excludes start-up and shutdown (ray.shutdown alone is ~1 s of CPU).
    first = last = None
    while p.poll() is None:
        cpu = _cpu_seconds(p.pid) or cpu
        n = _count(out) if os.path.exists(out) else 0
        if n and first is None:
            first = last = (cpu, n)
        elif last is not None and n > last[1]:
            last = (cpu, n)
        time.sleep(0.05)
    e2e = time.perf_counter() - t0
    err = p.stderr.read()
    m = SUMMARY.search(err)
    if p.returncode not in (0, 1) or m is None:
        sys.exit(f"{name} failed (exit {p.returncode}):\n{err}")
    recs = [json.loads(line) for line in open(out, encoding="utf-8") if line.strip()]
    per = (last[0] - first[0]) / (last[1] - first[1]) if first and last[1] > first[1] else float("nan")
    return Result(name, e2e, float(m[3]), int(m[1]), int(m[2]), per, {r["id"]: r["text"] for r in recs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="/work/shared/bench/prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="Only the first N prompts (0 = all).")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--use-ray-address", action="store_true",
                    help="Join the cluster at $RAY_ADDRESS (default: each Ray run starts a local instance).")
    ap.add_argument("--systems", default="plain,ray-2x1,ray-1x",
                    help="Which runs, in order (plain is always first: the others are compared to it).")
    ap.add_argument("cbgen_args", nargs="*", help="More `cbgen run` options for every run, after --.")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cbgen-ray-bench-") as tmp:
        prompts = args.prompts
        if args.limit:
            prompts = os.path.join(tmp, "prompts.jsonl")
            with open(args.prompts, encoding="utf-8") as f, open(prompts, "w", encoding="utf-8") as g:
                g.writelines(line for _, line in zip(range(args.limit), f))
        extra = {"ray-2x1": ["--ray", "--workers", "2", "--cpus-per-worker", "1"],
                 "ray-1x": ["--ray", "--workers", "1", "--cpus-per-worker", str(cores)]}
        plain = run("plain", [], args, prompts, tmp)
        others = {name: run(name, extra[name], args, prompts, tmp)
                  for name in args.systems.split(",") if name in extra}
    ray1 = others.get("ray-1x")
    n = plain.requests
    print(f"| system | e2e wall s | run wall s | requests | tokens | tok/s | vs plain | driver CPU ms/req | same texts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in (plain, *others.values()):
        same = "yes" if r.texts == plain.texts else f"NO ({sum(r.texts.get(k) != v for k, v in plain.texts.items())} differ)"
        print(f"| {r.name} | {r.e2e_s:.1f} | {r.run_s:.2f} | {r.requests} | {r.tokens} | {r.tok_s:.1f} | "
              f"{r.tok_s / plain.tok_s:.2f}x | {1000 * r.driver_cpu_s_per_record:.2f} | {same} |")
    print()
    if ray1 is None:
        return
    print(f"Ray overhead per request (ray-1x run wall - plain run wall) / {n}: "
          f"{1000 * (ray1.run_s - plain.run_s) / max(n, 1):.2f} ms")
    print(f"Ray start-up (ray-1x e2e - run) - (plain e2e - run): "
          f"{(ray1.e2e_s - ray1.run_s) - (plain.e2e_s - plain.run_s):.1f} s")


if __name__ == "__main__":
    main()
