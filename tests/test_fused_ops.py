"""The native residual add + RMSNorm (bf16) against the torch ops it replaces, and its
place in the engine: on for bf16 native forwards, off for float32 and when switched off."""

from __future__ import annotations

import copy

import pytest
import torch

from cbgen.config import EngineConfig, cache_root
from cbgen.engine import fused_ops
from cbgen.engine.engine import Engine
from cbgen.engine.llama import _rms


@pytest.fixture(scope="module")
def ops():
    from helpers import native_or_skip

    return native_or_skip(fused_ops.load(cache_root() / "kernels"), "native fused ops")


@pytest.mark.parametrize("T", [1, 7, 64, 130])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_matches_torch_ops(ops, T, with_delta):
    g = torch.Generator().manual_seed(T)
    n = 576
    h = (torch.randn(T, n, generator=g) * 3).bfloat16()
    delta = torch.randn(T, n, generator=g).bfloat16() if with_delta else None
    w = (torch.rand(n, generator=g) + 0.5).bfloat16()
    ref_h = h + delta if with_delta else h.clone()
    ref = _rms(ref_h, w, 1e-5)
    out = ops.add_rmsnorm(h, delta, w, 1e-5)
    assert torch.equal(h, ref_h)                      # the residual sum, in place, bit for bit
    diff = out.float() - ref.float()
    # Rarely and barely apart: the float32 mean or rsqrt may round differently, which moves
    # the normalised value by one bf16 ulp and the product with the weight by at most two.
    assert (diff.abs() <= ref.float().abs() * 2 ** -6).all()
    assert (out != ref).float().mean().item() < 1e-3


def test_add_rmsnorm_keeps_nan_and_inf(ops):
    h = torch.zeros(2, 32).bfloat16()
    h[0, 3] = float("nan")
    h[1, 5] = float("inf")
    out = ops.add_rmsnorm(h, None, torch.ones(32).bfloat16(), 1e-5)
    assert out[0].isnan().all()                       # as torch: NaN poisons the row's mean
    assert _rms(h, torch.ones(32).bfloat16(), 1e-5)[0].isnan().all()


def test_engine_uses_it_for_bf16_only(tiny_loaded, ops, monkeypatch):
    import dataclasses

    from cbgen.engine.llama import LlamaForward

    bf16 = dataclasses.replace(tiny_loaded, model=copy.deepcopy(tiny_loaded.model).to(torch.bfloat16))
    assert Engine.from_loaded(bf16).runner.fused is not None
    assert Engine.from_loaded(tiny_loaded).runner.fused is None                   # float32: exact torch ops
    monkeypatch.setenv("CBGEN_NATIVE_KERNEL", "0")
    assert fused_ops.load(cache_root() / "kernels") is None
    assert LlamaForward.supports(bf16.model)


def test_bf16_logits_with_and_without_it_agree(tiny_loaded, ops):
    """The same prefill step (3 prompts) through the forward with the fused op and with the torch ops."""
    import dataclasses

    bf16 = dataclasses.replace(tiny_loaded, model=copy.deepcopy(tiny_loaded.model).to(torch.bfloat16))
    eng = Engine.from_loaded(bf16, EngineConfig(max_num_seqs=4))
    for i, ids in enumerate([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21]]):
        eng.add_request(str(i), ids)
    eng._drain_inbox()
    ids, pos, keep, batch, _ = eng.runner._batch(eng.scheduler.schedule())
    assert batch.fused is not None
    assert type(eng.model).__name__ == "LlamaForward"
    fused = eng.model.forward(ids[0], pos[0], batch, keep).float()
    batch.fused = None
    plain = eng.model.forward(ids[0], pos[0], batch, keep).float()
    assert fused.shape == plain.shape == (3, tiny_loaded.model.config.vocab_size)
    assert (fused - plain).abs().max().item() <= 0.02 * plain.abs().max().item()
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_argmax_is_torchs_on_float32(ops):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1000, generator=g).bfloat16()
    x[1, 10] = x[1, 500] = 40          # tie: the first index
    x[2, :] = float("-inf")            # all -inf: index 0
    x[3, 7] = float("nan")             # NaN wins, as in torch
    x[3, 700] = 99
    x[4, 999] = float("inf")
    assert torch.equal(ops.argmax(x), x.float().argmax(-1))
    assert ops.argmax(x)[[1, 2, 3, 4]].tolist() == [10, 0, 7, 999]


