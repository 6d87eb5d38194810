"""Tensors on transparent huge pages (2 MiB) where Linux offers them: the weights a decode step
streams (the KV pool stays on small pages: benchmarks/NOTES.md change 18 says why).

Why: a decode step at a few sequences reads every projection weight from DRAM once (269 MB for
the 135M model in bf16). With 4 KiB pages that is a TLB miss every 4 KiB, and the page walks
cut the streaming rate: a plain 2-thread read of 256 MiB ran at 28-29 GB/s on 4 KiB pages and
32-34 GB/s on 2 MiB ones (AMD EPYC Zen 4, benchmarks/NOTES.md change 18). Linux gives anonymous
memory huge pages only where ``madvise(MADV_HUGEPAGE)`` asks for them when THP is in its
common "madvise" mode (/sys/kernel/mm/transparent_hugepage/enabled), and torch's allocator does
not ask. So the tensors here live in one anonymous ``mmap`` per call, 2 MiB-aligned and
advised before any page is touched.

Contract: ``available()`` says whether the advice can be given here. ``zeros(specs)`` returns
zero-filled tensors for ``(shape, dtype)`` specs, in one anonymous mapping: the kernel hands out
zeroed pages, and only when first touched.
``copy_tensors(tensors)`` returns copies of the tensors in one such mapping. Both return ordinary CPU
tensors (views of the mapping, which they keep alive), on huge pages where available and on small
ones otherwise, so callers need no second path. A refused ``madvise`` is ignored (small pages, as
before). ``move_weights(model)`` moves a native forward's streamed weights.
"""

from __future__ import annotations

import mmap
import sys

import torch

HUGE_PAGE = 2 << 20   # x86-64 and arm64 (4 KiB base pages) PMD size
_ALIGN = 4096         # each tensor starts on a page: kernels' vector loads and prefetches stay aligned


def available() -> bool:
    """Linux with MADV_HUGEPAGE and THP not switched off."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _mapping(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of ``nbytes`` (>0) in a private anonymous mapping, starting on a
    2 MiB boundary and advised MADV_HUGEPAGE where that is available."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS   # private: shared anonymous memory ignores the advice
    # Whole huge pages: an advised range that holds none (or the tail past the last) stays on small ones.
    advised = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, advised + HUGE_PAGE, flags=flags)
    raw = torch.frombuffer(mm, dtype=torch.uint8)   # keeps ``mm`` alive while any view lives
    start = -raw.data_ptr() % HUGE_PAGE
    if available():
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, advised)
        except OSError:
            pass
    return raw[start:start + nbytes]


def zeros(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Zero-filled contiguous tensors, one per ``(shape, dtype)``, in one mapping; each starts on a
    4 KiB page. Pages are backed (and counted in RSS) only when touched."""
    sizes = [torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in specs]
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    if not total or not hasattr(mmap, "MAP_ANONYMOUS"):   # nothing to map, or no POSIX mmap
        return [torch.zeros(s, dtype=d) for s, d in specs]
    arena = _mapping(total)
    return [arena[o:o + n].view(d).view(s) for (s, d), o, n in zip(specs, offs, sizes)]


def copy_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU ``tensors`` in one huge-page arena (the originals are untouched)."""
    out = zeros([(tuple(t.shape), t.dtype) for t in tensors])
    for dst, src in zip(out, tensors):
        dst.copy_(src)
    return out


def move_weights(model) -> None:
    """Put what a native forward's decode steps stream on huge pages: each projection's weight
    as the GEMMs read it (the int8 ``q`` where quantized, else ``w``), and the embedding with a
    tied LM head, so it stays one tensor.

    model: llama.LlamaForward or gemma3.Gemma3Forward (``projections()``, ``embed``,
    ``lm_head``). Only a model that owns its tensors (``owns_weights``: built from checkpoint
    tensors) is moved; one over a transformers model's parameters is left as is, since those
    would stay allocated beside the copy. Idempotent per projection (shallow copies of a forward
    share them). Call it before the projections are bound to the kernel (quantize.apply): a
    bound kernel keeps the addresses it was given."""
    if not getattr(model, "owns_weights", False) or not available():
        return
    projs = [p for p in model.projections() if not p.huge_pages]
    if not projs:
        return
    head = model.lm_head
    tied = head.q is None and head.w.data_ptr() == model.embed.data_ptr()
    for p, t in zip(projs, copy_tensors([p.w if p.q is None else p.q for p in projs])):
        if p.q is None:
            p.w = t
        else:
            p.q = t
        p.huge_pages = True
    if tied:
        model.embed = head.w
