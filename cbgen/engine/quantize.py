"""Weight-only int8 (``--quantize int8``) and which projections take the native few-row GEMM.

int8: every projection of a native forward (q/k/v, o, gate/up, down and the LM head; not
the embedding, not the norms) becomes int8 with one float32 scale per output channel,
symmetric round-to-nearest: ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in
[-127, 127] (the scheme of torch's ``_weight_int8pack_mm`` and of LLM.int8()'s
row-wise absmax, Dettmers et al. 2022, arXiv:2208.07339). Activations stay in the model
dtype. The quality cost is measured in benchmarks/RESULTS.md (greedy agreement with the
unquantized model on the dev prompts, perplexity on a fixed text).

A GGUF that is already quantized (Q8_0, Q4_x) is first de-quantized into the cache by the
conversion (cbgen/models/gguf.py) and re-quantized here: its per-32-element blocks do not
map onto one scale per channel, which is what the kernel reads, and the cached float
checkpoint is also what every other dtype loads from.

``--quantize auto`` (``choose_auto``) picks int8 where it wins: the native int8 kernel is
there, and the projection weights are larger than the CPU's last-level cache, so a decode step
waits on streaming them from memory and halving (bf16) or quartering (float32) their bytes is
what speeds it up. Everywhere else it picks none: the de-quantized copy would run the same
GEMMs, for the quality cost alone.

Contract: ``quantize_int8(w)`` -> (q, scale). ``apply(model, quantize, kernel)`` quantizes
(if asked) and routes each projection's calls: the native kernel (linear_rows.py) where it
wins, torch otherwise. Raises ValueError for a model without native projections.
``choose_auto(model, device, cache_dir, deterministic)`` -> ("int8" | "none", why).
"""

from __future__ import annotations

from pathlib import Path

import torch

# int8 projections on a float32 model use the kernel up to this many rows; above it torch's
# float32 GEMM on the de-quantized copy is as fast (benchmarks/NOTES.md, change 15).
INT8_FP32_ROWS_MAX = 32
# bf16 projections on CPUs where oneDNN packs bf16 (AVX-512 bf16) take the kernel up to this many
# rows, so that decode steps that small run in one native call (decode_forward.py). There the
# kernel's vdpbf16ps path matches oneDNN's packed GEMM per call up to ~8 rows and the one-call step
# also drops the Python forward's per-op cost; from ~12 rows on oneDNN's step is the faster
# (benchmarks/NOTES.md, change 17). Calls with more rows keep oneDNN.
PACKED_BF16_ROWS_MAX = 8
QUANTIZE_CHOICES = ("none", "int8")   # what apply takes; --quantize also takes "auto" (choose_auto)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)   # model dtypes whose activations the kernel reads


def quantize_int8(w: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> q [N, K] int8 (contiguous), scale [N] float32, with w ~ q * scale[:, None].
    An all-zero row gets scale 1 (and q 0). Works ``chunk_rows`` rows at a time, so the float32
    temporaries stay small for a large LM head."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scale = torch.empty(N, dtype=torch.float32)
    for r in range(0, N, chunk_rows):
        rows = w[r:r + chunk_rows].float()
        s = rows.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[r:r + chunk_rows] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r:r + chunk_rows] = s
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale[:, None] in ``dtype`` ([N, K])."""
    return (q.float() * scale[:, None]).to(dtype)


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs, cpu0); 0 where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


def choose_auto(model, device: torch.device, cache_dir: Path, deterministic: bool = False) -> tuple[str, str]:
    """What ``--quantize auto`` picks for a loaded native forward (``projections()``): "int8" where
    the native int8 GEMM loads here (it compiles into ``cache_dir`` on first use) and the projection
    weights exceed the last-level cache, else "none"; and the reason, in words, for the load status.
    ``deterministic``: the engine will run batch-invariant steps. Its GEMMs then take the kernel only
    where it takes every row count (bf16 where oneDNN cannot pack bf16; ``apply``), and elsewhere
    run oneDNN on fixed row tiles of the de-quantized copy, where int8 would cost quality for
    nothing, so auto picks none there."""
    from . import linear_rows
    from .llama import ALL_ROWS, _can_pack
    if device.type != "cpu":
        return "none", "the int8 GEMM runs on CPU only"
    projections = model.projections()
    dtype = projections[0].w.dtype
    if dtype not in KERNEL_DTYPES:
        return "none", f"the int8 GEMM reads float32 or bf16 activations, not {str(dtype).removeprefix('torch.')}"
    if deterministic and rows_max_for(dtype, True, _can_pack(dtype, device)) < ALL_ROWS:
        return "none", ("with --deterministic the int8 weights would run oneDNN's GEMM on their "
                        "de-quantized copy here (on fixed row tiles), no faster than without")
    if linear_rows.load(cache_dir) is None:
        return "none", "the native int8 GEMM is unavailable here (switched off, or no C compiler)"
    weights = sum(p.w.numel() * p.w.element_size() for p in projections)
    cache = last_level_cache_bytes()
    if weights <= cache:
        return "none", (f"the {weights / 1e6:.0f} MB of projection weights fit in the {cache / 1e6:.0f} MB "
                        "CPU cache, so decode does not wait on memory")
    return "int8", (f"decode streams {weights / 1e6:.0f} MB of projection weights from memory a step"
                    + (f", more than the {cache / 1e6:.0f} MB CPU cache" if cache else ""))


def rows_max_for(dtype: torch.dtype, int8: bool, packable: bool) -> int:
    """The most rows a call of a projection with ``dtype`` weights (int8 ones: ``int8``) takes
    through the few-row kernel; ``packable``: oneDNN can pre-pack bf16 here. The routes are
    ``apply``'s; ``llama.kernel_takes`` applies the result to each call."""
    from .llama import ALL_ROWS
    if dtype not in KERNEL_DTYPES:   # e.g. float16: the kernel reads float32 or bf16 activations only
        return 0
    if dtype == torch.bfloat16:   # int8 too: above the threshold oneDNN on the de-quantized copy beats the kernel
        return PACKED_BF16_ROWS_MAX if packable else ALL_ROWS
    return INT8_FP32_ROWS_MAX if int8 else 0


def apply(model, quantize: str, kernel, packable: bool) -> None:
    """Quantize ``model``'s projections (``quantize`` "int8") and give each its GEMM route.

    model: a native forward with ``projections()`` (llama.LlamaForward, gemma3.Gemma3Forward).
    kernel: a linear_rows.LinearRows or None. packable: oneDNN can pre-pack bf16 here.
    Routes: bf16 and int8-on-bf16 where oneDNN cannot pack bf16 take the kernel at every row
    count (torch's bf16 GEMM there is slower at every size we measured); where it can, up to
    PACKED_BF16_ROWS_MAX rows (oneDNN's packed GEMM above, on the de-quantized copy for int8);
    int8 on float32 up to INT8_FP32_ROWS_MAX rows; float32 weights never (their parity with
    transformers is the fidelity check). The row counts: ``rows_max_for``.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize {quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    projections = getattr(model, "projections", None)
    if projections is None:
        if quantize == "int8":
            raise ValueError(f"--quantize int8 needs cbgen's native forward; {type(model).__name__} has none")
        return
    for p in projections():
        if quantize == "int8" and p.q is None:
            p.q, p.scale = quantize_int8(p.w)
            p.w = dequantize(p.q, p.scale, p.w.dtype)
        rows_max = rows_max_for(p.w.dtype, p.q is not None, packable)
        p.use_rows(kernel if rows_max else None, rows_max)
