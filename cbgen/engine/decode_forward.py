"""A whole decode step of a llama-family model in one native call (csrc/decode_forward.c).

At 1-4 sequences the Python forward (llama.py) makes ~240 small native calls a step
(norms, projections, RoPE, attention) plus ~100 torch ops (the K/V write, SiLU * up,
views), each paying 5-25 us of ctypes and dispatch around ~12 ms of weight streaming.
``decode_forward`` runs the same C functions in the same order on the same values, so its
logits and K/V are bit-identical to the Python forward's (tests/test_decode_forward.py);
the step's Python and torch overhead is what goes.

Contract: ``load(cache_dir)`` returns a ``DecodeForwardLib`` or None (switched off, no C
compiler). ``lib.bind(model, kv)`` returns a ``NativeDecode`` for a llama.LlamaForward in
bf16 whose every projection takes the few-row GEMM (at every row count, or, where oneDNN packs
bf16, up to quantize.PACKED_BF16_ROWS_MAX rows), over the runner's KV pool ``kv``, or None and
the reason. The forward uses it for steps whose rows are all decode rows of the attention
kernel and no more than every projection's kernel takes (``NativeDecode.takes``).
``NativeDecode.steps`` runs several greedy steps in one call (csrc decode_steps: argmax and
the next token's embedding in C), for the runner's multi-step path (scheduler.lookahead).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .greedy_head import GreedyHead
from .llama import kernel_takes
from .native_build import load_library

_P, _L, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


# csrc/decode_forward.h, field for field.
class DecProj(ctypes.Structure):
    _fields_ = [("w", _P), ("scale", _P), ("bias", _P), ("wtype", _L), ("N", _L), ("K", _L)]


class DecLayer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("qkv", DecProj), ("o", DecProj), ("gate_up", DecProj),
                ("down", DecProj), ("window", _L)]


class DecDims(ctypes.Structure):
    _fields_ = [(n, _L) for n in ("T", "hidden", "H", "KVH", "D", "I", "L", "block_size", "table_stride", "nkeep",
                                  "vocab", "nthreads")] + [("scale", _F), ("eps", _F)]


def _proj(p) -> DecProj:
    """A llama._Proj's bound few-row GEMM (linear_rows.BoundLinear) as the C struct."""
    w, scale, bias = p.rows._keep
    return DecProj(w.data_ptr(), None if scale is None else scale.data_ptr(),
                   None if bias is None else bias.data_ptr(), 1 if w.dtype == torch.int8 else 0, *w.shape)


class DecodeForwardLib:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.decode_forward
        self._fn.argtypes = [_P] * 14
        self._fn.restype = ctypes.c_int
        self._steps = lib.decode_steps
        self._steps.argtypes = [_P] * 15 + [_L, _P, _P]
        self._steps.restype = ctypes.c_int

    def bind(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]],
             block_size: int) -> "tuple[NativeDecode | None, str]":
        """``model``'s weights and the pool ``kv`` (per layer K [blocks, KVH, D, block_size], V [blocks *
        block_size, KVH, D], bf16) bound for one-call decode steps, and ""; (None, why not) when the
        model is not a bf16 llama-family forward whose projections all take the few-row GEMM."""
        from .llama import LlamaForward
        if not isinstance(model, LlamaForward):
            return None, f"{type(model).__name__} is not a llama-family native forward"
        if model.dtype != torch.bfloat16 or model.device.type != "cpu":
            return None, f"it runs bf16 on CPU only (the model is {model.dtype} on {model.device})"
        if any(p.rows is None or p.rows_max < 1 for p in model.projections()):
            return None, "some projections do not take the native few-row GEMM"
        return NativeDecode(self._fn, self._steps, model, kv, block_size), ""


