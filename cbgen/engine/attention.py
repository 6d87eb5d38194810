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

Pool layout (per layer), chosen for the kernel: K is ``[num_blocks, KVH, D,
block_size]`` (token-minor inside a block, so q.K vectorises over tokens) and
V is ``[num_blocks * block_size, KVH, D]`` (one row per slot). The last block
is a zeroed null block that padded table entries point at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_ops import FusedOps
from .paged_kernel import PagedDecodeKernel

ATTN_NAME = "cbgen_paged"


@dataclass
class PrefillChunk:
    start: int                   # first query row in the flat batch
    end: int
    ctx_len: int                 # cached prefix + this chunk
    blocks: torch.Tensor | None  # [ceil(ctx_len / bs)] block ids; None = nothing cached before the chunk
    mask: torch.Tensor | None    # [q, ctx_len] bool (True = attend); None with blocks=None (plain causal)


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
    out = attend(batch, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                 value[0].transpose(0, 1), scale)
    return out.unsqueeze(0), None


def attend(batch: PagedBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Write this step's ``k``/``v`` [T, KVH, D] into layer ``layer``'s pool, then attend
    every query ``q`` [T, H, D] to its own sequence's context. Returns [T, H, D]."""
    k_cache, v_cache = batch.kv[layer]
    T, num_heads, D = q.shape
    kvh = k.shape[1]
    group = num_heads // kvh
    # Write first: a query may attend to its own token.
    k_cache[batch.write_blocks, :, :, batch.write_offsets] = k
    v_cache.index_copy_(0, batch.write_slots, v)

    out = q.new_empty(T, num_heads, D)
    nd = batch.num_decodes
    if nd and batch.kernel is not None:
        batch.kernel(q[:nd].contiguous(), k_cache, v_cache, out[:nd], batch.decode_tables, batch.decode_lens,
                     batch.block_size, scale)
    elif nd:
        # [nd, H, D] -> [nd, kvh, group, D]: the group plays the role of query length.
        qd = q[:nd].reshape(nd, kvh, group, D)
        # Slots past a sequence's length in its last block were never written (the
        # pool is torch.empty): zero them, or a NaN there would survive the -inf mask.
        kd = _gather_k(k_cache, batch.decode_tables).masked_fill_(batch.decode_pad, 0)   # [nd, kvh, L, D]
        vd = _gather_v(v_cache, batch.decode_tables, batch.block_size).masked_fill(batch.decode_pad, 0)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=scale)
        out[:nd] = o.reshape(nd, num_heads, D)
    for c in batch.prefills:
        qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)                       # [1, H, n, D]
        if c.blocks is None:  # nothing cached before this chunk: its own K/V are the whole context
            kc = k[c.start:c.end].transpose(0, 1).unsqueeze(0)
            vc = v[c.start:c.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kc = _gather_k(k_cache, c.blocks)[:, :c.ctx_len].unsqueeze(0)   # [1, kvh, ctx, D]
            vc = _gather_v(v_cache, c.blocks, batch.block_size)[:, :c.ctx_len].unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale, enable_gqa=True)
        out[c.start:c.end] = o[0].transpose(0, 1)
    return out


def register() -> str:
    """Register ``paged_attention`` with transformers (for models run through their own
    modules) and return its name. Imported lazily: transformers' modelling stack costs
    ~1.5 s of start-up that natively loaded models never pay."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
