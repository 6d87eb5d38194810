"""The native few-row GEMM (csrc/linear_rows.c): ``y = x W^T (* scale) + b`` with bf16
weights, or int8 weights and a float32 scale per output channel (weight-only int8).

Where it is used (llama.py ``_Proj``, set up by ``quantize.apply``): bf16 projections on
CPUs where oneDNN cannot pre-pack bf16 (no AVX-512 bf16, e.g. AMD Zen 3), where torch's
bf16 GEMM reads ~11 GB/s at one row and falls further behind with more; bf16 projections
at up to ``quantize.PACKED_BF16_ROWS_MAX`` rows where it can (the kernel's vdpbf16ps path,
e.g. AMD Zen 4); and every int8 projection at decode batch sizes. Measured per call in
benchmarks/NOTES.md (changes 15 and 17).

Contract: ``load(cache_dir)`` returns a ``LinearRows`` or None (switched off, or no C
compiler: the caller keeps torch). Each output element is one fixed fused-multiply-add
chain, so results do not depend on the row count, a row's position or the thread count.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native_build import load_library

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
W_BF16, W_INT8 = 0, 1
_ACT = (torch.float32, torch.bfloat16)   # activation and output dtypes the kernel reads and writes


class LinearRows:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.linear_rows
        self._fn.argtypes = [_P, _I, _L, _I, _I, _P, _I, _P, _P, _P, _I, _I, _I]
        self._fn.restype = _I

    def bind(self, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> "BoundLinear":
        """One projection: w [N, K] contiguous bf16, or int8 with ``scale`` [N] float32; bias [N]
        float32 or None. The tensors must outlive the result (it keeps them referenced). Raises
        ValueError for any other dtype or layout."""
        if w.dim() != 2 or not w.is_contiguous() or w.dtype not in (torch.bfloat16, torch.int8):
            raise ValueError(f"linear_rows: weight must be contiguous 2-D bf16 or int8, got {w.dtype} {tuple(w.shape)}")
        if w.dtype == torch.int8 and (scale is None or scale.dtype != torch.float32 or not scale.is_contiguous()):
            raise ValueError("linear_rows: an int8 weight needs a contiguous float32 scale per output channel")
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            raise ValueError("linear_rows: the bias must be contiguous float32")
        return BoundLinear(self._fn, w, scale, bias)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """``self.bind(w, scale, bias)(x, out_dtype)``, for one-off calls."""
        return self.bind(w, scale, bias)(x, out_dtype)


class BoundLinear:
    """A projection's weights bound to the kernel: the per-call work is only the activations'
    (a call costs ~19 us through plain ctypes argument conversion, a tenth of a 1-row step's
    121 projections; pre-converted constants cut that)."""

    def __init__(self, fn, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self._fn, self._keep = fn, (w, scale, bias)
        self.N, self.K = w.shape
        self._const = (ctypes.c_void_p(w.data_ptr()), W_INT8 if w.dtype == torch.int8 else W_BF16,
                       ctypes.c_void_p(None if scale is None else scale.data_ptr()),
                       ctypes.c_void_p(None if bias is None else bias.data_ptr()))

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] float32 or bf16 (rows may be strided, elements contiguous) -> [M, N] in
        ``out_dtype`` (float32 or bf16): float32 accumulation, then ``* scale + bias``, rounded
        once. Raises MemoryError if the kernel cannot allocate."""
        M = x.shape[0]
        if x.shape[1] != self.K or x.stride(1) != 1 or x.dtype not in _ACT or out_dtype not in _ACT:
            raise ValueError(f"linear_rows: x must be float32 or bf16 [M, {self.K}] with contiguous rows and the "
                             f"output float32 or bf16; got {x.dtype} {tuple(x.shape)} -> {out_dtype}")
        y = torch.empty(M, self.N, dtype=out_dtype)
        w, wtype, scale, bias = self._const
        if self._fn(x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), M, self.K, w, wtype, scale, bias,
                    y.data_ptr(), out_dtype == torch.bfloat16, self.N, torch.get_num_threads()):
            raise MemoryError("linear_rows: cannot allocate the float32 copy of the activations")
        return y


def load(cache_dir: Path) -> LinearRows | None:
    lib = load_library("linear_rows", cache_dir, "native few-row GEMM")
    return None if lib is None else LinearRows(lib)
