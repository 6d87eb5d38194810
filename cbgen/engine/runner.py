"""ModelRunner: the only engine code that touches tensors.

SchedulerOutput -> one forward over the flattened tokens of every scheduled
request (no padding; positions per token) -> logits at each sampling position
-> sampled ids. Owns the KV pool: per layer a K and a V tensor of
``num_blocks * block_size`` slots.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import EngineConfig, cache_root
from . import decode_forward, fused_ops, hugepages, linear_rows, paged_kernel, quantize
from .llama import _can_pack, kernel_takes
from .architectures import UnsupportedModelError
from .batch_invariant import row_tile_for
from .attention import BatchSequence, PagedBatch, PrefillChunk
from .logprobs import PromptSpan, prompt_logprobs, prompt_span
from .model import Model
from .model_spec import ModelSpec
from .sampler import GrammarMasks, SampleResult, sample
from .scheduler import SchedulerOutput

__all__ = ["ModelRunner", "UnsupportedModelError", "choose_kernel", "max_len_for", "num_blocks_for"]


def max_len_for(cfg: EngineConfig, spec: ModelSpec) -> int:
    """The context length an engine serves: the model's, lowered by ``cfg.max_model_len``."""
    return min(spec.max_model_len, cfg.max_model_len or spec.max_model_len)


