"""Attention over the paged KV cache, registered with transformers' AttentionInterface.

The model runs on one flattened batch ``[1, T]`` of all scheduled tokens (no
padding). Per layer this function writes the step's K/V into the pool and
attends each query to its own sequence's cached K/V:
- decodes (one query each, the first ``num_decodes`` tokens) in one call:
  the native kernel (paged_kernel.py) reads K/V in place through the block
  tables; without it, whole blocks are gathered and one batched SDPA runs with
  padded positions masked out. Query heads are grouped per KV head (GQA) so
  K/V are never repeated.
- prefill chunks one SDPA call each, causal with an offset for the cached prefix.

Sliding windows (``attend(..., window=W)``, per layer; ModelSpec.sliding_windows):
a query at position q sees keys k with ``q - W < k <= q`` (transformers'
``masking_utils.sliding_window_overlay``). The kernel starts each sequence at
``max(0, len - W)`` and skips whole blocks before it; the torch decode path masks
those positions; a prefill chunk gathers only the blocks its first query can see
and masks causal-and-window. Each distinct window's mask is built once per step
(cached on the batch / chunk) and shared by every layer with that window.

KV blocks wholly outside every layer's window are not freed. A model with a
full-attention layer (Gemma 3: one in six) needs every block anyway. For a model
whose layers all slide (Mistral) freeing them would save memory, but the block
manager shares full blocks between requests by prefix hash and recomputes a
preempted request from position 0: a block freed under one request could be the
cached prefix another request is about to reuse, and a recompute would have to
rebuild blocks it then frees again. Keeping them keeps the block manager
window-agnostic (no torch, no per-layer facts) at the cost of memory only.

Pool layout (per layer), chosen for the kernel: K is ``[num_blocks, KVH, D,
block_size]`` (token-minor inside a block, so q.K vectorises over tokens) and
V is ``[num_blocks * block_size, KVH, D]`` (one row per slot). The last block
is a zeroed null block that padded table entries point at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .fused_ops import FusedOps
from .paged_kernel import PagedDecodeKernel

ATTN_NAME = "cbgen_paged"


@dataclass(frozen=True)
class ChunkView:
    """What one prefill chunk's queries attend to under one window."""
    first_block: int             # index into the chunk's blocks of the first block any query sees
    mask: torch.Tensor | None    # [n, keys] bool (True = attend); None = plain causal (is_causal=True)


@dataclass
class PrefillChunk:
    start: int                   # first query row in the flat batch
    end: int
    ctx_len: int                 # cached prefix + this chunk
    blocks: torch.Tensor | None  # [ceil(ctx_len / bs)] block ids; None = nothing cached before the chunk
    views: dict[int | None, ChunkView] = field(default_factory=dict)   # by window, built on first use

    def view(self, window: int | None, block_size: int, device: torch.device) -> ChunkView:
        """The keys and mask for ``window`` (None: full causal), built once per step.

        With ``blocks=None`` the keys are the chunk's own n tokens (positions 0..n-1)
        and SDPA's ``is_causal`` is exact while no query is W or more past the first
        key (n <= W); else the mask is causal and ``q - k < W``. With a cached prefix
        the keys start at the first block holding position ``first - W + 1`` of the
        chunk's first query ``first`` (block 0 without a window).
        """
        got = self.views.get(window)
        if got is not None:
            return got
        n = self.end - self.start
        first = self.ctx_len - n
        if self.blocks is None:
            if window is None or n <= window:
                got = ChunkView(0, None)
            else:
                got = ChunkView(0, _causal_mask(torch.arange(n, device=device), 0, n, window))
        else:
            b0 = 0 if window is None else max(0, first - window + 1) // block_size
            got = ChunkView(b0, _causal_mask(torch.arange(first, self.ctx_len, device=device),
                                             b0 * block_size, self.ctx_len, window))
        self.views[window] = got
        return got


def _causal_mask(q_pos: torch.Tensor, k_from: int, k_to: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), k_to - k_from] bool: key position k visible to query position q
    iff ``k <= q`` and (with a window) ``q - k < window``."""
    k = torch.arange(k_from, k_to, device=q_pos.device).unsqueeze(0)
    q = q_pos.unsqueeze(1)
    ok = k <= q
    return ok if window is None else ok & (q - k < window)


@dataclass(frozen=True)
class BatchSequence:
    """One scheduled sequence's slice of the flat batch."""
    key: tuple[str, int]         # (request_id, sample index): stable while the sequence lives
    flat_start: int              # its first row in the flat batch
    num_tokens: int
    start: int                   # position of its first new token (0: from scratch, e.g. after a preemption)


