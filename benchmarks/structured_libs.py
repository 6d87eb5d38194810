"""llguidance vs xgrammar on the extraction schema with the SmolLM2 tokenizer (vocab 49152).

    PYTHONPATH=. python benchmarks/structured_libs.py [--rounds 3]

Prints, per library: tokenizer set-up, compile time of the extraction schema
(cold: a new compiler, no cache), and the mean time to fill the next-token
bitmasks of 1 / 16 / 64 matchers per decode step, each matcher walking a
different valid extraction output token by token (the batch API of each
library: llguidance ``LLExecutor``, xgrammar ``BatchGrammarMatcher``).
Numbers from a loaded machine are not results; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_extraction import SCHEMA  # noqa: E402

SIZES = (1, 16, 64)


def sample_outputs(n: int) -> list[str]:
    """``n`` different valid extraction outputs (what the model would write)."""
    sent = ["positive", "neutral", "negative"]
    words = ["time", "stress", "python", "energy", "health", "travel", "budget", "music", "sleep", "code"]
    return [json.dumps({"title": f"How to manage {words[i % 10]} and {words[(i * 3 + 1) % 10]} better",
                        "sentiment": sent[i % 3], "keywords": words[i % 7:i % 7 + 1 + i % 5]})
            for i in range(n)]


def walk(n: int, token_lists, fill, accept) -> float:
    """Mean seconds per step to fill ``n`` masks while each matcher consumes its own tokens."""
    steps = max(len(t) for t in token_lists[:n])
    times = []
    for s in range(steps):
        live = [i for i in range(n) if s < len(token_lists[i])]
        t0 = time.perf_counter()
        fill(live)
        times.append(time.perf_counter() - t0)
        for i in live:
            accept(i, token_lists[i][s])
    return statistics.mean(times)


def bench_llguidance(tok, vocab: int, rounds: int) -> dict:
    import llguidance
    import llguidance.hf
    import torch
    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=[tok.eos_token_id])
    setup = time.perf_counter() - t0
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    compile_s = []
    for r in range(rounds):
        schema = {**SCHEMA, "description": f"round {r}"}   # new content: no cache hit
        t0 = time.perf_counter()
        template = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=opts))
        compile_s.append(time.perf_counter() - t0)
        assert not template.is_error(), template.get_error()
    execu = llguidance.LLExecutor()
    words = (vocab + 31) // 32
    mask = torch.zeros((max(SIZES), words), dtype=torch.int32)
    toks = [tok.encode(s) for s in sample_outputs(max(SIZES))]
    per_step = {}
    for n in SIZES:
        ms = [template.deep_copy() for _ in range(n)]

        def fill(live):
            if len(live) == 1:
                ms[live[0]].unsafe_compute_mask_ptr(mask[live[0]].data_ptr(), words * 4)
            else:
                execu.unsafe_compute_mask_ptr([(ms[i], i) for i in live], mask.data_ptr(), words * 4, n)

        per_step[n] = walk(n, toks, fill, lambda i, t: ms[i].consume_token(t))
        assert not any(m.is_error() for m in ms)
    return {"setup_s": setup, "compile_s": statistics.median(compile_s), "mask_s": per_step}


def bench_xgrammar(tok, vocab: int, rounds: int) -> dict:
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    setup = time.perf_counter() - t0
    compile_s = []
    for r in range(rounds):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps({**SCHEMA, "description": f"round {r}"}),
                                                any_whitespace=False, separators=(", ", ": "))
        compile_s.append(time.perf_counter() - t0)
    mask = xgr.allocate_token_bitmask(max(SIZES), vocab)
    batch = xgr.BatchGrammarMatcher()
    toks = [tok.encode(s) for s in sample_outputs(max(SIZES))]
    per_step = {}
    for n in SIZES:
        ms = [xgr.GrammarMatcher(compiled) for _ in range(n)]

        def fill(live):
            if len(live) == 1:
                ms[live[0]].fill_next_token_bitmask(mask, live[0])
            else:
                batch.batch_fill_next_token_bitmask([ms[i] for i in live], mask, live)

        per_step[n] = walk(n, toks, fill, lambda i, t: ms[i].accept_token(t))
    return {"setup_s": setup, "compile_s": statistics.median(compile_s), "mask_s": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="cold compiles per library (median reported)")
    args = ap.parse_args()
    from cbgen.config import ModelConfig
    from cbgen.models import load_model
    loaded = load_model(ModelConfig())
    vocab = loaded.model.config.vocab_size
    print(f"extraction schema, SmolLM2 tokenizer (vocab {vocab})")
    print(f"{'library':<12} {'tokenizer s':>11} {'compile ms':>10} " + " ".join(f"{f'mask ms @{n}':>11}" for n in SIZES))
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            r = fn(loaded.tokenizer, vocab, args.rounds)
        except ImportError as e:
            print(f"{name:<12} not installed ({e})")
            continue
        print(f"{name:<12} {r['setup_s']:>11.2f} {r['compile_s'] * 1e3:>10.1f} "
              + " ".join(f"{r['mask_s'][n] * 1e3:>11.3f}" for n in SIZES))


if __name__ == "__main__":
    main()