def num_blocks_for(cfg: EngineConfig, spec: ModelSpec, max_model_len: int) -> int:
    """The pool size: ``num_kv_blocks`` if given, else what ``kv_cache_gb`` holds,
    capped at what max_num_seqs full-length sequences could ever use."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    by_memory = int(cfg.kv_cache_gb * 2**30) // max(1, spec.kv_bytes_per_token * cfg.block_size)
    per_seq = -(-max_model_len // cfg.block_size)
    return max(1, min(by_memory, cfg.max_num_seqs * per_seq + 1))


def choose_kernel(spec: ModelSpec, device, cfg: EngineConfig) -> tuple[paged_kernel.PagedDecodeKernel | None, str]:
    """The native decode-attention kernel for a model of ``spec`` under ``cfg``, or (None, why not)."""
    if cfg.attention == "torch":
        return None, "attention='torch' was asked for"
    if device.type != "cpu":
        return None, f"the native kernel is CPU-only (device {device})"
    if paged_kernel.disabled():
        return None, "the native kernel is switched off by CBGEN_NATIVE_KERNEL=0"
    kernel = paged_kernel.load(cache_root() / "kernels")
    if kernel is None:
        return None, "the native kernel could not be built here (no C compiler?)"
    dtype = getattr(torch, spec.dtype)
    if not kernel.supports(dtype, spec.num_heads, spec.num_kv_heads, spec.head_dim, cfg.block_size):
        return None, (f"the native kernel does not support dtype={dtype}, heads="
                      f"{spec.num_heads}/{spec.num_kv_heads}, head_dim={spec.head_dim}, block_size={cfg.block_size}")
    return kernel, ""


class ModelRunner:
    """Runs a ``Model`` (model.py) over the paged KV pool: one execute path for every implementation."""

    def __init__(self, model: Model, cfg: EngineConfig, num_blocks: int) -> None:
        if not model.spec.kv_pool:
            return self._init_own_kv(model, cfg, num_blocks)   # the transformers fallback
        self.model = model
        self.spec = spec = model.spec
        self.block_size = bs = cfg.block_size
        self.device = next(iter(model.parameters())).device
        self.dtype = getattr(torch, spec.dtype)
        self.kernel, why = choose_kernel(spec, self.device, cfg)
        self.kernel_why = why
        if self.kernel is None and cfg.attention == "native":
            raise UnsupportedModelError(f"attention='native' is unavailable: {why}; use 'auto' or 'torch'")
        # Native residual add + RMSNorm and greedy argmax: bf16 only (float32 keeps exact torch ops).
        self.fused = (fused_ops.load(cache_root() / "kernels")
                      if self.dtype == torch.bfloat16 and self.device.type == "cpu" else None)
        # Weights a decode step streams on huge pages (hugepages.py); before quantize.apply binds them.
        if self.device.type == "cpu" and hasattr(model, "projections"):
            hugepages.move_weights(model)
        # The native few-row GEMM for bf16 and int8 projections on CPU (quantize.apply says which).
        if self.device.type == "cpu" and hasattr(model, "projections") and (
                self.dtype == torch.bfloat16 or any(p.q is not None for p in model.projections())):
            quantize.apply(model, "none", linear_rows.load(cache_root() / "kernels"),
                           packable=_can_pack(self.dtype, self.device))
        # One extra block at the end, zeroed and never written: padded decode-table
        # entries point at it (the kernel never reads them; the torch path gathers
        # and then zeroes every position past a sequence's length).
        self.null_block = num_blocks
        kv_shape = (num_blocks + 1, spec.num_kv_heads, spec.head_dim, bs)   # see attention.py: token-minor
        v_shape = ((num_blocks + 1) * bs, spec.num_kv_heads, spec.head_dim)
        # torch.empty: pages are only touched (and counted in RSS) as blocks get used. Not on huge
        # pages: a first touch of a 2 MiB page cost ~4 ms on the 2-vCPU VM we measured (backing
        # fresh guest memory), on the step that touches it, and the pool's RSS would grow 2 MiB
        # at a time (benchmarks/NOTES.md change 18).
        self.kv = [(torch.empty(kv_shape, dtype=self.dtype, device=self.device),
                    torch.empty(v_shape, dtype=self.dtype, device=self.device))
                   for _ in range(spec.num_layers)]
        for k, v in self.kv:
            k[self.null_block].zero_()
            v[self.null_block * bs:].zero_()
        # Decode-only steps in one native call (decode_forward.py), where the model allows it.
        self.native_decode = None
        if self.fused is not None and self.kernel is not None:
            lib = decode_forward.load(cache_root() / "kernels")
            self.native_decode = None if lib is None else lib.bind(model, self.kv, bs)[0]
            # Multi-step calls need only each row's argmax: from an int8 proxy of a bf16 head.
            if self.native_decode is not None and cfg.num_scheduler_steps > 1:
                self.native_decode.use_greedy_head()
        self.num_forward_tokens = 0   # every token ever forwarded (the no-recompute check counts these)
        self.mask_worker = None       # structured.BitmaskWorker, made for the first constrained step
        # Deterministic mode's two fixes (batch_invariant.py), set together by set_deterministic:
        # GEMMs on tiles of row_tile rows, and every token its own attention-kernel row.
        self.row_tile: int | None = None
        self.per_token_attention = False
        if cfg.deterministic:
            self.set_deterministic(True)

    def set_deterministic(self, on: bool) -> None:
        """Batch-invariant steps from the next one on (batch_invariant.py): GEMMs on fixed row
        tiles, every token's attention through the native kernel. Raises UnsupportedModelError
        where that cannot hold (no native kernel, or a model that does not tile its GEMMs)."""
        if not on:
            self.row_tile, self.per_token_attention = None, False
            return
        if not getattr(self.model, "batch_invariant", False):
            raise UnsupportedModelError(
                f"deterministic needs cbgen's native forward (llama, mistral, qwen2, gemma3_text); "
                f"this {self.spec.architecture} model runs through transformers' modules (--impl transformers, "
                "or no native forward for it), whose GEMMs are not batch-invariant")
        if self.kernel is None:
            raise UnsupportedModelError(f"deterministic needs the native attention kernel: {self.kernel_why}")
        self.row_tile, self.per_token_attention = row_tile_for(self.dtype), True

    def _init_own_kv(self, model, cfg: EngineConfig, num_blocks: int) -> None:
        """A model that keeps its own KV cache (hf_fallback.TransformersFallback): no pool,
        no kernel, no fused ops; its ``forward`` is called like the native one. The block
        tables are still built (the block manager bounds its memory); they are unused."""
        if cfg.attention == "native":
            raise UnsupportedModelError("attention='native' is unavailable: the transformers fallback keeps "
                                        "its own KV cache (no paged kernel); use 'auto' or 'torch'")
        self.model, self.spec = model, model.spec
        self.block_size, self.device, self.dtype = cfg.block_size, model.device, model.dtype
        self.kernel = self.fused = self.native_decode = None
        self.kernel_why = "the transformers fallback keeps its own KV cache"
        self.null_block, self.kv = num_blocks, []
        self.num_forward_tokens = 0
        self.mask_worker = None
        self.row_tile, self.per_token_attention = None, False
        if cfg.deterministic:
            self.set_deterministic(True)

    def _batch(self, out: SchedulerOutput):
        dev, bs = self.device, self.block_size
        # Deterministic: every token is a kernel row of its own (prefill tokens too), so a
        # token's attention is reduced the same way whether it was prefilled or decoded.
        per_token = self.per_token_attention
        ids: list[int] = []
        pos: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        keep: list[int] = []
        prompt_rows: list[int] = []   # kept after the sampling rows, for prompt logprobs
        spans: list[PromptSpan] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, list[int]]] = []
        sequences: list[BatchSequence] = []
        for s in out.scheduled:
            req, st, n = s.request, s.start, s.num_tokens
            flat = len(ids)
            sequences.append(BatchSequence(req.key, flat, n, st))
            table = req.block_table
            ids.extend(req.token_ids[st:st + n])
            pos.extend(range(st, st + n))
            blocks.extend(table[p // bs] for p in range(st, st + n))
            offsets.extend(p % bs for p in range(st, st + n))
            if s.samples:
                keep.append(flat + n - 1)
            span = prompt_span(req, st, n, len(prompt_rows))
            if span is not None:
                spans.append(span)
                first = flat + span.start - 1 - st
                prompt_rows.extend(range(first, first + span.count))
            if n == 1 or per_token:
                assert flat == len(dec_lens), "decodes come first"
                dec_tables.extend([table] * n)
                dec_lens.extend(range(st + 1, st + n + 1))
            else:
                prefill_specs.append((flat, st, n, table))

        tables = lens = mask = pad = None
        if dec_lens:
            width = -(-max(dec_lens) // bs)
            tables = self._decode_tables(dec_tables, width)
            lens = torch.tensor(dec_lens, dtype=torch.int32, device=dev)
            if self.kernel is None:
                j = torch.arange(width * bs, device=dev)
                past = j.unsqueeze(0) >= lens.unsqueeze(1)                     # [nd, W * bs]
                mask = torch.zeros(past.shape, dtype=self.dtype, device=dev).masked_fill_(past, float("-inf"))
                mask, pad = mask[:, None, None, :], past[:, None, :, None]
        # Each chunk's masks (one per distinct window) are built by attention.py at the
        # first layer that needs them and reused by the others (PrefillChunk.view).
        prefills = [PrefillChunk(flat, flat + n, st + n,
                                 None if st == 0 else torch.tensor(table[:-(-(st + n) // bs)], device=dev))
                    for flat, st, n, table in prefill_specs]
        write_blocks = torch.tensor(blocks, device=dev)
        write_offsets = torch.tensor(offsets, device=dev)
        batch = PagedBatch(self.kv, bs, write_blocks, write_offsets, write_blocks * bs + write_offsets,
                           len(dec_lens), tables, lens, mask, pad, prefills, self.kernel, self.fused,
                           tuple(sequences), row_tile=self.row_tile, native_decode=self.native_decode)
        return (torch.tensor(ids, device=dev).unsqueeze(0), torch.tensor(pos, device=dev).unsqueeze(0),
                torch.tensor(keep + prompt_rows, dtype=torch.long, device=dev), batch, spans)

    def _decode_tables(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """[len(tables), width] int32: each block table cut or padded to ``width`` with the null
        block (the kernel never reads past a row's length)."""
        null = self.null_block
        return torch.tensor([t[:width] + [null] * (width - len(t[:width])) for t in tables],
                            dtype=torch.int32, device=self.device)

    def _start_masks(self, samplers: list) -> tuple[GrammarMasks, object] | None:
        """Start filling the grammar bitmasks of this step's constrained rows on the
        mask worker; they overlap the forward (the matchers hold every token so far)."""
        rows = [i for i, r in enumerate(samplers) if r.matcher is not None]
        if not rows:
            return None
        if self.mask_worker is None:
            from .structured import BitmaskWorker
            self.mask_worker = BitmaskWorker()
        vocab = self.spec.vocab_size
        words = -(-vocab // 32)
        masks = GrammarMasks(rows, torch.zeros((len(rows), words), dtype=torch.int32))

        def expand() -> None:
            # On the worker too, so the sampler gets a ready bool mask. numpy, not torch:
            # a torch op on this thread would start a second OpenMP team (cbgen/compute.py).
            # Little-endian bytes of int32 words: bit j of word w is unpacked bit 32 * w + j.
            bits = np.unpackbits(masks.bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
            masks.blocked = torch.from_numpy(bits[:, :vocab] == 0)

        future = self.mask_worker.submit([samplers[i].matcher for i in rows], masks.bitmask.data_ptr(),
                                         words * 4, len(rows), then=expand)
        return masks, future

    def _masks(self, pending: tuple[GrammarMasks, object] | None) -> GrammarMasks | None:
        if pending is None:
            return None
        masks, future = pending
        t0 = time.perf_counter()
        future.result()
        self.mask_worker.times.wait_s += time.perf_counter() - t0
        return masks

    def takes_steps(self, num_rows: int) -> bool:
        """Whether a decode-only step of ``num_rows`` sequences can run as several greedy steps in
        one native call (``SchedulerOutput.num_steps``): where its single steps would take the
        one-call native step, so the bits are the same."""
        nd = self.native_decode
        return nd is not None and kernel_takes(num_rows, nd.rows_max, self.row_tile)

    @torch.inference_mode()
    def _execute_steps(self, out: SchedulerOutput) -> SampleResult:
        """``out.num_steps`` greedy decode steps of every scheduled request in one native call
        (scheduler.lookahead gave each the KV slots). ``SampleResult.steps[i][j]`` is step i's
        token of request j, ``token_ids`` step 0's."""
        S, bs = out.num_steps, self.block_size
        reqs = [s.request for s in out.scheduled]
        starts = [s.start for s in out.scheduled]   # the position of each request's last token
        pos = [[p + i for p in starts] for i in range(S)]
        width = -(-(max(starts) + S) // bs)
        tables = self._decode_tables([r.block_table for r in reqs], width)
        tokens = self.model.greedy_steps(
            self.native_decode, torch.tensor([r.token_ids[p] for r, p in zip(reqs, starts)]), torch.tensor(pos),
            torch.tensor([[r.block_table[q // bs] for r, q in zip(reqs, row)] for row in pos]),
            torch.tensor([[q % bs for q in row] for row in pos]), tables,
            torch.tensor([p + 1 for p in starts], dtype=torch.int32))
        self.num_forward_tokens += S * len(reqs)
        steps = tokens.tolist()
        return SampleResult(steps[0], steps=steps)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampleResult:
        if out.num_steps > 1:
            return self._execute_steps(out)
        input_ids, positions, keep, batch, spans = self._batch(out)
        self.num_forward_tokens += input_ids.shape[1]
        samplers = [s.request for s in out.scheduled if s.samples]
        pending = self._start_masks(samplers)
        logits = self.model.forward(input_ids[0], positions[0], batch, keep)
        argmax = self.fused.argmax if self.fused is not None else None
        # Sampling rows first (a contiguous slice), prompt-logprob rows after them.
        result = (sample(logits[:len(samplers)], samplers, argmax, self._masks(pending)) if samplers
                  else SampleResult([]))
        if spans:
            result.prompt_logprobs = prompt_logprobs(logits, spans, len(samplers))
        return result
