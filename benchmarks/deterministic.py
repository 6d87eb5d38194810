"""Issue #16's must-show: with ``--deterministic`` the same tokens whatever else runs, through `cbgen run`.

    python benchmarks/deterministic.py [--dtype bfloat16] [--num-prompts 64] [--max-new-tokens 128]
                                       [--scenarios ...] [--speed]

The first ``--num-prompts`` dev prompts (chat messages) as JSONL lines, each twice: greedy
(``g-N``) and ``temperature 0.8, seed 7`` (``s-N``), with ``logprobs: 0`` so every record
carries each generated token's bytes (one byte string per token id) and its logprob. Each
scenario is one `cbgen run --deterministic` process (the embedded model, ``--dtype``), all
side by side (this part checks bits, not speed), one thread each except ``seqs64``:

- ``seqs1``: ``--max-num-seqs 1``, the greedy and the seeded file in two processes;
- ``seqs64``: ``--max-num-seqs 64``, on 2 threads (so the thread count differs too);
- ``stream``: stdin fed over time: the lines interleaved with 64 other requests (one of
  them a 1,500-token prompt, chunked over several steps), a line every ``--gap`` s;
- ``preempt``: ``--kv-cache-gb`` small enough that the run reports preemptions;
- ``warm``: every line twice in one process (``--max-num-seqs 64``), the second copy
  after the first finished, so it starts from the prefix cache (``usage.cached_tokens``).

Every scenario's tokens and logprobs are compared with ``seqs1``; the figure is identical
requests / total. ``--speed`` then measures the cost: the greedy file at 1, 16 and 64
sequences (``--speed-prompts`` prompts), flag on vs off, alternating, whole-process tok/s.
Writes benchmarks/out/deterministic.json. Waits for /tmp/bench/LOCK to go away first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / ".." / "shared" / "bench" / "prompts-dev.jsonl"
CBGEN = [sys.executable, "-m", "cbgen.cli"]
OUT = ROOT / "benchmarks" / "out"


def lines(prompts: list[dict], n: int, max_new: int) -> tuple[list[dict], list[dict]]:
    chats = [p for p in prompts if "messages" in p][:n]
    greedy = [{"id": f"g-{i}", "messages": p["messages"], "max_tokens": max_new, "temperature": 0.0,
               "logprobs": 0} for i, p in enumerate(chats)]
    seeded = [{"id": f"s-{i}", "messages": p["messages"], "max_tokens": max_new, "temperature": 0.8,
               "top_p": 1.0, "seed": 7, "logprobs": 0} for i, p in enumerate(chats)]
    return greedy, seeded


def others(prompts: list[dict], n: int, max_new: int) -> list[dict]:
    """``n`` other requests: later dev prompts, and one ~1,500-token prompt."""
    rest = [p for p in prompts if "messages" in p][64:64 + n - 1]
    out = [{"id": f"other-{i}", "messages": p["messages"], "max_tokens": max_new, "temperature": 0.0}
           for i, p in enumerate(rest)]
    long_text = " ".join(p["messages"][-1]["content"] for p in rest)
    words = long_text.split()
    while len(words) < 1300:
        words = words + words
    out.insert(len(out) // 3, {"id": "other-long", "prompt": " ".join(words[:1300]), "max_tokens": 16,
                               "temperature": 0.0})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cbgen_run(args: list[str], stdin_rows: list[dict] | None = None, gap: float = 0.0,
              env: dict | None = None) -> tuple[list[dict], str, float]:
    """One `cbgen run` process; (records, stderr, wall s)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(CBGEN + ["run", *args], stdin=subprocess.PIPE if stdin_rows is not None else None,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    if stdin_rows is None:
        out, err = p.communicate()
    else:
        # Not communicate(): it would close stdin at once. Feed over time, drain both pipes.
        got = {}
        readers = [threading.Thread(target=lambda k, f: got.__setitem__(k, f.read()), args=(k, f), daemon=True)
                   for k, f in (("out", p.stdout), ("err", p.stderr))]
        for t in readers:
            t.start()
        for r in stdin_rows:
            p.stdin.write(json.dumps(r) + "\n")
            p.stdin.flush()
            time.sleep(gap)
        p.stdin.close()
        p.wait()
        for t in readers:
            t.join()
        out, err = got["out"], got["err"]
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"cbgen run {' '.join(args)} failed ({p.returncode}):\n{err[-2000:]}")
    return [json.loads(x) for x in out.splitlines() if x.strip()], err, wall


