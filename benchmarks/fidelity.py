"""Fidelity oracle: the engine's greedy output vs HF ``generate`` one prompt at a time.

The first ``--num-prompts`` dev prompts (../shared/bench/prompts-dev.jsonl from the repo
root), chat template applied, run all at once through the engine (``--max-num-seqs``
running together, so requests join and leave mid-flight), each for exactly
``--max-new-tokens`` greedy tokens (EOS suppressed on both sides, as HF's
``min_new_tokens`` does; ``--natural`` lets EOS end a sequence instead). Both sides run
in float32 on the same checkpoint (the engine loads it as `cbgen run` does, HF as transformers).

Prints the figure (identical prompts / total) and, for each mismatch, the first
diverging position with HF's top-2 logit gap there (a gap near 0 is a numerical
near-tie, not a scheduling bug). Writes benchmarks/out/fidelity.json.

    .venv/bin/python benchmarks/fidelity.py [--num-prompts 64] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = ROOT / ".." / "shared" / "bench" / "prompts-dev.jsonl"


def hf_generate(model, prompt: list[int], n: int, natural: bool):
    """Greedy tokens and, per step, (top-1 minus top-2 logit, rank table) from the processed scores."""
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=0 if natural else n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [s[0].float() for s in out.scores]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="auto", choices=["auto", "native", "torch"],
                    help="engine decode attention (EngineConfig.attention)")
    ap.add_argument("--impl", default="auto", choices=["auto", "native", "transformers"],
                    help="how the engine's model is loaded (ModelConfig.impl)")
    ap.add_argument("--natural", action="store_true", help="let EOS end sequences (default: exact length)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "fidelity.json")
    args = ap.parse_args(argv)

    if not args.prompts.is_file():
        print(f"prompts not found: {args.prompts}", file=sys.stderr)
        return 2

    import torch

    from cbgen.config import EngineConfig, ModelConfig, SamplingParams
    from cbgen.bench.workloads import load_prompts
    from cbgen.engine.engine import Engine
    from cbgen.models import load_model

    # The engine gets the model as `cbgen run` loads it (natively where possible);
    # HF generate needs transformers' model class: a second load of the same files
    # unless the first already is one.
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype, device="cpu", impl=args.impl),
                        status=lambda m: print(f"[model] {m}", file=sys.stderr))
    model = (load_model(ModelConfig(model=args.model, dtype=args.dtype, device="cpu", impl="transformers")).model
             if loaded.native else loaded.model)
    tok = loaded.tokenizer
    prompts = load_prompts(args.prompts, tok, args.num_prompts)
    n_new = args.max_new_tokens
    print(f"{loaded.name} {loaded.dtype} threads={torch.get_num_threads()}: {len(prompts)} prompts "
          f"x {n_new} tokens, max_num_seqs={args.max_num_seqs}", file=sys.stderr)

    # Engine first: all prompts at once.
    t0 = time.perf_counter()
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=args.max_num_seqs, attention=args.attention))
    params = SamplingParams(max_new_tokens=n_new, min_new_tokens=0 if args.natural else n_new)
    outs = eng.generate([p for _, p in prompts], params)
    engine_s = time.perf_counter() - t0
    assert eng.block_manager.all_free()
    stats = eng.stats()
    print(f"engine: {engine_s:.1f} s, {stats.num_steps} steps, {stats.num_generated_tokens} tokens", file=sys.stderr)

    # HF one at a time, in its own attention (an engine on transformers' modules of this
    # same model object registered cbgen's paged attention on it).
    model.set_attn_implementation("sdpa")
    t0 = time.perf_counter()
    rows = []
    for k, ((pid, p), o) in enumerate(zip(prompts, outs)):
        ref, scores = hf_generate(model, p, n_new, args.natural)
        got = o.token_ids
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if first is None and len(got) != len(ref):
            first = min(len(got), len(ref))
        row = {"id": pid, "prompt_tokens": len(p), "identical": first is None,
               "engine_tokens": len(got), "hf_tokens": len(ref)}
        if first is not None:
            row["first_divergence"] = first
            if first < len(scores):
                s = scores[first]
                top2 = s.topk(2).values.tolist()
                row["hf_top2_logit_gap"] = round(top2[0] - top2[1], 6)
                if first < len(got):
                    row["engine_token_hf_rank"] = int((s > s[got[first]]).sum())
                    row["engine_vs_hf_logit_gap"] = round(float(s.max() - s[got[first]]), 6)
            row["engine_text"] = tok.decode(got[first:first + 20])
            row["hf_text"] = tok.decode(ref[first:first + 20])
        rows.append(row)
        print(f"  [{k + 1}/{len(prompts)}] {pid}: "
              + ("identical" if first is None else
                 f"diverges at {first} (HF top-2 gap {row.get('hf_top2_logit_gap')})"), file=sys.stderr)
    hf_s = time.perf_counter() - t0

    same = sum(r["identical"] for r in rows)
    summary = {
        "model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
        "num_prompts": len(rows), "max_new_tokens": n_new, "max_num_seqs": args.max_num_seqs,
        "mode": "natural" if args.natural else "exact-length",
        "attention": "native" if eng.runner.kernel else "torch",
        "forward": type(eng.model).__name__,
        "identical": same, "fraction": round(same / len(rows), 4),
        "engine_seconds": round(engine_s, 1), "hf_seconds": round(hf_s, 1),
        "engine_preemptions": stats.num_preemptions, "prefix_hit_rate": round(stats.prefix_hit_rate, 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "prompts": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"fidelity: {same}/{len(rows)} prompts token-identical ({100 * same / len(rows):.1f}%), "
          f"{n_new} tokens each, engine {engine_s:.0f} s vs HF {hf_s:.0f} s")
    for r in rows:
        if not r["identical"]:
            print(f"  {r['id']}: first divergence at token {r['first_divergence']}, "
                  f"HF top-2 logit gap {r.get('hf_top2_logit_gap')}")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