def test_sampler_uses_it_only_for_plain_greedy_rows(ops):
    from cbgen.config import SamplingParams
    from cbgen.engine.request import Request
    from cbgen.engine.sampler import sample

    calls = []

    def spy(logits):
        calls.append(logits.shape)
        return ops.argmax(logits)

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)).bfloat16()
    greedy = [Request(str(i), [1, 2], SamplingParams(), frozenset()) for i in range(2)]
    assert sample(logits, greedy, spy).token_ids == logits.float().argmax(-1).tolist()
    assert calls == [(2, 50)]
    for params in (SamplingParams(temperature=0.7, seed=1),
                   SamplingParams(repetition_penalty=1.3), SamplingParams(min_new_tokens=3)):
        reqs = [greedy[0], Request("x", [1, 2], params, frozenset())]
        sample(logits, reqs, spy)
        assert len(calls) == 1, params      # the float32 path handled it
    # Logprobs do not change how tokens are picked: greedy rows asking for them keep the native path.
    res = sample(logits, [greedy[0], Request("x", [1, 2], SamplingParams(logprobs=3), frozenset())], spy)
    assert len(calls) == 2 and res.token_ids == logits.float().argmax(-1).tolist()
    assert res.logprobs[0] is None and res.logprobs[1].top_token_ids[0] == res.token_ids[1]


@pytest.mark.parametrize("T", [1, 5, 64])
def test_rope_is_bit_identical_to_the_torch_ops(ops, T):
    from cbgen.engine.llama import Rope, _rope

    H, KVH, D = 9, 3, 64
    g = torch.Generator().manual_seed(T)
    qkv = (torch.randn(T, (H + 2 * KVH) * D, generator=g) * 4).bfloat16()
    cos, sin = Rope.default(10000.0, D)(qkv.unsqueeze(0), torch.arange(100, 100 + T).unsqueeze(0))
    cos, sin = cos[0].bfloat16().contiguous(), sin[0].bfloat16().contiguous()
    q, k = ops.rope_qk(qkv, cos, sin, H, KVH)
    assert torch.equal(q, _rope(qkv[:, :H * D].view(T, H, D), cos.unsqueeze(1), sin.unsqueeze(1)))
    assert torch.equal(k, _rope(qkv[:, H * D:(H + KVH) * D].view(T, KVH, D), cos.unsqueeze(1), sin.unsqueeze(1)))
    assert q.is_contiguous() and k.is_contiguous()


@pytest.mark.parametrize("T", [1, 5, 40, 200])
def test_kv_write_is_the_torch_index_writes(ops, T):
    """write_kv puts each token's K/V where attention.py's torch writes do, bit for bit; v may be a
    strided view (the q/k/v projection's value columns); untouched slots keep their old bits."""
    g = torch.Generator().manual_seed(T)
    KVH, D, bs, nb = 3, 64, 16, 40
    k = torch.randn(T, KVH, D, generator=g).bfloat16()
    qkv = torch.randn(T, (9 + 2 * KVH) * D, generator=g).bfloat16()
    v = qkv[:, (9 + KVH) * D:].view(T, KVH, D)                      # strided rows, as in the forward
    slots = torch.randperm(nb * bs, generator=g)[:T]
    blocks, offsets = slots // bs, slots % bs
    k_cache = torch.randn(nb, KVH, D, bs, generator=g).bfloat16()
    v_cache = torch.randn(nb * bs, KVH, D, generator=g).bfloat16()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k[blocks, :, :, offsets] = k
    ref_v.index_copy_(0, slots, v)
    assert ops.write_kv(k, v, k_cache, v_cache, blocks, offsets)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kv_write_refuses_what_it_cannot_take_and_writes_nothing(ops):
    k = torch.randn(4, 3, 64).bfloat16()
    slots = torch.arange(4)
    for kk, kc in ((k.float(), torch.zeros(2, 3, 64, 16)),                                     # float32
                   (k.transpose(0, 1).contiguous().transpose(0, 1),                             # heads not adjacent
                    torch.zeros(2, 3, 64, 16, dtype=torch.bfloat16))):
        vc = torch.zeros(32, 3, 64, dtype=kc.dtype)
        assert not ops.write_kv(kk, kk, kc, vc, slots // 16, slots % 16)
        assert not kc.any() and not vc.any()
