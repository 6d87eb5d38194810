"""The native few-row GEMM (csrc/linear_rows.c) and weight-only int8 (engine/quantize.py):
the kernel against a float64 reference, its batch invariance, the quantizer's rounding, the
routes ``quantize.apply`` gives, and a quantized model end to end (engine and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cbgen.config import EngineConfig, ModelConfig, cache_root
from cbgen.engine import linear_rows, quantize
from cbgen.engine.engine import Engine
from cbgen.engine.llama import ALL_ROWS
from cbgen.engine.request import SamplingParams


@pytest.fixture(scope="module")
def kernel():
    from helpers import native_or_skip

    return native_or_skip(linear_rows.load(cache_root() / "kernels"), "native few-row GEMM")


def _reference(x, w, scale, bias):
    wf = w.double() * (scale.double()[:, None] if scale is not None else 1.0)
    y = x.double() @ wf.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("wdtype", ["bf16", "int8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (3, 37, 19), (4, 8, 8), (7, 130, 200), (9, 4, 576), (33, 12, 24)])
def test_kernel_matches_reference(kernel, wdtype, xdtype, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g)
    if wdtype == "int8":
        wq, scale = quantize.quantize_int8(w)
    else:
        wq, scale = w.bfloat16(), None
    x_full = torch.randn(M, K + 5, generator=g).to(xdtype)
    x = x_full[:, 2:2 + K]                       # strided rows: the kernel takes the row stride
    bias = torch.randn(N, generator=g)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = kernel(x, wq, scale, bias, out_dtype)
        assert y.shape == (M, N) and y.dtype == out_dtype
        ref = _reference(x.float(), wq.float(), scale, bias)
        tol = 1e-4 if out_dtype == torch.float32 else 2 ** -7
        assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item()), (y, ref)
    assert torch.allclose(kernel(x, wq, scale, None, torch.float32).double(), _reference(x.float(), wq.float(), scale, None),
                          rtol=1e-4, atol=1e-4 * K ** 0.5)


@pytest.mark.parametrize("wdtype", ["bf16", "int8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])   # bf16: the vdpbf16ps path where the CPU has it
def test_kernel_is_batch_invariant(kernel, wdtype, xdtype):
    """A row's output bits do not depend on how many rows come with it, its position among them
    (which tile shape it falls in) or the thread count."""
    g = torch.Generator().manual_seed(1)
    N, K = 70, 100                                # K: not a multiple of 8 or 32, a tail
    w = torch.randn(N, K, generator=g)
    wq, scale = quantize.quantize_int8(w) if wdtype == "int8" else (w.bfloat16(), None)
    rows = torch.randn(11, K, generator=g).to(xdtype)
    alone = torch.cat([kernel(rows[i:i + 1], wq, scale, None, torch.float32) for i in range(11)])
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for m in (2, 3, 4, 5, 8, 11):
                assert torch.equal(kernel(rows[:m], wq, scale, None, torch.float32), alone[:m])
            perm = torch.randperm(11, generator=g)
            assert torch.equal(kernel(rows[perm], wq, scale, None, torch.float32), alone[perm])
    finally:
        torch.set_num_threads(threads)


def test_quantize_int8_rounding():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 40, generator=g) * torch.logspace(-3, 1, 300)[:, None]
    w[5] = 0.0
    q, scale = quantize.quantize_int8(w, chunk_rows=64)   # several chunks
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.is_contiguous()
    assert q.abs().max().item() == 127 and q.min().item() >= -127
    assert (q[torch.arange(300) != 5].abs().amax(1) == 127).all()        # each row's absmax maps to 127
    assert scale[5].item() == 1.0 and (q[5] == 0).all()
    err = (quantize.dequantize(q, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()                # round to nearest


class _FakeProj:
    """Stands in for llama._Proj where only the routing is under test."""

    def __init__(self, w):
        self.w, self.b, self.q, self.scale = w, None, None, None
        self.rows = self.rows_max = None

    def use_rows(self, kernel, rows_max):
        self.rows, self.rows_max = kernel, rows_max


class _FakeModel:
    def __init__(self, dtype):
        self.ps = [_FakeProj(torch.randn(8, 8).to(dtype)) for _ in range(3)]

    def projections(self):
        return self.ps


def test_apply_routes():
    k = object()
    m = _FakeModel(torch.float32)
    quantize.apply(m, "none", k, packable=False)
    assert all(p.rows_max == 0 for p in m.ps)                           # float32: torch, for HF parity
    quantize.apply(m, "int8", k, packable=False)
    assert all(p.q is not None and p.rows_max == quantize.INT8_FP32_ROWS_MAX for p in m.ps)
    assert all(p.w.dtype == torch.float32 and torch.equal(p.w, quantize.dequantize(p.q, p.scale, torch.float32))
               for p in m.ps)
    b = _FakeModel(torch.bfloat16)
    quantize.apply(b, "none", k, packable=True)          # oneDNN packs bf16: the kernel at few rows only
    assert all(p.rows_max == quantize.PACKED_BF16_ROWS_MAX for p in b.ps)
    quantize.apply(b, "none", k, packable=False)
    assert all(p.rows_max == ALL_ROWS for p in b.ps)
    i8 = _FakeModel(torch.bfloat16)
    quantize.apply(i8, "int8", k, packable=True)          # above the threshold: oneDNN on the de-quantized copy
    assert all(p.q is not None and p.rows_max == quantize.PACKED_BF16_ROWS_MAX for p in i8.ps)
    i8 = _FakeModel(torch.bfloat16)
    quantize.apply(i8, "int8", k, packable=False)
    assert all(p.rows_max == ALL_ROWS for p in i8.ps)
    quantize.apply(b, "none", None, packable=False)
    assert all(p.rows is None for p in b.ps)
    h = _FakeModel(torch.float16)            # the kernel reads float32 / bf16 activations only
    quantize.apply(h, "int8", k, packable=False)
    assert all(p.q is not None and p.rows is None and p.rows_max == 0 for p in h.ps)
    with pytest.raises(ValueError, match="expected one of none, int8"):
        quantize.apply(b, "int4", k, packable=False)
    with pytest.raises(ValueError, match="native forward"):
        quantize.apply(object(), "int8", k, packable=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_end_to_end(kernel, tiny_model_dir, dtype):
    """int8 vs the same model with its de-quantized float weights through torch: one model, so
    greedy tokens agree; and the kernel route really is taken at decode."""
    from cbgen.models import load_model

    q = load_model(ModelConfig(model=str(tiny_model_dir), dtype=dtype, quantize="int8"))
    assert q.quantize == "int8"
    eng = Engine.from_loaded(q, EngineConfig(max_num_seqs=4))
    projs = q.model.projections()
    assert all(p.q is not None and p.rows is not None for p in projs)
    calls = []
    real = linear_rows.BoundLinear.__call__
    linear_rows.BoundLinear.__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
        prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
        got = [o.token_ids for o in eng.generate(prompts, params)]
    finally:
        linear_rows.BoundLinear.__call__ = real
    assert calls
    ref_eng = Engine.from_loaded(q, EngineConfig(max_num_seqs=4))
    for p in projs:                                       # the same weights, through torch only
        p.use_rows(None, 0)
    ref = [o.token_ids for o in ref_eng.generate(prompts, params)]
    agree = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / sum(len(x) for x in ref)
    assert agree >= 0.9, (got, ref)


def test_kernel_refuses_other_dtypes(kernel):
    b = kernel.bind(torch.ones(4, 8, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(ValueError, match="float32 or bf16"):
        b(torch.ones(2, 8, dtype=torch.float16), torch.float16)
    with pytest.raises(ValueError, match="float32 or bf16"):
        b(torch.ones(2, 8), torch.float16)
    with pytest.raises(ValueError, match="weight must be"):
        kernel.bind(torch.ones(4, 8, dtype=torch.float16), None, None)


def test_float16_int8_runs_through_torch(tiny_model_dir):
    """float16 + int8: quantized, every call through torch on the de-quantized copy (a review
    found the kernel reading float16 activations as float32 and corrupting the heap)."""
    from cbgen.models import load_model

    q = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float16", quantize="int8"))
    eng = Engine.from_loaded(q, EngineConfig(max_num_seqs=4))
    assert all(p.q is not None and p.rows is None for p in q.model.projections())
    out = eng.generate([[5, 6, 7, 8, 9], [11, 12, 13]], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                         ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [6, 6]


def test_parameters_count_a_tied_head_once(tiny_model_dir):
    from cbgen.models import load_model

    plain = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32"))
    q = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32", quantize="int8"))
    assert sum(p.numel() for p in q.model.parameters()) == sum(p.numel() for p in plain.model.parameters())


def test_quantize_needs_native_forward(tiny_model_dir):
    from cbgen.models import ModelError, load_model

    with pytest.raises(ModelError, match="--quantize int8 needs cbgen's native forward .*use --impl auto"):
        load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32", impl="transformers", quantize="int8"))
    with pytest.raises(ValueError, match="quantize"):
        ModelConfig(quantize="int4")


def test_quantize_auto_picks_int8_only_where_it_wins(tiny_model_dir, monkeypatch):
    """auto: int8 where the native int8 GEMM runs and the weights outgrow the CPU cache (decode
    then streams them from memory), else none, with the reason in the load status; never an error."""
    from cbgen.models import load_model

    def load(deterministic=False, **over):
        msgs = []
        cfg = dict(model=str(tiny_model_dir), dtype="bfloat16", quantize="auto") | over
        loaded = load_model(ModelConfig(**cfg), status=msgs.append, deterministic=deterministic)
        assert loaded.quantize_reason.startswith("--quantize auto: ")
        quantized = [p.q is not None for p in loaded.model.projections()] if hasattr(loaded.model, "projections") else []
        assert quantized == [loaded.quantize == "int8"] * len(quantized)
        return loaded.quantize, " ".join(m for m in msgs if m.startswith("--quantize auto"))

    got, why = load()
    assert got == "none" and "fit in the" in why   # the tiny model's weights fit in any L2
    monkeypatch.setattr(quantize, "last_level_cache_bytes", lambda: 4096)
    got, why = load()
    assert got == "int8" and "from memory" in why
    assert load(dtype="float32")[0] == "int8"
    # Batch-invariant steps take the kernel only where it takes every row count (bf16 where oneDNN
    # cannot pack bf16); elsewhere int8 would run oneDNN on its de-quantized copy, no faster.
    from cbgen.engine.llama import _can_pack
    got, why = load(deterministic=True)
    assert got == ("int8" if not _can_pack(torch.bfloat16, torch.device("cpu")) else "none")
    got, why = load(deterministic=True, dtype="float32")
    assert got == "none" and "--deterministic" in why
    assert load(dtype="float16")[0] == "none"
    got, why = load(impl="transformers")
    assert got == "none" and "native forward" in why
    monkeypatch.setattr(linear_rows, "load", lambda cache_dir: None)
    got, why = load()
    assert got == "none" and "unavailable" in why


def test_cli_quantize(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hello there", "max_tokens": 6, "temperature": 0}) + "\n")
    cmd = [sys.executable, "-m", "cbgen.cli", "run", str(src), "--model", str(tiny_model_dir), "--quantize"]
    ok = subprocess.run(cmd + ["int8"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(ok.stdout.splitlines()[0])
    assert rec["error"] is None and rec["usage"]["completion_tokens"] == 6
    bad = subprocess.run(cmd + ["int4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "quantize" in bad.stderr and "none, int8 or auto" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
