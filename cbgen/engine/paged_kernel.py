"""The native paged decode-attention kernel (csrc/paged_decode.c), built once and loaded with ctypes.

Contract: ``load()`` returns a ``PagedDecodeKernel`` or None. None means the
kernel is switched off, there is no C compiler or the build failed
(native_build.py); the caller then keeps the pure-torch path, which computes
the same attention.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native_build import disabled, load_library

__all__ = ["PagedDecodeKernel", "disabled", "load"]

# csrc/paged_decode.h, argument by argument (tests/test_sliding_window.py checks they agree):
# q, k, v, out, tables, table_stride, lens, window, nd, H, KVH, D, bs, scale, nthreads.
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns = {torch.bfloat16: lib.paged_decode_bf16, torch.float32: lib.paged_decode_f32}
        for fn in self._fns.values():
            fn.argtypes = _ARGTYPES
            fn.restype = ctypes.c_int

    def supports(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> bool:
        """The shapes csrc/paged_decode.c accepts (it returns -1 for any other)."""
        return (dtype in self._fns and head_dim % 16 == 0 and head_dim <= 256 and block_size % 16 == 0
                and block_size > 0 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, block_size: int, scale: float,
                 window: int | None = None) -> None:
        """out[i] = softmax(q[i] . K_i^T * scale) V_i for each decode sequence i.

        q, out: [nd, H, D] contiguous; k_cache [num_blocks, KVH, D, block_size] and
        v_cache [num_blocks * block_size, KVH, D], same dtype as q; tables: int32
        [nd, W] block ids; lens: int32 [nd] context lengths (>= 1, <= W * block_size).
        ``window``: None attends to the whole context; an int w >= 1 only to its last
        w positions, ``[max(0, len - w), len)`` (blocks wholly before them are not read).
        """
        nd, H, D = q.shape
        assert q.is_contiguous() and out.is_contiguous() and tables.is_contiguous()
        assert tables.dtype == torch.int32 and lens.dtype == torch.int32
        assert window is None or window >= 1, window
        rc = self._fns[q.dtype](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                                tables.data_ptr(), tables.shape[1], lens.data_ptr(), window or 0,
                                nd, H, k_cache.shape[1], D, block_size, float(scale), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"paged decode kernel failed (code {rc})")


def load(cache_dir: Path) -> PagedDecodeKernel | None:
    """The kernel, built into ``cache_dir`` on first use; None if it cannot be built here."""
    lib = load_library("paged_decode", cache_dir, "native attention kernel")
    return None if lib is None else PagedDecodeKernel(lib, Path(lib._name))
