"""Native bf16 ops (csrc/fused_ops.c): residual add + RMSNorm for llama layers (one
pass instead of 9 torch ops, twice per layer), RoPE on q and k (one pass instead of
~10 ops), the K/V write into the paged pool (threaded, instead of torch's index_put_ and
index_copy_), the MLP's SiLU(gate) * up, and the greedy argmax over bf16 logits (no float32
copy of [rows, vocab]).

Contract: ``load()`` returns a ``FusedOps`` or None (switched off, no compiler:
the forward keeps its torch ops). Only bfloat16 on CPU: float32 models keep the
torch ops, whose bit-for-bit parity with transformers is the fidelity check.
The norm and SiLU * up match the torch ops they replace up to an occasional bf16 ulp; RoPE,
the K/V write and the argmax match exactly (tests/test_fused_ops.py).
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
        self._rope = lib.rope_qk_bf16
        self._rope.argtypes = [_P, ctypes.c_int64, _P, _P, _P, _P, _I, _I, _I, _I, _I]
        self._rope.restype = None
        self._silu_mul = lib.silu_mul_bf16
        self._silu_mul.argtypes = [_P, _I, _I, _P, _I]
        self._silu_mul.restype = None
        self._kv_write = lib.kv_write_bf16
        self._kv_write.argtypes = [_P, ctypes.c_int64, _P, ctypes.c_int64, _P, _P, _P, _P, _I, _I, _I, _I, _I]
        self._kv_write.restype = None
        self._argmax = lib.argmax_rows_bf16
        self._argmax.argtypes = [_P, _I, _I, _P, _I]
        self._argmax.restype = None

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

    def rope_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE'd q [T, H, D] and k [T, KVH, D] from the q/k/v projection ``qkv`` [T, >= (H + KVH) * D]
        (rows may be strided), with cos/sin [T, D]; bit-identical to ``llama._rope`` in bf16."""
        T = qkv.shape[0]
        D = cos.shape[1]
        assert qkv.dtype == cos.dtype == sin.dtype == torch.bfloat16 and qkv.stride(1) == 1
        assert cos.is_contiguous() and sin.is_contiguous() and qkv.shape[1] >= (num_heads + num_kv_heads) * D
        q = qkv.new_empty(T, num_heads, D)
        k = qkv.new_empty(T, num_kv_heads, D)
        self._rope(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
                   T, num_heads, num_kv_heads, D, torch.get_num_threads())
        return q, k

    @staticmethod
    def can_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether ``write_kv`` takes these: bf16 CPU tensors whose [KVH, D] token rows are contiguous."""
        return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (k, v, k_cache)) and all(
            t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 write_blocks: torch.Tensor, write_offsets: torch.Tensor) -> bool:
        """``k_cache[write_blocks, :, :, write_offsets] = k`` and ``v_cache[write_blocks * bs + write_offsets] = v``
        (attention.py's pool layout: contiguous k_cache [num_blocks, KVH, D, bs], v_cache [num_blocks * bs, KVH, D]).
        k, v: [T, KVH, D]; write_blocks/offsets: contiguous int64 [T], distinct slots, in range (not checked).
        Returns False, having written nothing, where ``can_write_kv`` says no (the caller's torch writes
        then apply): one check per call, as this runs once per layer."""
        if not self.can_write_kv(k, v, k_cache):
            return False
        T, KVH, D = k.shape
        self._kv_write(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                       write_blocks.data_ptr(), write_offsets.data_ptr(), T, KVH, D, k_cache.shape[3],
                       torch.get_num_threads())
        return True

    def silu_mul(self, gu: torch.Tensor, intermediate: int) -> torch.Tensor:
        """The llama MLP's ``F.silu(gu[:, :I]) * gu[:, I:]`` for gu [T, 2I] contiguous bf16 -> [T, I] bf16,
        rounded as those torch ops (silu's exp may differ in its last float32 bit: Cephes expf here)."""
        T = gu.shape[0]
        assert gu.dtype == torch.bfloat16 and gu.is_contiguous() and gu.shape[1] == 2 * intermediate
        out = gu.new_empty(T, intermediate)
        self._silu_mul(gu.data_ptr(), T, intermediate, out.data_ptr(), torch.get_num_threads())
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits.float().argmax(-1)`` for [rows, V] contiguous bf16, without the float32 copy."""
        assert logits.dtype == torch.bfloat16 and logits.is_contiguous() and logits.dim() == 2
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), torch.get_num_threads())
        return out


def load(cache_dir: Path) -> FusedOps | None:
    lib = load_library("fused_ops", cache_dir, "native fused ops")
    return None if lib is None else FusedOps(lib)
