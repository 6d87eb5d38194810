"""Fused residual add + RMSNorm for bf16 llama layers (csrc/fused_ops.c): one native
pass instead of 9 torch ops, twice per layer.

Contract: ``load()`` returns a ``FusedOps`` or None (switched off, no compiler:
the forward keeps its torch ops). Only bfloat16 on CPU: float32 models keep the
torch ops, whose bit-for-bit parity with transformers is the fidelity check.
It matches the torch ops it replaces up to an occasional bf16 ulp
(tests/test_fused_ops.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native_build import load_library

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class FusedOps:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._add_rms = lib.add_rmsnorm_bf16
        self._add_rms.argtypes = [_P, _P, _P, _P, _I, _I, _F, _I]
        self._add_rms.restype = None

    def add_rmsnorm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """``h += delta`` in place (if given), then RMSNorm(h) * weight. h, delta: [T, n] contiguous bf16."""
        T, n = h.shape
        assert h.dtype == weight.dtype == torch.bfloat16 and h.device.type == "cpu"
        assert h.is_contiguous() and weight.is_contiguous() and (delta is None or delta.is_contiguous())
        out = torch.empty_like(h)
        self._add_rms(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                      out.data_ptr(), T, n, eps, torch.get_num_threads())
        return out


def load(cache_dir: Path) -> FusedOps | None:
    lib = load_library("fused_ops", cache_dir, "native fused ops")
    return None if lib is None else FusedOps(lib)