@dataclass
class PagedBatch:
    """Per-step attention metadata, shared by all layers (built once per step)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) in the pool layout above
    block_size: int
    write_blocks: torch.Tensor                   # [T] block of each new token's K/V
    write_offsets: torch.Tensor                  # [T] offset inside that block
    write_slots: torch.Tensor                    # [T] block * block_size + offset (V rows)
    num_decodes: int
    decode_tables: torch.Tensor | None           # int32 [num_decodes, W], padded with the null block
    decode_lens: torch.Tensor | None             # int32 [num_decodes] context lengths incl. the new token
    decode_mask: torch.Tensor | None             # torch path only: [num_decodes, 1, 1, W * bs] additive
    decode_pad: torch.Tensor | None              # torch path only: [num_decodes, 1, W * bs, 1] True past the length
    prefills: list[PrefillChunk]
    kernel: PagedDecodeKernel | None             # None: torch path for decodes
    fused: FusedOps | None = None                # native residual add + RMSNorm (bf16 native forward only)
    sequences: tuple[BatchSequence, ...] = ()    # in flat-batch order
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # torch decode masks by window
    # Deterministic mode (batch_invariant.py): GEMM row tile; None = plain F.linear. With it the
    # runner also makes every token a "decode" row of the kernel (no prefill chunks).
    row_tile: int | None = None
    native_decode: object | None = None          # decode_forward.NativeDecode: decode-only steps in one call

    def decode_mask_for(self, window: int | None) -> torch.Tensor:
        """The torch decode path's additive mask [num_decodes, 1, 1, W * bs] for ``window``:
        ``decode_mask`` (-inf past each length) with -inf also before ``len - window``.
        Built once per step per window."""
        if window is None:
            return self.decode_mask
        got = self.window_masks.get(window)
        if got is None:
            j = torch.arange(self.decode_mask.shape[-1], device=self.decode_mask.device)
            before = j.unsqueeze(0) < (self.decode_lens.long() - window).unsqueeze(1)   # [nd, W * bs]
            got = self.decode_mask.masked_fill(before[:, None, None, :], float("-inf"))
            self.window_masks[window] = got
        return got


def _gather_k(k_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Whole blocks of K as [..., KVH, n * bs, D] for ``blocks`` of shape [..., n]."""
    _, kvh, d, bs = k_cache.shape
    k = k_cache.index_select(0, blocks.reshape(-1)).view(*blocks.shape, kvh, d, bs)
    k = k.movedim(-3, -4).transpose(-1, -2)                      # [..., KVH, n, bs, D]
    return k.reshape(*blocks.shape[:-1], kvh, blocks.shape[-1] * bs, d)


def _gather_v(v_cache: torch.Tensor, blocks: torch.Tensor, bs: int) -> torch.Tensor:
    """Whole blocks of V as [..., KVH, n * bs, D] for ``blocks`` of shape [..., n]."""
    _, kvh, d = v_cache.shape
    v = v_cache.view(-1, bs, kvh, d).index_select(0, blocks.reshape(-1))
    v = v.view(*blocks.shape[:-1], blocks.shape[-1] * bs, kvh, d)
    return v.transpose(-2, -3)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' AttentionInterface adapter: [1, H, T, D] in, ([1, T, H, D], None) out."""
    batch: PagedBatch | None = kwargs.get("cbgen_batch")
    if batch is None:
        # Called outside the engine (e.g. plain `model.generate` on a model an Engine
        # was built on): behave exactly like transformers' sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # transformers' sliding-window models pass the layer's window (None on full layers)
    # as a keyword (Mistral, Qwen2, Gemma 3); some keep it on the module only.
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    out = attend(batch, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                 value[0].transpose(0, 1), scale, window=window)
    return out.unsqueeze(0), None


def attend(batch: PagedBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float, window: int | None = None) -> torch.Tensor:
    """Write this step's ``k``/``v`` [T, KVH, D] into layer ``layer``'s pool, then attend
    every query ``q`` [T, H, D] to its own sequence's context. Returns [T, H, D].

    ``window``: None for full causal attention; W >= 1 for a sliding window (a query
    at position q sees keys at q - W < k <= q)."""
    window = window or None   # 0 / None: full (transformers uses None; some configs write 0)
    k_cache, v_cache = batch.kv[layer]
    T, num_heads, D = q.shape
    kvh = k.shape[1]
    group = num_heads // kvh
    # Write first: a query may attend to its own token.
    if batch.fused is None or not batch.fused.write_kv(k, v, k_cache, v_cache, batch.write_blocks,
                                                       batch.write_offsets):
        k_cache[batch.write_blocks, :, :, batch.write_offsets] = k
        v_cache.index_copy_(0, batch.write_slots, v)

    out = q.new_empty(T, num_heads, D)
    nd = batch.num_decodes
    if nd and batch.kernel is not None:
        batch.kernel(q[:nd].contiguous(), k_cache, v_cache, out[:nd], batch.decode_tables, batch.decode_lens,
                     batch.block_size, scale, window)
    elif nd:
        # [nd, H, D] -> [nd, kvh, group, D]: the group plays the role of query length.
        qd = q[:nd].reshape(nd, kvh, group, D)
        # Slots past a sequence's length in its last block were never written (the
        # pool is torch.empty): zero them, or a NaN there would survive the -inf mask.
        kd = _gather_k(k_cache, batch.decode_tables).masked_fill_(batch.decode_pad, 0)   # [nd, kvh, L, D]
        vd = _gather_v(v_cache, batch.decode_tables, batch.block_size).masked_fill(batch.decode_pad, 0)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask_for(window), scale=scale)
        out[:nd] = o.reshape(nd, num_heads, D)
    bs = batch.block_size
    for c in batch.prefills:
        qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)                       # [1, H, n, D]
        view = c.view(window, bs, q.device)
        if c.blocks is None:  # nothing cached before this chunk: its own K/V are the whole context
            kc = k[c.start:c.end].transpose(0, 1).unsqueeze(0)
            vc = v[c.start:c.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=view.mask, is_causal=view.mask is None,
                                               scale=scale, enable_gqa=True)
        else:
            blocks, keys = c.blocks[view.first_block:], c.ctx_len - view.first_block * bs
            kc = _gather_k(k_cache, blocks)[:, :keys].unsqueeze(0)          # [1, kvh, keys, D]
            vc = _gather_v(v_cache, blocks, bs)[:, :keys].unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=view.mask, scale=scale, enable_gqa=True)
        out[c.start:c.end] = o[0].transpose(0, 1)
    return out


def register() -> str:
    """Register ``paged_attention`` with transformers (for models run through their own
    modules) and return its name. Imported lazily: transformers' modelling stack costs
    ~1.5 s of start-up that natively loaded models never pay."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
