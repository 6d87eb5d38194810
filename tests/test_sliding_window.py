"""Sliding-window attention in the paged engine (attention.py, csrc/paged_decode.c).

A query at position q sees keys q - W < k <= q (transformers' sliding_window_overlay).
The kernel is checked against a direct softmax over the last W keys, with every slot
before the window filled with NaN (it must never be read). A tiny random Mistral
(sliding_window=16, float32) through the engine must equal HF ``generate`` greedy,
token for token, for prompts longer than the window and outputs crossing it, several
at once, with chunked prefill, a prefix-cache hit and preemption, on the native
kernel and on the torch path, through cbgen's llama forward and transformers' modules.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re

import pytest
import torch
from helpers import hf_greedy, sharpen, skip_without_native_kernel
from test_attention import make_case, reference

from cbgen.config import EngineConfig, SamplingParams, cache_root
from cbgen.engine import paged_kernel
from cbgen.engine.attention import PrefillChunk
from cbgen.engine.engine import Engine
from cbgen.engine.native_build import CSRC

WINDOW = 16


# ---- the kernel --------------------------------------------------------------

def test_kernel_prototypes_match_ctypes_argtypes():
    """csrc/paged_decode.h states the C signatures once; paged_kernel's argtypes must agree."""
    header = (CSRC / "paged_decode.h").read_text()
    protos = dict(re.findall(r"int\s+(paged_decode_\w+)\(([^)]*)\);", header))
    assert set(protos) == {"paged_decode_bf16", "paged_decode_f32"}
    for name, params in protos.items():
        want = []
        for p in params.split(","):
            p = " ".join(p.split())
            want.append(ctypes.c_void_p if "*" in p else ctypes.c_float if p.startswith("float ")
                        else ctypes.c_int if p.startswith("int ") else p)
        assert want == paged_kernel._ARGTYPES, name
    assert '#include "paged_decode.h"' in (CSRC / "paged_decode.c").read_text()   # the compiler checks it too


@pytest.fixture(scope="module")
def kernel():
    from helpers import native_or_skip

    return native_or_skip(paged_kernel.load(cache_root() / "kernels"), "native attention kernel")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,KVH,D,bs", [(9, 3, 64, 16), (4, 1, 256, 16), (8, 2, 128, 32), (6, 1, 32, 16)])
