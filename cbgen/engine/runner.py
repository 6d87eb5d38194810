"""ModelRunner: the only engine code that touches tensors.

SchedulerOutput -> one forward over the flattened tokens of every scheduled
request (no padding; positions per token) -> logits at each sampling position
-> sampled ids. Owns the KV pool: per layer a K and a V tensor of
``num_blocks * block_size`` slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import EngineConfig
from .attention import ATTN_NAME, PagedBatch, PrefillChunk
from .sampler import SampleResult, sample
from .scheduler import SchedulerOutput

# Architectures whose transformers definition routes attention through
# AttentionInterface with full causal attention (no sliding window, no
# cross-layer cache sharing). Others are refused rather than served wrongly.
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo2"}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def kv_geometry(model) -> KVGeometry:
    c = model.config
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {c.model_type!r} is not supported by the paged engine "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
        raise UnsupportedModelError(f"model type {c.model_type!r} with sliding_window="
                                    f"{c.sliding_window} is not supported by the paged engine")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return KVGeometry(c.num_hidden_layers, kvh, head_dim, model.dtype.itemsize)


def num_blocks_for(cfg: EngineConfig, geo: KVGeometry, max_model_len: int) -> int:
    """The pool size: ``num_kv_blocks`` if given, else what ``kv_cache_gb`` holds,
    capped at what max_num_seqs full-length sequences could ever use."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    by_memory = int(cfg.kv_cache_gb * 2**30) // (geo.bytes_per_token * cfg.block_size)
    per_seq = -(-max_model_len // cfg.block_size)
    return max(1, min(by_memory, cfg.max_num_seqs * per_seq + 1))


class ModelRunner:
    def __init__(self, model, cfg: EngineConfig, num_blocks: int) -> None:
        self.model = model
        self.geo = kv_geometry(model)
        self.block_size = cfg.block_size
        self.device = next(model.parameters()).device
        # Our function reads/writes the paged pool; transformers builds no mask for it.
        model.set_attn_implementation(ATTN_NAME)
        # One extra slot at the end, zeroed and never written: padded decode
        # positions read it, so attention never reads unwritten memory (a NaN
        # there would survive the -inf mask as 0 * NaN).
        self.null_slot = num_blocks * cfg.block_size
        shape = (self.null_slot + 1, self.geo.num_kv_heads, self.geo.head_dim)
        # torch.empty: pages are only touched (and counted in RSS) as blocks get used.
        self.kv = [(torch.empty(shape, dtype=model.dtype, device=self.device),
                    torch.empty(shape, dtype=model.dtype, device=self.device))
                   for _ in range(self.geo.num_layers)]
        for k, v in self.kv:
            k[self.null_slot].zero_()
            v[self.null_slot].zero_()
        self.num_forward_tokens = 0   # every token ever forwarded (the no-recompute check counts these)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _batch(self, out: SchedulerOutput):
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        slot_mapping: list[int] = []
        keep: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, list[int]]] = []
        for s in out.scheduled:
            req, st, n = s.request, s.start, s.num_tokens
            flat = len(ids)
            ids.extend(req.token_ids[st:st + n])
            pos.extend(range(st, st + n))
            slot_mapping.extend(self._slots(req.block_table, st, st + n))
            if s.samples:
                keep.append(flat + n - 1)
            if n == 1:
                assert flat == len(dec_lens), "decodes come first"
                dec_tables.append(req.block_table)
                dec_lens.append(st + 1)
            else:
                prefill_specs.append((flat, st, n, req.block_table))

        decode_slots = decode_mask = None
        if dec_lens:
            bs = self.block_size
            width = max(len(t) for t in dec_tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], device=dev)
            L = max(dec_lens)
            j = torch.arange(L, device=dev)
            lens = torch.tensor(dec_lens, device=dev).unsqueeze(1)
            decode_slots = torch.where(j < lens, table[:, j // bs] * bs + j % bs, self.null_slot)
            decode_mask = torch.zeros(len(dec_lens), L, dtype=self.model.dtype, device=dev)
            decode_mask.masked_fill_(j.unsqueeze(0) >= lens, float("-inf"))
            decode_mask = decode_mask[:, None, None, :]
        prefills = []
        for flat, st, n, table in prefill_specs:
            if st == 0:
                prefills.append(PrefillChunk(flat, flat + n, None, None))  # type: ignore[arg-type]
                continue
            ctx = st + n
            slots = torch.tensor(self._slots(table, 0, ctx), device=dev)
            q_pos = torch.arange(st, ctx, device=dev).unsqueeze(1)
            mask = torch.arange(ctx, device=dev).unsqueeze(0) <= q_pos   # [n, ctx]
            prefills.append(PrefillChunk(flat, flat + n, slots, mask))
        batch = PagedBatch(self.kv, torch.tensor(slot_mapping, device=dev), len(dec_lens),
                           decode_slots, decode_mask, prefills)
        return (torch.tensor(ids, device=dev).unsqueeze(0), torch.tensor(pos, device=dev).unsqueeze(0),
                torch.tensor(keep, dtype=torch.long, device=dev), batch)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampleResult:
        input_ids, positions, keep, batch = self._batch(out)
        self.num_forward_tokens += input_ids.shape[1]
        samplers = [s.request for s in out.scheduled if s.samples]
        if not samplers:
            self.model.base_model(input_ids=input_ids, position_ids=positions, use_cache=False, cbgen_batch=batch)
            return SampleResult([], None)
        logits = self.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                            logits_to_keep=keep, cbgen_batch=batch).logits[0]
        return sample(logits, samplers)
