"""The native paged decode-attention kernel against a plain softmax(qK)V reference.

The pool layout is the engine's (attention.py): K [blocks, KVH, D, bs], V
[blocks * bs, KVH, D]. Block tables are shuffled, contexts are ragged (1 token,
exact multiples of the block size, partial last blocks), and every slot a
sequence does not own is filled with NaN: the kernel must never read it.
"""

from __future__ import annotations

import pytest
import torch

from cbgen.config import EngineConfig, cache_root
from cbgen.engine import paged_kernel
from cbgen.engine.engine import Engine
from cbgen.engine.runner import UnsupportedModelError


@pytest.fixture(scope="module")
def kernel():
    from helpers import native_or_skip

    return native_or_skip(paged_kernel.load(cache_root() / "kernels"), "native attention kernel")


def make_case(dtype, H, KVH, D, bs, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblk = sum(-(-n // bs) for n in lens) + 3
    k = torch.full((nblk, KVH, D, bs), float("nan"), dtype=dtype)
    v = torch.full((nblk * bs, KVH, D), float("nan"), dtype=dtype)
    perm = torch.randperm(nblk, generator=g).tolist()
    width = max(-(-n // bs) for n in lens)
    tables, ref_k, ref_v = [], [], []
    for n in lens:
        blocks = [perm.pop() for _ in range(-(-n // bs))]
        kk = torch.randn(n, KVH, D, generator=g).to(dtype)
        vv = torch.randn(n, KVH, D, generator=g).to(dtype)
        for t in range(n):
            b, o = blocks[t // bs], t % bs
            k[b, :, :, o] = kk[t]
            v[b * bs + o] = vv[t]
        tables.append(blocks + [perm[0]] * (width - len(blocks)))   # padding points at a NaN block
        ref_k.append(kk)
        ref_v.append(vv)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, k, v, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), ref_k, ref_v


def reference(q, ref_k, ref_v, scale):
    H, G = q.shape[1], q.shape[1] // ref_k[0].shape[1]
    out = []
    for i, (kk, vv) in enumerate(zip(ref_k, ref_v)):
        kk = kk.double().repeat_interleave(G, dim=1)   # [n, H, D]
        vv = vv.double().repeat_interleave(G, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), kk) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", p, vv))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,KVH,D,bs", [(9, 3, 64, 16), (4, 4, 64, 16), (8, 2, 128, 32), (6, 1, 32, 16),
                                        (8, 8, 16, 16)])
def test_kernel_matches_reference(kernel, dtype, tol, H, KVH, D, bs):
    lens = [1, bs, bs + 1, 3 * bs, 2 * bs - 1, 77]
    q, k, v, tables, lens_t, ref_k, ref_v = make_case(dtype, H, KVH, D, bs, lens)
    assert kernel.supports(dtype, H, KVH, D, bs)
    out = torch.empty_like(q)
    kernel(q, k, v, out, tables, lens_t, bs, D ** -0.5)
    expected = reference(q, ref_k, ref_v, D ** -0.5)
    assert torch.isfinite(out).all(), "read a slot the sequence does not own"
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_kernel_refuses_unsupported_shapes(kernel):
    assert not kernel.supports(torch.float16, 8, 2, 64, 16)
    assert not kernel.supports(torch.float32, 8, 2, 72, 16)    # head_dim not a multiple of 16
    assert not kernel.supports(torch.float32, 8, 2, 64, 8)     # block_size not a multiple of 16
    assert not kernel.supports(torch.float32, 32, 2, 64, 16)   # 16 query heads per KV head


def test_native_attention_unsupported_is_a_clear_error(sharp, kernel):
    with pytest.raises(UnsupportedModelError, match="attention='native' is unavailable.*block_size=4"):
        Engine.from_loaded(sharp, EngineConfig(block_size=4, attention="native"))
    assert Engine.from_loaded(sharp, EngineConfig(block_size=4)).runner.kernel is None   # auto: torch path


def test_kernel_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("CBGEN_NATIVE_KERNEL", "0")
    assert paged_kernel.load(tmp_path) is None


def test_build_failure_falls_back_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CBGEN_NATIVE_KERNEL", raising=False)
    monkeypatch.setenv("CC", "/bin/false")
    assert paged_kernel.load(tmp_path / "fresh") is None
    assert "native attention kernel unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["native", "torch"])
def test_unwritten_pool_memory_is_never_read(sharp, attention):
    """The pool is torch.empty; fill it with NaN and the engine must still match HF."""
    from helpers import hf_greedy, skip_without_native_kernel

    from cbgen.config import SamplingParams

    skip_without_native_kernel(attention)
    tok = sharp.tokenizer
    eng = Engine.from_loaded(sharp, EngineConfig(max_num_seqs=4, attention=attention))
    bs = eng.config.block_size
    for k, v in eng.runner.kv:
        k[:-1].fill_(float("nan"))        # everything but the zeroed null block
        v[:-bs].fill_(float("nan"))
    texts = ["Paris is the capital of France.", "Hi", "Numbers: 0 1 2 3", "A journey of a thousand miles"]
    ps = [tok.encode(t) for t in texts]
    outs = eng.generate(ps, [SamplingParams(max_new_tokens=12, min_new_tokens=12)] * len(ps))
    assert [o.token_ids for o in outs] == [hf_greedy(sharp.model, p, 12) for p in ps]

