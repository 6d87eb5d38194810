"""Batch-invariant execution (``EngineConfig.deterministic``): a token's logits depend
only on its own sequence, never on what else shares the step.

Sources of variance in the default path, each measured on this project's CPUs
(tests/test_deterministic.py flips each one on its own):

1. **GEMM row count.** MKL / oneDNN pick a kernel by the shape: on an AMD EPYC
   (AVX2) float32 ``F.linear`` at M <= 3 rows takes a GEMV-like path whose
   rounding differs from M >= 4 in every row, and at M = 5 with 2 threads one
   row in five differs again (the M split between threads). So a decode step of
   1 sequence and of 64 give different hidden states for the same token.
   Fix: ``tiled`` runs every projection (and the LM head) on fixed tiles of
   ``row_tile`` rows, the last one zero-padded: the library sees one shape
   whatever the batch, so it makes one choice of kernel and of thread split.
   A projection that goes through cbgen's own few-row GEMM at every row count
   (csrc/linear_rows.c: bf16 and int8 on bf16 where oneDNN cannot pack bf16) needs no
   tiles: each output element there is one fixed FMA chain, whatever M.
   What this still assumes, and the tests check per dtype, thread count and
   projection shape: inside a tile a row's result does not depend on its
   position or on the other rows (true of every GEMM micro-kernel we know: the
   K reduction order is per output element).
2. **Prefill vs decode attention.** A prefill chunk ran one SDPA (blocked
   online softmax over the chunk's keys); a decode ran the C kernel (one pass
   per sequence and KV head). The same token's K/V and logits then differed by
   whether it was prefilled or decoded, where chunked prefill cut the prompt,
   whether a prefix-cache hit skipped part of it, and after a preemption (the
   recompute prefills what was decoded). Fix: the runner gives every token of
   the step, prefill or decode, its own row in the C kernel (csrc/paged_decode.c)
   with its own context length: one reduction order for every token.
3. **Thread count.** The C kernels reduce each (sequence, head) or row on one
   thread (threads only split work items), and the tiled GEMMs were checked
   equal at 1..3 threads. Row-wise torch ops (RMSNorm in float32, softmax,
   elementwise activations) reduce along a row on one thread.
4. **Sampling.** Greedy is an argmax of the row (exact). Seeded sampling draws
   its noise from a generator seeded by (seed, sample index, output position)
   (sampler.py), so it never depended on the batch; unseeded sampling is random
   by definition and stays so.

Not covered: the transformers module path and the one-sequence fallback (their
``nn.Linear`` calls are not tiled); the engine refuses ``deterministic`` there.
Outputs are reproducible on one machine for one (model, dtype, row tile); another
CPU picks other kernels, so bits can differ across machines, as in every engine.
"""

from __future__ import annotations

from typing import Callable

import torch

# Rows per GEMM tile, by dtype, and how the tiles run. Measured on an AMD EPYC (AVX2, no
# native bf16), 2 threads, the embedded 135M model, a decode step with the flag off vs on
# (benchmarks/deterministic.py has the whole-process figures):
#   float32, tiles of 16 in one bmm: 1 seq 111 -> 222 ms, 16 seqs 223 -> 234, 64 seqs 461 -> 479
#     (tiles of 8: 64 seqs 602 ms; of 32: 1 seq 236, 16 seqs 334; 4 separate calls of 16
#     rows instead of one bmm: 64 seqs 781 ms, since each call streams the weights again);
#   bfloat16, tiles of 4, one call each: 1 seq 36 -> 98 ms, 16 seqs 359 -> 415, 64 seqs
#     1026 -> 1076 (oneDNN's bf16 GEMM is compute-bound from 4 rows on this CPU, so 16
#     calls of 4 rows cost what one call of 64 does; as one bmm: 1181 ms; tiles of 1: 1242).
ROW_TILES = {torch.float32: 16, torch.bfloat16: 4, torch.float16: 4}
BMM_DTYPES = (torch.float32,)


def row_tile_for(dtype: torch.dtype) -> int:
    """The GEMM row tile for ``dtype`` (``ROW_TILES``; 16 for any other)."""
    return ROW_TILES.get(dtype, 16)


def tiled(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, row_tile: int,
          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` computed on tiles of exactly ``row_tile`` rows.

    x: [T, K] (any float dtype); ``linear`` maps [row_tile, K] -> [row_tile, N]. Returns
    [T, N]. Rows past T in the last tile are zeros and are dropped. Every tile is one GEMM
    of shape [row_tile, K] x [K, N] (see source 1 above): with ``weight`` ([N, K], the
    plain ``F.linear(x, weight, bias)``) in a ``BMM_DTYPES`` dtype, all tiles go in one
    ``torch.bmm`` over the weight broadcast to each tile (stride 0, no copy), which streams
    the weights once per step (float32, 64 rows: the LM head took 123 ms as one bmm of 4
    tiles, 185 ms as 4 calls, 86 ms as one plain GEMM); otherwise (bf16, or a pre-packed
    oneDNN weight) one call per tile.
    """
    T = x.shape[0]
    pad = -T % row_tile
    x = x.contiguous()
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    nt = (T + pad) // row_tile
    if weight is not None and weight.dtype in BMM_DTYPES:
        y = torch.bmm(x.view(nt, row_tile, -1), weight.t().unsqueeze(0).expand(nt, -1, -1)).view(T + pad, -1)
        y = y[:T]
        return y if bias is None else y + bias
    if nt == 1:
        return linear(x)[:T]
    return torch.cat([linear(x[i:i + row_tile]) for i in range(0, T + pad, row_tile)])[:T]
