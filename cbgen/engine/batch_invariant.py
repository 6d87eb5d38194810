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

# Rows per GEMM tile, by dtype. Chosen where a tile costs about what its share of
# a 64-row GEMM costs (so 64 sequences pay ~nothing; 1 sequence pays a tile's
# worth): AMD EPYC, 2 threads, F.linear [M, 576] x [576, 1536]:
#   float32:  M=1 0.14 ms, M=4 0.35, M=16 0.49, M=64 2.07 (= 4 x 0.52): tile 16;
#   bfloat16: M=1 0.14 ms, M=4 0.49, M=16 1.98, M=64 7.49 (= 16 x 0.47): tile 4
#   (no native bf16 on that CPU: oneDNN's bf16 GEMM is compute-bound from M = 4).
ROW_TILES = {torch.float32: 16, torch.bfloat16: 4, torch.float16: 4}


def row_tile_for(dtype: torch.dtype) -> int:
    """The GEMM row tile for ``dtype`` (``ROW_TILES``; 16 for any other)."""
    return ROW_TILES.get(dtype, 16)


def tiled(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, row_tile: int) -> torch.Tensor:
    """``linear(x)`` computed on tiles of exactly ``row_tile`` rows.

    x: [T, K] (any float dtype); ``linear`` maps [row_tile, K] -> [row_tile, N].
    Returns [T, N]. Rows past T in the last tile are zeros and are dropped. Each
    tile is its own call, so the GEMM library sees the shape [row_tile, K] for
    every row of every step (see source 1 above).
    """
    T = x.shape[0]
    pad = -T % row_tile
    x = x.contiguous()
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    if T + pad == row_tile:
        return linear(x)[:T]
    return torch.cat([linear(x[i:i + row_tile]) for i in range(0, T + pad, row_tile)])[:T]
