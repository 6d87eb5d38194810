"""The one-call native decode step (engine/decode_forward.py, csrc/decode_forward.c): bit-identical
to the Python forward it replaces (tokens and logprobs, llama and a sliding-window Mistral, bf16
and int8 weights), actually taken on decode steps, refused for models it does not cover; and the
SiLU * up it shares with the Python forward (csrc/fused_ops.c)."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cbgen.config import EngineConfig, ModelConfig, cache_root
from cbgen.engine import decode_forward, fused_ops, quantize
from cbgen.engine.engine import Engine
from cbgen.engine.llama import _can_pack
from cbgen.engine.request import SamplingParams

from test_deterministic import _llama, _prompts


@pytest.fixture(scope="module")
def lib():
    from helpers import native_or_skip

    return native_or_skip(decode_forward.load(cache_root() / "kernels"), "native decode step")


@pytest.fixture(scope="module")
def fused():
    from helpers import native_or_skip

    return native_or_skip(fused_ops.load(cache_root() / "kernels"), "native fused ops")


def test_struct_layouts_match_the_header(lib):
    sizes = (ctypes.c_int64 * 3)()
    native = decode_forward.load_library("decode_forward", cache_root() / "kernels", "native decode step")
    native.decode_forward_sizes(sizes)
    assert list(sizes) == [ctypes.sizeof(decode_forward.DecProj), ctypes.sizeof(decode_forward.DecLayer),
                           ctypes.sizeof(decode_forward.DecDims)]


# Where oneDNN packs bf16 (AVX-512 bf16), bf16 projections take the kernel, and so decode steps
# the native call, only up to PACKED_BF16_ROWS_MAX rows; elsewhere at every row count.
PACKABLE = _can_pack(torch.bfloat16, torch.device("cpu"))
SEQS = quantize.PACKED_BF16_ROWS_MAX if PACKABLE else 16


def _outputs(loaded, native: bool, monkeypatch, max_num_seqs: int = SEQS, **cfg):
    """Greedy and seeded-sampling outputs (tokens, top-3 logprobs) of 8 prompts, and the row
    count of every step that went through the native decode step."""
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=max_num_seqs, **cfg))
    assert eng.runner.native_decode is not None
    if not native:
        eng.runner.native_decode = None
    calls = []
    real = decode_forward.NativeDecode.__call__
    monkeypatch.setattr(decode_forward.NativeDecode, "__call__",
                        lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    prompts = _prompts(loaded.tokenizer)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True, logprobs=3)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, ignore_eos=True, logprobs=3)
    outs = eng.generate(prompts + prompts, [greedy] * len(prompts) + [sampled] * len(prompts))
    monkeypatch.undo()
    return [(o.token_ids, o.logprobs) for o in outs], calls


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_bit_identical_to_the_python_forward_bf16(lib, sharp, monkeypatch, kind):
    loaded = dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16, kind=kind))
    ref, none = _outputs(loaded, False, monkeypatch)
    got, calls = _outputs(loaded, True, monkeypatch)
    assert not none and len(calls) >= 10 and max(calls) == SEQS   # every decode step after the prefills
    assert got == ref


def test_steps_above_rows_max_stay_in_python(lib, sharp, monkeypatch):
    """Where oneDNN packs bf16, a decode step of more rows than the kernel takes runs the Python
    forward (oneDNN's GEMMs); the records are those of the Python forward all through."""
    if not PACKABLE:
        pytest.skip("oneDNN does not pack bf16 on this CPU: the kernel takes every row count")
    loaded = dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16))
    ref, _ = _outputs(loaded, False, monkeypatch, max_num_seqs=16)
    got, calls = _outputs(loaded, True, monkeypatch, max_num_seqs=16)
    assert not calls and got == ref   # the 16 sequences decode side by side to the end: no step is small


def test_one_call_steps_never_pack_the_weights(lib, sharp, monkeypatch):
    """oneDNN's packed copy is made at the first decode step that reaches oneDNN: a run of one-call
    steps never needs it (every row takes the kernel), so it never pays the packing or the memory."""
    if not PACKABLE:
        pytest.skip("oneDNN does not pack bf16 on this CPU")
    loaded = dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16))
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=SEQS))
    model = eng.runner.model
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    eng.generate(_prompts(loaded.tokenizer)[:1], [params])   # one prefill step, then one-call decode steps
    assert model.pack_pending and all(p.packed is None for p in model.projections())
    _, calls = _outputs(loaded, True, monkeypatch, max_num_seqs=16)   # decode steps of 16 rows
    assert not calls and not model.pack_pending and any(p.packed is not None for p in model.projections())


def test_bit_identical_to_the_python_forward_int8(lib, tiny_model_dir, monkeypatch):
    from cbgen.models import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), dtype="bfloat16", quantize="int8"))
    ref, _ = _outputs(loaded, False, monkeypatch)
    got, calls = _outputs(loaded, True, monkeypatch)
    assert calls and got == ref


def test_deterministic_steps_take_it_too(lib, sharp, monkeypatch):
    """--deterministic makes every token a decode row, prefill included: whole steps go native,
    and the records equal those of the Python forward in deterministic mode."""
    loaded = dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16))
    ref, _ = _outputs(loaded, False, monkeypatch, max_num_seqs=16, deterministic=True)
    got, calls = _outputs(loaded, True, monkeypatch, max_num_seqs=16, deterministic=True)
    if PACKABLE:   # the Python forward tiles oneDNN's GEMMs then; the kernel alone would differ
        assert not calls and got == ref
    else:
        assert max(calls) > 16 and got == ref   # a prompt's tokens in one native step


def test_bind_refuses_what_it_does_not_cover(lib, sharp):
    f32 = Engine.from_loaded(dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.float32)),
                             EngineConfig(max_num_seqs=2))
    got, why = lib.bind(f32.runner.model, f32.runner.kv, 16)
    assert got is None and "bf16" in why
    got, why = lib.bind(object(), [], 16)
    assert got is None and "llama-family" in why


def test_silu_mul_matches_torch_and_is_batch_invariant(fused):
    g = torch.Generator().manual_seed(0)
    I = 1000                                                     # not a multiple of 16: a padded tail
    gu = (torch.randn(37, 2 * I, generator=g) * 6).bfloat16()
    got = fused.silu_mul(gu, I)
    ref = F.silu(gu[:, :I]) * gu[:, I:]
    ulp = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert ulp.max() <= 1 and (ulp == 0).float().mean() > 0.99
    for rows in (slice(5, 6), slice(0, 3), slice(10, 37)):      # a row alone or with others: same bits
        assert torch.equal(fused.silu_mul(gu[rows].contiguous(), I), got[rows])
    big = torch.tensor([[-100.0, -87.5, -20.0, -0.0, 0.0, 20.0, 100.0, 3.0] + [1.0] * 8], dtype=torch.bfloat16)
    out = fused.silu_mul(big, 8)                    # extremes: no inf / nan
    assert torch.isfinite(out).all()
