"""The exact greedy token of a bf16 LM head from an int8 proxy of it (csrc/greedy_head.c has
the bound and why it gives the same token, bit for bit).

``GreedyHead(w)`` holds, for head weights w [N, K] bf16: the proxy q [N, K] int8 with one
float32 scale per row (quantize.quantize_int8, on huge pages where available), and slack [N]
float32 with |r_n - p_n| <= ||x||_2 * slack[n] for every x (r_n: the float32 dot product the
head's GEMM computes, p_n: the proxy's). ``struct`` is the C struct (csrc/greedy_head.h)
pointing into them; ``rows_exact`` / ``rows_full`` count the rows each path resolved.
Building it for SmolLM2's 49152 x 576 head takes ~0.1 s and 28 MB.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import hugepages
from .native_build import load_library
from .quantize import quantize_int8

_P, _L = ctypes.c_void_p, ctypes.c_int64

# Candidates beyond which a row takes the whole bf16 head (each candidate is a K-element row
# read and a dot product; the whole head is N of them).
MAX_CANDIDATES = 64
# Rows a call can take in the struct's own scratch (the multi-step path's at most; see
# quantize.PACKED_BF16_ROWS_MAX).
SCRATCH_ROWS = 8


class GreedyHeadStruct(ctypes.Structure):
    """csrc/greedy_head.h ``greedy_head``, field for field."""
    _fields_ = [("w", _P), ("q", _P), ("scale", _P), ("slack", _P), ("N", _L), ("K", _L),
                ("max_candidates", _L), ("rows_exact", _L), ("rows_full", _L), ("scratch", _P),
                ("scratch_bytes", _L)]


def slack(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """[N] float32: (||w_n - q_n s_n||_2 + 4 (K + 1) 2^-24 (||w_n||_2 + ||q_n s_n||_2)) (1 + 2^-10).
    The first term bounds the proxy's error on any x of unit norm (Cauchy-Schwarz); the second,
    the float32 rounding of both dot products (a chain of K multiply-adds of exact products:
    Higham, Accuracy and Stability of Numerical Algorithms, section 3.1, doubled). It is
    computed in float32 (half the load time of float64): its own rounding, ~K 2^-24 relative in
    the norms and ~2^-24 |w| per element of w - q s, is covered by the second term and the
    factor 1 + 2^-10."""
    N, K = w.shape
    out = torch.empty(N, dtype=torch.float32)
    for r in range(0, N, chunk_rows):
        rows = w[r:r + chunk_rows].float()
        deq = q[r:r + chunk_rows].float() * scale[r:r + chunk_rows, None]
        a = (rows - deq).norm(dim=1) + 4 * (K + 1) * 2.0 ** -24 * (rows.norm(dim=1) + deq.norm(dim=1))
        out[r:r + chunk_rows] = a * (1 + 2.0 ** -10)
    return out


class GreedyHead:
    def __init__(self, w: torch.Tensor, max_candidates: int = MAX_CANDIDATES) -> None:
        """w [N, K] bf16 contiguous, kept referenced (the struct holds its address). Raises
        ValueError for another dtype or shape."""
        if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_contiguous():
            raise ValueError(f"w: expected a contiguous 2-D bf16 tensor, got {w.dtype} {tuple(w.shape)}")
        q, scale = quantize_int8(w)
        if hugepages.available():
            q = hugepages.copy_tensors([q])[0]   # streamed every step, as the weights are
        self.w, self.q, self.scale, self.slack = w, q, scale, slack(w, q, scale)
        N, K = w.shape
        # Scratch for calls of up to SCRATCH_ROWS rows (csrc greedy_head_scratch_bytes; more: malloc).
        rows_cap = (max_candidates + 4) // 4 * 4
        nbytes = 4 * SCRATCH_ROWS * N + 8 * (max_candidates + 1) + 2 * (rows_cap * K + rows_cap + N + K)
        self.scratch = torch.empty(nbytes, dtype=torch.uint8)
        self.struct = GreedyHeadStruct(w.data_ptr(), q.data_ptr(), scale.data_ptr(), self.slack.data_ptr(),
                                       N, K, max_candidates, 0, 0, self.scratch.data_ptr(), nbytes)

    @property
    def rows_exact(self) -> int:
        return self.struct.rows_exact

    @property
    def rows_full(self) -> int:
        return self.struct.rows_full


class GreedyHeadLib:
    """The native ``greedy_head_argmax`` on its own (the decode step links its own copy)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.greedy_head_argmax
        self._fn.argtypes = [_P, _P, _L, ctypes.c_int, _P, ctypes.c_int]
        self._fn.restype = ctypes.c_int
        self.size = lib.greedy_head_size
        self.size.restype = _L

    def argmax(self, head: GreedyHead, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] bf16 contiguous -> [T] int64: argmax over n of bf16(x . w_n), the first maximal
        index (argmax_rows_bf16's rule). Raises MemoryError if scratch cannot be allocated."""
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[1] == head.w.shape[1]
        out = torch.empty(x.shape[0], dtype=torch.int64)
        if self._fn(ctypes.byref(head.struct), x.data_ptr(), x.shape[1], x.shape[0], out.data_ptr(),
                    torch.get_num_threads()):
            raise MemoryError("greedy head: out of memory")
        return out


def load(cache_dir: Path) -> GreedyHeadLib | None:
    lib = load_library("greedy_head", cache_dir, "native greedy head")
    return None if lib is None else GreedyHeadLib(lib)
