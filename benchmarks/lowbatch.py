"""Issue #11's batch-1 must-show: `cbgen run` whole process, 1 sequence, 256 tokens, per-token
decode time, side by side with llama.cpp's `llama-bench` on the same weights, in one run.

    python benchmarks/lowbatch.py [--tokens 256] [--rounds 3] [--configs bfloat16:none,bfloat16:int8,...]

cbgen: for each ``dtype:quantize`` config a fresh `cbgen run -` process reads one prompt
(``ignore_eos``, greedy, ``--tokens`` new tokens) and its record's ``timings.tpot_s`` is the
per-token decode time (first token excluded; load time is reported apart as the process
wall minus the request's total). llama.cpp: `llama-bench -n TOKENS -p 0 -t THREADS -r 3 -o json`
on the embedded Q4_1 GGUF, a BF16 GGUF made from it (`llama-quantize --allow-requantize`) and
a Q8_0 one the same way. Rounds alternate the systems. Medians; writes
benchmarks/out/lowbatch.json. llama.cpp binaries: $CBGEN_LLAMACPP_BIN or
~/.cache/cbgen-bench/llama.cpp/build/bin (../shared/bench/build_llamacpp.sh), through
cbgen/bench/llamacpp.py; without them the llama.cpp rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cbgen.bench import llamacpp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def requantized(src: Path, kind: str) -> Path:
    """``src`` re-quantized to ``kind`` (BF16, Q8_0) once, into benchmarks/out/gguf."""
    if kind == "BF16":
        return llamacpp.bf16_gguf(src, OUT / "gguf")
    dest = OUT / "gguf" / f"{src.stem}-requant-{kind}.gguf"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(llamacpp.find_tool("llama-quantize")), "--allow-requantize", str(src), str(dest), kind],
                       check=True, capture_output=True)
    return dest


def cbgen_tpot(dtype: str, quantize: str, tokens: int, threads: int) -> dict:
    line = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cbgen.cli", "run", "-", "--dtype", dtype, "--quantize", quantize,
                        "--threads", str(threads)], input=line + "\n", capture_output=True, text=True, cwd=ROOT,
                       check=True)
    wall = time.perf_counter() - t0
    rec = json.loads(p.stdout.splitlines()[0])
    t = rec["timings"]
    return {"tpot_ms": t["tpot_s"] * 1e3, "ttft_ms": t["ttft_s"] * 1e3, "request_s": t["total_s"],
            "process_s": wall, "outside_request_s": wall - t["total_s"],
            "tokens": rec["usage"]["completion_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--configs", default="bfloat16:none,bfloat16:int8,float32:none,float32:int8")
    a = ap.parse_args()
    configs = [tuple(c.split(":")) for c in a.configs.split(",")]
    ggufs: dict[str, Path] = {}
    if llamacpp.find_tool("llama-bench") is None or llamacpp.find_tool("llama-quantize") is None:
        print(llamacpp.missing_note("llama-bench"), file=sys.stderr)
    else:
        src = llamacpp.select_ggufs((), None)[0]      # the embedded model's own GGUF (Q4_1)
        ggufs = {"Q4_1": src, "BF16": requantized(src, "BF16"), "Q8_0": requantized(src, "Q8_0")}
    cb: dict[str, list[dict]] = {f"{d}:{q}": [] for d, q in configs}
    lc: dict[str, list[float]] = {k: [] for k in ggufs}
    for r in range(a.rounds):
        for d, q in configs:
            cb[f"{d}:{q}"].append(cbgen_tpot(d, q, a.tokens, a.threads))
            print(f"round {r + 1} cbgen {d} {q}: {cb[f'{d}:{q}'][-1]['tpot_ms']:.2f} ms/token", file=sys.stderr)
        for k, g in ggufs.items():
            lc[k].append(llamacpp.run_llama_bench(g, a.threads, n_gen=a.tokens).ms_per_token)
            print(f"round {r + 1} llama.cpp {k}: {lc[k][-1]:.2f} ms/token", file=sys.stderr)
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in cb.items()}
    lmed = {k: statistics.median(v) for k, v in lc.items()}
    result = {"tokens": a.tokens, "threads": a.threads, "rounds": a.rounds, "cbgen": med, "cbgen_runs": cb,
              "llama_cpp_ms_per_token": lmed, "llama_cpp_runs": lc, "ggufs": {k: str(v) for k, v in ggufs.items()}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lowbatch.json").write_text(json.dumps(result, indent=1))
    print(f"| system | ms/token (median of {a.rounds}) | vs llama.cpp BF16 | vs llama.cpp Q4_1 |")
    print("|---|---:|---:|---:|")
    ref_bf16, ref_q41 = lmed.get("BF16"), lmed.get("Q4_1")
    ratio = lambda x, ref: f"{x / ref:.2f}" if ref else "-"   # noqa: E731
    for k, m in med.items():
        print(f"| cbgen run `--dtype {k.split(':')[0]} --quantize {k.split(':')[1]}` | {m['tpot_ms']:.2f} | "
              f"{ratio(m['tpot_ms'], ref_bf16)} | {ratio(m['tpot_ms'], ref_q41)} |")
    for k, v in lmed.items():
        print(f"| llama.cpp llama-bench {k} | {v:.2f} | {ratio(v, ref_bf16)} | {ratio(v, ref_q41)} |")


if __name__ == "__main__":
    main()
