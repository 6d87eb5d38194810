"""Attention over the paged KV cache, registered with transformers' AttentionInterface.

The model runs on one flattened batch ``[1, T]`` of all scheduled tokens (no
padding). Per layer this function writes the step's K/V into the pool at
``slot_mapping`` and attends each query to its own sequence's cached K/V:
- decodes (one query each, the first ``num_decodes`` tokens) in one batched
  call: K/V gathered through a [num_decodes, max_len] slot table, padded slots
  masked out. Query heads are grouped per KV head (GQA) so K/V are never repeated.
- prefill chunks one call each, causal with an offset for the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_NAME = "cbgen_paged"


@dataclass
class PrefillChunk:
    start: int                 # first query row in the flat batch
    end: int
    slots: torch.Tensor        # [ctx_len] cache slots of the whole context so far
    mask: torch.Tensor | None  # [q, ctx_len] bool (True = attend); None = plain causal, no prefix


@dataclass
class PagedBatch:
    """Per-step attention metadata, shared by all layers (built once per step)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [num_slots, kv_heads, head_dim]
    slot_mapping: torch.Tensor                   # [T] where each new token's K/V goes
    num_decodes: int
    decode_slots: torch.Tensor | None            # [num_decodes, max_len]
    decode_mask: torch.Tensor | None             # [num_decodes, 1, 1, max_len] additive (0 / -inf)
    prefills: list[PrefillChunk]


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` as ``index_select`` on the flattened slots: the same values, but one
    row memcpy per slot instead of advanced indexing's per-element copy (~10x faster on CPU)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    batch: PagedBatch | None = kwargs.get("cbgen_batch")
    if batch is None:
        # Called outside the engine (e.g. plain `model.generate` on a model an Engine
        # was built on): behave exactly like transformers' sdpa.
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    k_cache, v_cache = batch.kv[module.layer_idx]
    _, num_heads, T, D = query.shape
    kvh = key.shape[1]
    group = num_heads // kvh
    # Write first: a query may attend to its own token.
    k_cache.index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1))

    out = query.new_empty(T, num_heads, D)
    nd = batch.num_decodes
    if nd:
        # [H, nd, D] -> [nd, kvh, group, D]: the group plays the role of query length.
        q = query[0, :, :nd].reshape(kvh, group, nd, D).permute(2, 0, 1, 3)
        k = _gather(k_cache, batch.decode_slots).transpose(1, 2)   # [nd, kvh, L, D]
        v = _gather(v_cache, batch.decode_slots).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.decode_mask, scale=scaling)
        out[:nd] = o.reshape(nd, num_heads, D)
    for c in batch.prefills:
        q = query[:, :, c.start:c.end]
        if c.mask is None:  # nothing cached before this chunk: its own K/V are the whole context
            k, v = key[:, :, c.start:c.end], value[:, :, c.start:c.end]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k = _gather(k_cache, c.slots).transpose(0, 1).unsqueeze(0)   # [1, kvh, L, D]
            v = _gather(v_cache, c.slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask, scale=scaling, enable_gqa=True)
        out[c.start:c.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention)
