"""How much slower the transformers fallback (engine/hf_fallback.py) is than the paged engine.

The same weights (the embedded SmolLM2-135M, float32, loaded through transformers)
run three ways on the same prompts, greedy, a fixed number of tokens each:
the paged engine (what llama gets), the fallback (what gpt2 & co. get), and plain
``generate`` one prompt at a time (what a user would do without cbgen). The
greedy tokens of the two engines are compared too (not ``generate``'s: its
``min_new_tokens`` suppresses EOS, where the engines' ``ignore_eos`` only keeps
going after it; tests/test_fallback.py compares with ``generate`` on models that
do not emit EOS early).

    python benchmarks/fallback_speed.py [NUM_PROMPTS] [NEW_TOKENS]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cbgen.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from cbgen.engine.engine import Engine  # noqa: E402
from cbgen.engine.hf_fallback import make_fallback  # noqa: E402
from cbgen.models import load_model  # noqa: E402

TOPICS = ["the sea", "a fox", "Paris", "batching", "the weather", "a journey", "numbers", "museums"]


def run_engine(model, loaded, prompts, new):
    eng = Engine(model, loaded.tokenizer, EngineConfig(), max_model_len=loaded.max_model_len)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def run_generate(model, prompts, new):
    t0 = time.perf_counter()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)
        outs.append(y[0, len(ids):].tolist())
    return time.perf_counter() - t0, outs


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    loaded = load_model(ModelConfig(dtype="float32", device="cpu", impl="transformers"))
    tok = loaded.tokenizer
    prompts = [tok.encode(f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (#{i}).") for i in range(n)]
    with torch.inference_mode():
        gen_s, _ = run_generate(loaded.model, prompts, new)
    fb_s, fb_ids = run_engine(make_fallback(loaded.model), loaded, prompts, new)
    paged_s, paged_ids = run_engine(loaded.model, loaded, prompts, new)
    tokens = n * new
    print(f"{n} prompts x {new} greedy tokens, SmolLM2-135M float32, {torch.get_num_threads()} threads")
    for name, s in [("paged engine", paged_s), ("fallback", fb_s), ("generate, one at a time", gen_s)]:
        print(f"  {name:<24} {s:7.2f} s  {tokens / s:7.1f} tok/s")
    print(f"  fallback / paged time: {fb_s / paged_s:.1f}x;  fallback / generate time: {fb_s / gen_s:.2f}x")
    print(f"  identical greedy tokens, fallback vs paged: {sum(a == b for a, b in zip(fb_ids, paged_ids))}/{n}")


if __name__ == "__main__":
    main()
