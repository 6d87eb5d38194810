"""Issue #11's dev-prompt must-show: a whole `cbgen run` process on the 271 dev prompts against HF
static batching (B=32, same dtype) and llama-server at several ``-np`` on the same weights.

    python benchmarks/dev271.py [--dtype bfloat16] [--quantize none,int8] [--np 16,64]
        [--systems cbgen,static,llama-server] [--gguf Q4_1,BF16] [--limit N] [--max-tokens 256] [--json OUT]

Every system gets the same chat prompts (../shared/bench/prompts-dev.jsonl, the model's chat
template), greedy, at most --max-tokens new tokens, natural EOS, --threads threads, each in a fresh
process of its own, one system at a time:
- cbgen: `python -m cbgen.cli run PROMPTS.jsonl -o OUT`; generation time is the "generated in" of its
  stderr summary (engine built to last record); load is the rest of the process wall.
- static: this script as a child process loads the model with transformers' modules (as `cbgen bench`
  does) and runs cbgen/bench/baselines.run_hf_static, B=32, no warm-up; load is the rest of its wall.
- llama-server: the embedded Q4_1 GGUF and the BF16 GGUF requantized from it, a fresh server per
  -np, all prompts submitted at once (token ids from cbgen's tokenizer) via
  cbgen/bench/llamacpp.run_llama_server; load is launch-to-healthy. Skipped with a note without binaries.
The result is whole-process tok/s (generated tokens / (load + generation)) and its ratios: cbgen /
static (target >= 3) and cbgen / the best -np per GGUF (target >= 2). Writes benchmarks/out/dev271.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # the child process runs this file directly

from cbgen.bench import llamacpp  # noqa: E402
from cbgen.bench.workloads import DEFAULT_PROMPTS, load_prompt_ids, real  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
BATCH = 32                       # HF static batching, as in `cbgen bench`
SUMMARY = re.compile(r"cbgen: (\d+) requests?, (\d+) tokens generated in ([\d.]+)s")
SYSTEMS = ("cbgen", "static", "llama-server")


def row(system: str, tokens: int, process_s: float, generation_s: float, **extra) -> dict:
    """One system's figures; ``load_s`` is everything in the process outside generation."""
    return {"system": system, "generated_tokens": tokens, "process_s": round(process_s, 2),
            "generation_s": round(generation_s, 2), "load_s": round(process_s - generation_s, 2),
            "tok_s_process": round(tokens / process_s, 1), "tok_s_generation": round(tokens / generation_s, 1),
            **extra}


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def cbgen_input(a, dest: Path) -> Path:
    """The first --limit prompt lines as `cbgen run` input: id and messages, greedy, --max-tokens."""
    lines = [json.loads(ln) for ln in Path(a.prompts).read_text().splitlines() if ln.strip()][:a.limit]
    dest.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"], "max_tokens": a.max_tokens,
                                        "temperature": 0}) + "\n" for r in lines))
    return dest


