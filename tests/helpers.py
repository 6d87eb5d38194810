"""Helpers shared by the engine, sampler and fidelity tests."""

from __future__ import annotations

import copy

import torch


def sharpen(model, std: float = 0.2, seed: int = 0):
    """A copy with larger random weights: the conftest tiny model (0.02 init, tied
    embeddings) just repeats its last token, which makes a weak oracle."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF generate, one prompt at a time, exactly ``n`` greedy tokens, in sdpa
    (the model's current attention implementation is restored afterwards)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
    finally:
        model.set_attn_implementation(prev)
    return out[0, len(prompt):].tolist()


def skip_without_native_kernel(attention: str) -> None:
    """The native attention kernel needs a C compiler; without one, 'native' tests skip."""
    from cbgen.config import cache_root
    from cbgen.engine import paged_kernel

    if attention == "native":
        native_or_skip(paged_kernel.load(cache_root() / "kernels"), "native attention kernel")


def native_or_skip(obj, what: str):
    """``obj`` (a loaded native part), or skip the test: without a C compiler it cannot be built."""
    import pytest

    if obj is None:
        pytest.skip(f"no C compiler: the {what} cannot be built here")
    return obj


def drain(eng) -> dict:
    """Step ``eng`` until nothing is unfinished: {(request_id, index): final RequestOutput};
    checks every KV block came back."""
    finals = {}
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                finals[(o.request_id, o.index)] = o
    assert eng.block_manager.all_free()
    return finals


def run_to_end(eng, jobs) -> dict:
    """Add ``jobs`` ((request id, prompt ids, params, structured spec or None)) to the engine
    ``eng`` and step it to the end; the final output of every sample by (id, index)."""
    for rid, ids, params, spec in jobs:
        eng.add_request(rid, ids, params, structured=spec)
    return drain(eng)