@pytest.mark.parametrize("window", [1, 5, 16, 17, 40])
def test_kernel_window_matches_direct_softmax(kernel, dtype, tol, H, KVH, D, bs, window):
    lens = [1, bs, bs + 1, 3 * bs, 2 * bs - 1, 77, window, window + 1]
    q, k, v, tables, lens_t, ref_k, ref_v = make_case(dtype, H, KVH, D, bs, lens, seed=window)
    # Poison every slot before each window: the kernel must not read it (K may be read
    # in the window's first block and masked; V before the window never).
    for i, n in enumerate(lens):
        for t in range(max(0, n - window)):
            b, o = int(tables[i, t // bs]), t % bs
            k[b, :, :, o] = float("nan")
            v[b * bs + o] = float("nan")
    out = torch.empty_like(q)
    kernel(q, k, v, out, tables, lens_t, bs, D ** -0.5, window)
    expected = reference(q, [kk[-window:] for kk in ref_k], [vv[-window:] for vv in ref_v], D ** -0.5)
    assert torch.isfinite(out).all(), "read a slot before the window"
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_kernel_window_wider_than_context_is_bit_identical_to_full(kernel):
    q, k, v, tables, lens_t, _, _ = make_case(torch.float32, 8, 2, 64, 16, [1, 16, 33, 77])
    full, wide = torch.empty_like(q), torch.empty_like(q)
    kernel(q, k, v, full, tables, lens_t, 16, 0.125)
    kernel(q, k, v, wide, tables, lens_t, 16, 0.125, 77)
    assert torch.equal(full, wide)


# ---- prefill masks -------------------------------------------------------------

def brute_mask(first: int, n: int, k_from: int, window: int | None) -> torch.Tensor:
    return torch.tensor([[k <= q and (window is None or q - k < window) for k in range(k_from, first + n)]
                         for q in range(first, first + n)])


@pytest.mark.parametrize("window", [None, 1, 5, 16, 40])
@pytest.mark.parametrize("first,n", [(0, 1), (0, 16), (0, 17), (0, 50), (5, 3), (32, 20), (70, 1), (64, 40)])
def test_prefill_chunk_view(window, first, n):
    bs = 16
    chunk = PrefillChunk(100, 100 + n, first + n, None if first == 0 else torch.arange(-(-(first + n) // bs)))
    view = chunk.view(window, bs, torch.device("cpu"))
    assert chunk.view(window, bs, torch.device("cpu")) is view          # built once per step per window
    if first == 0:
        assert view.first_block == 0
        if window is None or n <= window:
            assert view.mask is None                                    # is_causal=True is exact
        else:
            assert torch.equal(view.mask, brute_mask(0, n, 0, window))
    else:
        k_from = view.first_block * bs
        assert torch.equal(view.mask, brute_mask(first, n, k_from, window))
        # No key the chunk's first query can see lies before the gathered blocks.
        assert window is None and k_from == 0 or k_from <= max(0, first - window + 1) < k_from + bs


# ---- a tiny Mistral through the engine ----------------------------------------

@pytest.fixture(scope="module")
def tiny_mistral(sharp):
    from transformers import MistralConfig, MistralForCausalLM

    tok = sharp.tokenizer
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                        sliding_window=WINDOW, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = sharpen(MistralForCausalLM(cfg).eval())
    return dataclasses.replace(sharp, model=model)


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def two_rounds(loaded, n_new: int, lengths: list[int], **cfg) -> tuple[Engine, list, list]:
    """Round 1: prompts of ``lengths`` at once; round 2: prompts that share round 1's
    first 48 tokens (3 full blocks: a prefix-cache hit) and continue differently."""
    impl = cfg.pop("impl", "auto")
    eng = Engine.from_loaded(dataclasses.replace(loaded, impl=impl), EngineConfig(max_num_seqs=4, **cfg))
    vocab = loaded.model.config.vocab_size
    first = random_prompts(vocab, lengths)
    second = [p[:48] + tail for p, tail in zip(first, random_prompts(vocab, [7, 30, 19], seed=1))]
    prompts, got = first + second, []
    params = SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new)
    for ps in (first, second):
        got += [o.token_ids for o in eng.generate(ps, [params] * len(ps))]
    return eng, prompts, got


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("attention", ["native", "torch"])
def test_mistral_sliding_window_matches_hf_greedy(tiny_mistral, attention, impl):
    skip_without_native_kernel(attention)
    n_new = 24
    eng, prompts, got = two_rounds(tiny_mistral, n_new, [40, 67, 90, 55], attention=attention, impl=impl,
                                   max_num_batched_tokens=32)
    assert (type(eng.model).__name__ == "LlamaForward") == (impl == "native")
    assert (eng.runner.kernel is not None) == (attention == "native")
    if impl == "native":
        assert eng.model.windows == (WINDOW,) * 3
    stats = eng.stats()
    assert stats.prefix_hit_rate > 0
    want = [hf_greedy(tiny_mistral.model, p, n_new) for p in prompts]
    assert got == want


def test_mistral_reference_depends_on_the_window(tiny_mistral):
    """The oracle is not blind to the window: full attention gives other tokens."""
    model = tiny_mistral.model
    prompts = random_prompts(model.config.vocab_size, [40, 67, 90, 55])
    windowed = [hf_greedy(model, p, 24) for p in prompts]
    model.config.sliding_window = None
    try:
        full = [hf_greedy(model, p, 24) for p in prompts]
    finally:
        model.config.sliding_window = WINDOW
    assert windowed != full


@pytest.mark.parametrize("attention", ["native", "torch"])
def test_mistral_sliding_window_survives_preemption(tiny_mistral, attention):
    """A pool too small for every sequence: preempted ones are recomputed from position 0."""
    skip_without_native_kernel(attention)
    n_new = 30
    prompts = random_prompts(tiny_mistral.model.config.vocab_size, [60, 75, 50, 85], seed=3)
    eng = Engine.from_loaded(tiny_mistral, EngineConfig(max_num_seqs=4, num_kv_blocks=16, attention=attention,
                                                        max_num_batched_tokens=64))
    got = [o.token_ids for o in eng.generate(prompts, [SamplingParams(max_new_tokens=n_new,
                                                                      min_new_tokens=n_new)] * 4)]
    assert eng.stats().num_preemptions > 0
    assert got == [hf_greedy(tiny_mistral.model, p, n_new) for p in prompts]


def test_qwen2_mixed_layer_windows_match_hf_greedy(sharp):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide, the others are full."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    skip_without_native_kernel("native")
    tok = sharp.tokenizer
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      use_sliding_window=True, sliding_window=12, max_window_layers=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    loaded = dataclasses.replace(sharp, model=sharpen(Qwen2ForCausalLM(cfg).eval()))
    eng, prompts, got = two_rounds(loaded, 20, [40, 61, 33], max_num_batched_tokens=32)
    assert eng.model.windows == (None, 12, 12)
    assert got == [hf_greedy(loaded.model, p, 20) for p in prompts]
