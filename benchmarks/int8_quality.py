"""Issue #11: the quality cost of ``--quantize int8``, through `cbgen run`.

    python benchmarks/int8_quality.py [--dtype bfloat16] [--max-tokens 128] [--limit N]

1. Greedy agreement: the dev prompts (../shared/bench/prompts-dev.jsonl, chat messages),
   ``--max-tokens`` new tokens each, greedy, natural EOS, once with ``--quantize none`` and
   once with ``--quantize int8`` (same ``--dtype``). Reported: prompts whose outputs are
   token-for-token identical, and the mean share of each reference output matched before
   the first differing token.
2. Perplexity on a fixed text: the user messages of the dev prompts joined with blank
   lines, cut into passages of about ``--passage-words`` words, scored as prompts
   (``prompt_logprobs: 0``, one generated token). perplexity = exp(-mean log p) over every
   scored token of every passage; the same token ids for every configuration.

Configurations: ``none`` and ``int8`` in ``--dtype`` and, with ``--also-float32``, in float32.
Writes benchmarks/out/int8_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / ".." / "shared" / "bench" / "prompts-dev.jsonl"
OUT = ROOT / "benchmarks" / "out"


def run(lines: list[dict], dtype: str, quantize: str) -> dict[str, dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    p = subprocess.run([sys.executable, "-m", "cbgen.cli", "run", f.name, "--dtype", dtype, "--quantize", quantize],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    Path(f.name).unlink()
    recs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    print(p.stderr.strip().splitlines()[-1], file=sys.stderr)
    return {r["id"]: r for r in recs}


def agreement(ref: dict[str, dict], got: dict[str, dict]) -> dict:
    same, prefix = 0, []
    for rid, r in ref.items():
        a = [t["token_id"] for t in r["logprobs"]]          # "logprobs": 0 gives each token's id
        b = [t["token_id"] for t in got[rid]["logprobs"]]
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"identical": same, "prompts": len(ref), "mean_prefix_match": sum(prefix) / len(prefix)}


def perplexity(recs: dict[str, dict]) -> tuple[float, int]:
    lps = [t["logprob"] for r in recs.values() for t in r["prompt_logprobs"] if t is not None]
    return math.exp(-sum(lps) / len(lps)), len(lps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--also-float32", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="first N dev prompts (0: all)")
    ap.add_argument("--passage-words", type=int, default=300)
    a = ap.parse_args()
    rows = [json.loads(ln) for ln in PROMPTS.read_text().splitlines() if ln.strip()]
    rows = rows[:a.limit] if a.limit else rows
    greedy = [{"id": r["id"], "messages": r["messages"], "max_tokens": a.max_tokens, "temperature": 0.0,
               "logprobs": 0} for r in rows]
    words = "\n\n".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "user").split(" ")
    passages = [{"id": f"ppl-{i}", "prompt": " ".join(words[i:i + a.passage_words]), "max_tokens": 1,
                 "prompt_logprobs": 0} for i in range(0, len(words), a.passage_words)]
    dtypes = [a.dtype] + (["float32"] if a.also_float32 and a.dtype != "float32" else [])
    result: dict = {"prompts": len(rows), "max_tokens": a.max_tokens, "passages": len(passages), "configs": {}}
    for dtype in dtypes:
        ref = None
        for q in ("none", "int8"):
            recs = run(greedy + passages, dtype, q)
            g = {k: v for k, v in recs.items() if not k.startswith("ppl-")}
            ppl, n = perplexity({k: v for k, v in recs.items() if k.startswith("ppl-")})
            entry = {"perplexity": ppl, "scored_tokens": n}
            if ref is None:
                ref = g
            else:
                entry.update(agreement(ref, g))
            result["configs"][f"{dtype}:{q}"] = entry
            print(f"{dtype} {q}: {entry}", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int8_quality.json").write_text(json.dumps(result, indent=1))
    print(f"| config | perplexity ({result['configs'][dtypes[0] + ':none']['scored_tokens']} tokens) | "
          f"identical greedy outputs | mean matched prefix |")
    print("|---|---:|---:|---:|")
    for k, e in result["configs"].items():
        same = f"{e['identical']}/{e['prompts']}" if "identical" in e else "(reference)"
        pre = f"{e['mean_prefix_match']:.1%}" if "mean_prefix_match" in e else "-"
        print(f"| {k} | {e['perplexity']:.3f} | {same} | {pre} |")


if __name__ == "__main__":
    main()