class NativeDecode:
    """One model and KV pool, bound: ``__call__`` runs a decode-only step in one native call,
    ``steps`` several greedy ones."""

    def __init__(self, fn, steps_fn, model, kv, block_size: int) -> None:
        self._fn, self._steps_fn, self.model = fn, steps_fn, model
        # The bound GEMMs and pool tensors are kept referenced: the structs hold their addresses.
        self._keep = [p.rows for p in model.projections()] + [t for pair in kv for t in pair]
        self._layers = (DecLayer * len(model.layers))(*[
            DecLayer(L.in_norm.data_ptr(), L.post_norm.data_ptr(), _proj(L.qkv), _proj(L.o), _proj(L.gate_up),
                     _proj(L.down), w or 0) for L, w in zip(model.layers, model.windows)])
        self._kv = (_P * (2 * len(kv)))(*[t.data_ptr() for pair in kv for t in pair])
        self._head = _proj(model.lm_head)
        self._norm = model.norm.data_ptr()
        m = model
        self._dims = (m.embed.shape[1], m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate, len(m.layers),
                      block_size)
        self._vocab = model.lm_head.w.shape[0]
        # Steps the kernel takes on every projection (llama.kernel_takes, the Python forward's
        # rule too), so a step's bits do not depend on which of the two paths ran it.
        self.rows_max = min(p.rows_max for p in model.projections())
        self.greedy_head: GreedyHead | None = None   # use_greedy_head

    def use_greedy_head(self) -> bool:
        """Let ``steps`` take each token from an int8 proxy of a bf16 LM head and a few exact rows
        (greedy_head.py): the same tokens from about half the head's bytes. False, changing
        nothing, when the head is not bf16 or has a bias."""
        w, scale, bias = self.model.lm_head.rows._keep
        if w.dtype != torch.bfloat16 or scale is not None or bias is not None:
            return False
        if self.greedy_head is None:
            self.greedy_head = GreedyHead(w)
        return True

    def takes(self, batch, T: int) -> bool:
        """Whether this step can run here: every row a decode row of the attention kernel, no
        prefill chunk, at most ``rows_max`` rows; in deterministic mode (``batch.row_tile``) only
        if the kernel takes every row count, as the Python forward's routes then do."""
        return (batch.kernel is not None and batch.num_decodes == T and not batch.prefills and T > 0
                and kernel_takes(T, self.rows_max, batch.row_tile))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch, keep: torch.Tensor):
        """h [T, hidden] bf16 (the embedded ids; overwritten), cos/sin [T, D] bf16 contiguous, keep
        [nkeep] int64 rows. Returns logits [nkeep, vocab] bf16, or None when keep is empty. Writes this
        step's K/V into the pool. Raises MemoryError / RuntimeError if the native step fails."""
        keep = keep.contiguous()
        nkeep = keep.numel()
        logits = torch.empty(nkeep, self._vocab, dtype=torch.bfloat16) if nkeep else None
        wb, wo = batch.write_blocks.contiguous(), batch.write_offsets.contiguous()
        _check(self._fn(*self._args(h, cos, sin, wb, wo, batch.decode_tables, batch.decode_lens, keep, logits)))
        return logits

    def steps(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write_blocks: torch.Tensor,
              write_offsets: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """``S = write_blocks.shape[0]`` greedy decode steps of T rows in one native call (multi-step
        scheduling): each step's logits of every row, their argmax (the sampler's greedy rule) and
        that token's embedding as the next step's input. h [T, hidden] bf16 (the embedded last
        tokens; overwritten), cos/sin [S, T, D] bf16 contiguous, write_blocks/offsets [S, T] int64
        (each step's KV slot), tables [T, width] int32 covering every step's context, lens [T]
        int32 (step 0's context lengths; advanced in place). Returns tokens [S, T] int64. Bits as
        S calls of ``__call__`` each followed by the argmax and the embedding (also with
        ``use_greedy_head``). Raises MemoryError / RuntimeError if the native step fails."""
        S, T = write_blocks.shape
        # Unused with the greedy head, which needs no logits.
        logits = torch.empty(T if self.greedy_head is None else 0, self._vocab, dtype=torch.bfloat16)
        tokens = torch.empty(S, T, dtype=torch.int64)
        keep = torch.arange(T)
        g = self.greedy_head
        _check(self._steps_fn(*self._args(h, cos, sin, write_blocks, write_offsets, tables, lens, keep, logits),
                              self.model.embed.data_ptr(), S, tokens.data_ptr(),
                              None if g is None else ctypes.byref(g.struct)))
        return tokens

    def _args(self, h, cos, sin, wb, wo, tables, lens, keep, logits) -> tuple:
        """decode_forward's 14 arguments (csrc/decode_forward.h)."""
        dims = DecDims(h.shape[0], *self._dims, tables.shape[1], keep.numel(), self._vocab,
                       torch.get_num_threads(), self.model.scale, self.model.eps)
        return (ctypes.addressof(self._layers), ctypes.addressof(self._kv), ctypes.byref(dims),
                h.data_ptr(), cos.data_ptr(), sin.data_ptr(), wb.data_ptr(), wo.data_ptr(),
                tables.data_ptr(), lens.data_ptr(), keep.data_ptr(), self._norm,
                ctypes.addressof(self._head), None if logits is None else logits.data_ptr())


def _check(rc: int) -> None:
    if rc == -2:
        raise MemoryError("native decode step: out of memory")
    if rc:
        raise RuntimeError(f"native decode step failed (code {rc})")


def load(cache_dir: Path) -> DecodeForwardLib | None:
    lib = load_library("decode_forward", cache_dir, "native decode step")
    return None if lib is None else DecodeForwardLib(lib)
