"""A 1B-class scale test: cbgen vs llama.cpp on the same Q8_0 GGUF (issue #12).

For cbgen, every figure comes from a fresh ``cbgen run`` process (what users run):

* load: the model load as ``cbgen run`` reports it (first run: the conversion;
  later runs: the cached safetensors), and the process's peak RSS (VmHWM);
* decode tok/s at 1, 16 and 64 sequences: N prompts of ``--prompt-tokens``
  tokens, ``--tokens`` new tokens each (EOS ignored), all at once
  (``--max-num-seqs N``); tok/s is generated tokens over cbgen's own
  "generated in Xs" (from the first input read to the last record), so load
  time does not blur it.

llama.cpp, the same GGUF file, the same thread count, in the same session:
``llama-batched-bench -npp P -ntg T -npl 1,16,64`` (its S_TG t/s: decode
tokens per second over all sequences, and S t/s: prompt + decode, the figure
comparable to cbgen's), and ``llama-bench -n T`` for batch-1 decode. Skipped
with a one-line note when no llama.cpp binary is found (``../shared/bench/build_llamacpp.sh``).

Run on a quiet machine, one benchmark at a time:

    .venv/bin/python benchmarks/make_synthetic.py /tmp/llama1b          # once: safetensors + Q8_0 GGUF
    .venv/bin/python benchmarks/scale_1b.py /tmp/llama1b/*.gguf --llamacpp-bin ~/.cache/cbgen-bench/llama.cpp/build/bin
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
from pathlib import Path

SUMMARY = re.compile(r"cbgen: (\d+) requests, (\d+) tokens generated in ([\d.]+)s")
LOADED = re.compile(r"loaded .* in ([\d.]+) ?s", re.IGNORECASE)


def _peak_rss_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def cbgen_run(gguf: str, n: int, args, env: dict) -> dict:
    """One ``cbgen run`` of ``n`` prompts at once; its figures."""
    with tempfile.TemporaryDirectory(prefix="cbgen-1b-") as tmp:
        src = Path(tmp) / "in.jsonl"
        words = " ".join(["lorem"] * args.prompt_tokens)
        src.write_text("".join(json.dumps({"prompt": f"{i} {words}", "max_tokens": args.tokens,
                                           "ignore_eos": True}) + "\n" for i in range(n)))
        cmd = [sys.executable, "-m", "cbgen.cli", "run", str(src), "-o", str(Path(tmp) / "out.jsonl"),
               "--model", gguf, "--max-num-seqs", str(n), "--no-progress", *args.cbgen_args]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        peak = 0.0
        while p.poll() is None:
            peak = max(peak, _peak_rss_gb(p.pid) or 0.0)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        err = p.stderr.read()
        m = SUMMARY.search(err)
        if p.returncode != 0 or m is None:
            sys.exit(f"cbgen run ({n} seqs) failed (exit {p.returncode}):\n{err[-2000:]}")
        tokens, gen_s = int(m[2]), float(m[3])
        return {"seqs": n, "tokens": tokens, "generate_s": gen_s, "tok_s": tokens / gen_s, "wall_s": wall,
                "load_s": wall - gen_s, "peak_rss_gb": peak}


def llamacpp(gguf: str, bin_dir: Path, args) -> dict:
    threads = str(args.threads or os.cpu_count())
    out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", gguf, "-c", str(64 * (args.prompt_tokens + args.tokens) + 64),
                          "-b", "2048", "-ub", "512", "-npp", str(args.prompt_tokens), "-ntg", str(args.tokens),
                          "-npl", "1,16,64", "-t", threads, "--output-format", "jsonl"],
                         capture_output=True, text=True, timeout=3600)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not rows:
        return {"error": (out.stderr or out.stdout)[-500:]}
    return {r["pl"]: {"S_TG t/s": r["speed_tg"], "S t/s": r["speed"], "T s": r["t"]} for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=32, help="New tokens per sequence.")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="About this many prompt tokens per sequence.")
    ap.add_argument("--seqs", default="1,16,64")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--llamacpp-bin", default=os.path.expanduser("~/.cache/cbgen-bench/llama.cpp/build/bin"))
    ap.add_argument("cbgen_args", nargs="*", help="More `cbgen run` options, after --.")
    args = ap.parse_args()
    env = dict(os.environ)
    results = {"gguf": args.gguf, "size_gb": os.path.getsize(args.gguf) / 1e9, "cbgen": [], "llama.cpp": None}
    for n in [int(x) for x in args.seqs.split(",")]:
        r = cbgen_run(args.gguf, n, args, env)
        results["cbgen"].append(r)
        print(f"cbgen {n:>3} seqs: {r['tok_s']:.2f} tok/s ({r['tokens']} tokens in {r['generate_s']:.1f} s), "
              f"load+exit {r['load_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    bin_dir = Path(args.llamacpp_bin)
    if (bin_dir / "llama-batched-bench").is_file():
        results["llama.cpp"] = llamacpp(args.gguf, bin_dir, args)
        print(f"llama.cpp: {results['llama.cpp']}", file=sys.stderr)
    else:
        print(f"note: no llama.cpp binary in {bin_dir} (build it with ../shared/bench/build_llamacpp.sh); "
              "llama.cpp skipped", file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