def tokens(rec: dict) -> tuple:
    """(token byte strings, logprobs) of a record, from its logprobs entries."""
    lp = rec.get("logprobs") or []
    return tuple(tuple(e["bytes"]) for e in lp), tuple(e["logprob"] for e in lp)


def by_id(records: list[dict]) -> dict[str, tuple]:
    return {r["id"]: tokens(r) for r in records if not r["id"].startswith("other")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between stdin lines in 'stream'")
    ap.add_argument("--kv-cache-gb", type=float, default=0.08, help="the 'preempt' pool")
    ap.add_argument("--scenarios", default="seqs64,stream,preempt,warm", help="besides seqs1, the reference")
    ap.add_argument("--reuse", default="", help="scenarios to read from an earlier run's records-NAME.jsonl")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--speed-prompts", type=int, default=64)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--speed-seqs", default="1,16,64", help="--max-num-seqs values for --speed")
    a = ap.parse_args()
    while os.path.exists("/tmp/bench/LOCK"):
        time.sleep(10)
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "deterministic"
    work.mkdir(exist_ok=True)
    prompts = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    greedy, seeded = lines(prompts, a.num_prompts, a.max_new_tokens)
    g_file, s_file = write(work / "greedy.jsonl", greedy), write(work / "seeded.jsonl", seeded)
    both = write(work / "both.jsonl", greedy + seeded)
    common = ["--deterministic", "--dtype", a.dtype]   # no -q: the summary line counts preemptions
    report: dict = {"dtype": a.dtype, "num_prompts": len(greedy), "max_new_tokens": a.max_new_tokens,
                    "scenarios": {}}
    mixed = [x for pair in zip(others(prompts, 64, 64), greedy + seeded) for x in pair] + (greedy + seeded)[64:]
    twice = greedy + seeded + [{**r, "id": "w" + r["id"]} for r in greedy + seeded]
    # name -> (cbgen run args, stdin rows or None). Correctness, not speed: the scenarios run side
    # by side, one thread each (OMP_WAIT_POLICY=PASSIVE: no spinning on a shared CPU), except
    # seqs64 on 2 threads, so the thread count differs from the reference too.
    plan = {
        "seqs1-greedy": ([str(g_file), "--max-num-seqs", "1", "--threads", "1"], None),
        "seqs1-seeded": ([str(s_file), "--max-num-seqs", "1", "--threads", "1"], None),
        "seqs64": ([str(both), "--max-num-seqs", "64", "--threads", "2"], None),
        "stream": (["-", "--max-num-seqs", "64", "--threads", "1"], mixed),
        "preempt": ([str(both), "--max-num-seqs", "64", "--kv-cache-gb", str(a.kv_cache_gb), "--threads", "1"], None),
        "warm": ([str(write(work / "twice.jsonl", twice)), "--max-num-seqs", "64", "--threads", "1"], None),
    }
    todo = {"seqs1-greedy", "seqs1-seeded", *a.scenarios.split(",")}
    runs: dict[str, object] = {}
    for name in a.reuse.split(",") if a.reuse else []:   # records of an earlier run of this script
        recs = [json.loads(x) for x in (work / f"records-{name}.jsonl").read_text().splitlines()]
        err_file = work / f"stderr-{name}.txt"
        runs[name] = (recs, err_file.read_text() if err_file.exists() else "", 0.0)
        todo.discard(name)

    def one(name):
        args, rows = plan[name]
        try:
            runs[name] = cbgen_run([*args, *common], rows, a.gap, env={"OMP_WAIT_POLICY": "PASSIVE"})
        except SystemExit as e:   # a failed run: reported from the main thread
            runs[name] = e
        else:
            recs, err, wall = runs[name]
            write(work / f"records-{name}.jsonl", recs)
            (work / f"stderr-{name}.txt").write_text(err)
            print(f"{name}: done in {wall:.0f} s", flush=True)
    threads = [threading.Thread(target=one, args=(n,)) for n in plan if n in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in runs.values():
        if isinstance(r, SystemExit):
            raise r
    results = {"seqs1": {**by_id(runs["seqs1-greedy"][0]), **by_id(runs["seqs1-seeded"][0])}}
    stderr_of = {n: r[1] for n, r in runs.items()}
    for name in ("seqs64", "stream", "preempt"):
        if name in runs:
            results[name] = by_id(runs[name][0])
    if "stream" in runs:
        long_rec = [r for r in runs["stream"][0] if r["id"] == "other-long"][0]
        report["long_prompt_tokens"] = long_rec["usage"]["prompt_tokens"]
    if "warm" in runs:
        second = {r["id"][1:]: r for r in runs["warm"][0] if r["id"].startswith("w")}
        results["warm"] = {k: tokens(r) for k, r in second.items()}
        report["warm_cached_tokens"] = sum(r["usage"]["cached_tokens"] for r in second.values())
    report["scenarios"]["seqs1"] = {"reference": True, "wall_s": [round(runs[n][2]) for n in ("seqs1-greedy", "seqs1-seeded")]}
    ref = results["seqs1"]
    for name, got in results.items():
        if name == "seqs1":
            continue
        same = sum(got.get(k) == v for k, v in ref.items())
        same_tokens = sum(got.get(k, ((), ()))[0] == v[0] for k, v in ref.items())
        summary = [x for x in stderr_of.get(name, "").splitlines() if x.startswith("cbgen:")]
        report["scenarios"][name] = {"identical": same, "identical_tokens": same_tokens, "total": len(ref),
                                     "summary": summary[-1] if summary else ""}
        print(f"{name}: {same_tokens}/{len(ref)} token-identical, {same}/{len(ref)} with logprob bits; "
              f"{summary[-1] if summary else ''}", flush=True)
    if a.speed:
        report["speed"] = speed(prompts, a)
    (OUT / "deterministic.json").write_text(json.dumps(report, indent=1))
    bad = [n for n, s in report["scenarios"].items() if not s.get("reference") and s["identical_tokens"] != s["total"]]
    return 1 if bad else 0


def speed(prompts: list[dict], a) -> dict:
    """Whole-process tok/s of the greedy file at 1, 16, 64 sequences, flag on vs off (alternating)."""
    out = {}
    work = OUT / "deterministic"
    for seqs in [int(x) for x in a.speed_seqs.split(",")]:
        n = min(a.speed_prompts, seqs * 4) if seqs < 64 else a.speed_prompts
        rows = [{"id": f"g-{i}", "messages": p["messages"], "max_tokens": a.speed_tokens, "temperature": 0.0,
                 "ignore_eos": True} for i, p in enumerate([p for p in prompts if "messages" in p][:n])]
        path = write(work / f"speed-{seqs}.jsonl", rows)
        rates = {"off": [], "on": []}
        for _ in range(2):
            for mode in ("off", "on"):
                flag = ["--deterministic"] if mode == "on" else []
                _, err, wall = cbgen_run([str(path), *flag, "--dtype", a.dtype, "--max-num-seqs", str(seqs),
                                          "-o", str(work / f"speed-{seqs}-{mode}.jsonl")])
                line = [x for x in err.splitlines() if x.startswith("cbgen:")]
                rate = float(line[-1].split("(")[1].split(" tok/s")[0]) if line else n * a.speed_tokens / wall
                rates[mode].append(rate)
        on, off = max(rates["on"]), max(rates["off"])
        out[str(seqs)] = {"prompts": n, "tok_s_off": rates["off"], "tok_s_on": rates["on"],
                          "cost": round(1 - on / off, 3)}
        print(f"speed {seqs} seqs ({n} prompts x {a.speed_tokens}): off {rates['off']} on {rates['on']} "
              f"tok/s -> cost {1 - on / off:.1%}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
