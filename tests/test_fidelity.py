"""Fidelity oracle on the real model: the engine's fp32 greedy output, with requests joining
and leaving a 4-sequence batch, is token-identical to HF ``generate`` run one prompt at a time.

The full figure (64 prompts x 128 tokens) is ``benchmarks/fidelity.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import hf_greedy

from cbgen.bench.workloads import load_prompts

# The shared dev prompts live next to the repo: ../shared/bench/prompts-dev.jsonl from its root.
PROMPTS = Path(__file__).resolve().parent.parent / ".." / "shared" / "bench" / "prompts-dev.jsonl"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PROMPTS.is_file(),
                       reason=f"dev prompts not found: {PROMPTS} (expected ../shared/bench/prompts-dev.jsonl "
                              "relative to the repo root)"),
]

NUM_PROMPTS = 8
MAX_NEW = [48, 40, 32, 48, 44, 36, 48, 40]   # unequal lengths: requests leave and join mid-flight


@pytest.fixture
def real_model(embedded_model):
    """The shared embedded model, its attention implementation restored afterwards: the
    engine switches it to the paged one, which plain HF ``generate`` in later tests cannot run."""
    prev = embedded_model.model.config._attn_implementation
    yield embedded_model
    embedded_model.model.set_attn_implementation(prev)


def test_engine_greedy_matches_hf_generate_on_chat_prompts(real_model):
    import torch

    from cbgen.config import EngineConfig, SamplingParams
    from cbgen.engine.engine import Engine

    loaded = real_model
    assert loaded.dtype == torch.float32
    prompts = load_prompts(PROMPTS, loaded.tokenizer, NUM_PROMPTS)
    expected = [hf_greedy(loaded.model, p, n) for (_, p), n in zip(prompts, MAX_NEW)]

    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=4))
    outs = eng.generate([p for _, p in prompts],
                        [SamplingParams(max_new_tokens=n, min_new_tokens=n) for n in MAX_NEW])
    assert eng.block_manager.all_free()

    mismatches = []
    for (pid, _), o, e in zip(prompts, outs, expected):
        assert len(o.token_ids) == len(e)
        if o.token_ids != e:
            first = next(i for i, (a, b) in enumerate(zip(o.token_ids, e)) if a != b)
            mismatches.append(f"{pid}: first divergence at token {first}")
    assert len(mismatches) <= NUM_PROMPTS // 8, "; ".join(mismatches)