def cbgen_run(a, quantize: str, inp: Path) -> dict:
    out = inp.with_name(f"cbgen-{quantize}.out.jsonl")
    cmd = [sys.executable, "-m", "cbgen.cli", "run", str(inp), "-o", str(out), "--dtype", a.dtype,
           "--quantize", quantize, "--threads", str(a.threads), "--no-progress"]
    if a.max_num_seqs:
        cmd += ["--max-num-seqs", str(a.max_num_seqs)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
    wall = time.perf_counter() - t0
    m = SUMMARY.search(p.stderr)
    if p.returncode != 0 or m is None:
        sys.exit(f"cbgen run exited {p.returncode} (no summary?): {p.stderr[-2000:]}")
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    tokens = sum(r["usage"]["completion_tokens"] for r in recs if r["usage"])
    if int(m[2]) != tokens:
        print(f"note: cbgen summary says {m[2]} tokens, records {tokens}", file=sys.stderr)
    return row(f"cbgen {a.dtype} --quantize {quantize}", tokens, wall, float(m[3]), quantize=quantize,
               requests=len(recs), finish=dict(Counter(r["finish_reason"] for r in recs)),
               command=shlex.join(cmd[1:]))


def static_child(a) -> None:
    """In the child: load as `cbgen bench` loads the static baseline, run it, print one JSON line."""
    from cbgen.bench.baselines import run_hf_static
    from cbgen.compute import compute_thread
    from cbgen.config import ModelConfig
    from cbgen.models import load_model
    ct = compute_thread()     # every torch op on one thread: one OpenMP team, as in `cbgen bench`
    loaded = ct.call(load_model, ModelConfig(dtype=a.dtype, threads=a.threads, impl="transformers"))
    ids = load_prompt_ids(a.prompts, loaded.tokenizer, a.limit)
    res = ct.call(run_hf_static, loaded.model, real(ids, len(ids), a.max_tokens), BATCH)
    print(json.dumps({"generation_s": res.wall_s, "generated_tokens": res.generated_tokens,
                      "requests": res.num_requests, "load_model_s": loaded.load_seconds}))


def static_run(a) -> dict:
    cmd = [sys.executable, __file__, "--static-child", "--dtype", a.dtype, "--threads", str(a.threads),
           "--prompts", a.prompts, "--max-tokens", str(a.max_tokens)] + (["--limit", str(a.limit)] if a.limit else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"static child exited {p.returncode}: {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return row(f"HF static B={BATCH} {a.dtype}", r["generated_tokens"], wall, r["generation_s"],
               requests=r["requests"], load_model_s=round(r["load_model_s"], 2))


def prompt_ids(a) -> list[list[int]]:
    """The prompts as token ids from the tokenizer `cbgen run` loads (for llama-server)."""
    import torch

    from cbgen.models.gguf import ensure_converted
    from cbgen.models.load import _load_tokenizer
    from cbgen.models.resolve import resolve_model
    path, _ = ensure_converted(resolve_model(None).path, getattr(torch, a.dtype), None, lambda _m: None)
    tok = _load_tokenizer(path, json.loads((path / "config.json").read_text()).get("model_type"))
    return load_prompt_ids(a.prompts, tok, a.limit)


def llama_runs(a, notes: list[str]) -> list[dict]:
    missing = [t for t in ("llama-server", "llama-quantize") if llamacpp.find_tool(t) is None]
    if missing:
        notes.append(llamacpp.missing_note(missing[0]))
        return []
    src = llamacpp.select_ggufs((), None)[0]                  # the embedded GGUF (Q4_1)
    ggufs = {src.stem.rsplit(".", 1)[-1]: src, "BF16": llamacpp.bf16_gguf(src, OUT / "gguf")}
    if a.gguf:
        if bad := set(a.gguf) - set(ggufs):
            sys.exit(f"--gguf: unknown {sorted(bad)}; known: {', '.join(ggufs)}")
        ggufs = {k: g for k, g in ggufs.items() if k in a.gguf}
    ids = prompt_ids(a)
    wl = real(ids, len(ids), a.max_tokens)
    rows = []
    for kind, g in ggufs.items():
        for n in a.np:
            name = f"llama-server {kind} -np {n}"
            print(f"{name} ...", file=sys.stderr)
            res = llamacpp.run_llama_server(g, n, a.threads, wl, name)
            rows.append(row(name, res.generated_tokens, res.setup_s + res.wall_s, res.wall_s, gguf=kind,
                            gguf_path=str(g), np=n, requests=res.num_requests, notes=res.notes))
            print(f"  {rows[-1]['tok_s_process']} tok/s whole, {rows[-1]['tok_s_generation']} generation",
                  file=sys.stderr)
    return rows


def ratios(rows: list[dict]) -> dict:
    """cbgen's whole-process tok/s over static's and over the best -np of each GGUF."""
    static = next((r for r in rows if r["system"].startswith("HF static")), None)
    best = {}
    for r in rows:
        if "gguf" in r and r["tok_s_process"] > best.get(r["gguf"], {}).get("tok_s_process", 0):
            best[r["gguf"]] = r
    out = {}
    for c in (r for r in rows if r["system"].startswith("cbgen")):
        x = c["tok_s_process"]
        out[c["system"]] = {**({"static": round(x / static["tok_s_process"], 2)} if static else {}),
                            **{f"llama-server {k} (best -np {b['np']})": round(x / b["tok_s_process"], 2)
                               for k, b in best.items()}}
    return out


def main() -> None:
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="none", help="none | int8 | none,int8 (one cbgen run each)")
    ap.add_argument("--np", type=ints, default=(16, 64), help="llama-server -np values")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--gguf", type=lambda s: tuple(s.split(",")), default=(),
                    help="llama-server GGUFs: Q4_1 (the embedded file), BF16 (default: both)")
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="passed to cbgen run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompts", default=str(ROOT / DEFAULT_PROMPTS))
    ap.add_argument("--json", default=str(OUT / "dev271.json"))
    ap.add_argument("--static-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.static_child:
        return static_child(a)
    systems = a.systems.split(",")
    if bad := set(systems) - set(SYSTEMS):
        sys.exit(f"--systems: unknown {sorted(bad)}; known: {', '.join(SYSTEMS)}")
    rows, notes, load0 = [], [], os.getloadavg()[0]
    if load0 > 0.5:
        print(f"warning: load average {load0:.2f} at start: other processes share the CPU and the figures "
              "will be low and noisy", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="dev271-") as tmp:
        inp = cbgen_input(a, Path(tmp) / "prompts.jsonl")
        for q in a.quantize.split(",") if "cbgen" in systems else []:
            print(f"cbgen run --dtype {a.dtype} --quantize {q} ...", file=sys.stderr)
            rows.append(cbgen_run(a, q, inp))
    if "static" in systems:
        print(f"HF static B={BATCH} ...", file=sys.stderr)
        rows.append(static_run(a))
    if "llama-server" in systems:
        rows += llama_runs(a, notes)
    result = {"command": shlex.join(sys.argv), "prompts": a.prompts, "limit": a.limit,
              "max_tokens": a.max_tokens, "threads": a.threads,
              "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
              "rows": rows, "ratios_whole_process": ratios(rows), "notes": notes}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    for n in notes:
        print(n)
    print("| system | tok/s (whole process) | tok/s (generation) | wall s | load s | generated tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['tok_s_process']} | {r['tok_s_generation']} | {r['process_s']} | "
              f"{r['load_s']} | {r['generated_tokens']} |")
    for system, rs in result["ratios_whole_process"].items():
        if rs:
            print(f"\n{system}, whole-process tok/s: " + ", ".join(f"{v}x {k}" for k, v in rs.items()))


if __name__ == "__main__":
    main()
