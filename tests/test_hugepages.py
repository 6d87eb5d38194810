"""Weights on transparent huge pages (engine/hugepages.py): the mappings are zero-filled, aligned
and advised; the runner moves a checkpoint-built forward's streamed weights there before binding
the kernel, leaves a transformers-wrapped one alone, and no result changes."""

from __future__ import annotations

import pytest
import torch

from cbgen.config import EngineConfig, ModelConfig
from cbgen.engine import hugepages
from cbgen.engine.engine import Engine
from cbgen.engine.request import SamplingParams


def _thp_eligible(addr: int) -> bool:
    """/proc/self/smaps' THPeligible flag of the mapping holding ``addr``: in THP's "madvise" mode
    it is 1 only for a mapping advised MADV_HUGEPAGE (in "always" mode for every large one)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    raise AssertionError(f"no mapping with a THPeligible line holds {addr:#x}")


needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def test_zeros_are_zero_page_aligned_and_disjoint():
    specs = [((3, 5), torch.bfloat16), ((0,), torch.float32), ((1000, 7), torch.int8), ((4097,), torch.float32)]
    ts = hugepages.zeros(specs)
    assert [(tuple(t.shape), t.dtype) for t in ts] == [(s, d) for s, d in specs]
    for t in ts:
        assert t.is_contiguous() and not t.any() and t.data_ptr() % 4096 == 0
    for i, t in enumerate(ts):   # writing one leaves the others zero
        t.fill_(1)
        assert all(not u.any() for u in ts[i + 1:])


def test_copy_tensors_equal_the_originals_and_are_independent():
    src = [torch.randn(300, 17).bfloat16(), torch.randint(-127, 128, (64, 33), dtype=torch.int8)]
    out = hugepages.copy_tensors(src)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(src, out))
    out[0].zero_()
    assert src[0].any()


@needs_thp
def test_the_mapping_is_advised_for_huge_pages():
    t = hugepages.zeros([((8 << 20,), torch.uint8)])[0]
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0 and _thp_eligible(t.data_ptr())


def _greedy(loaded) -> list:
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=4))
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [loaded.tokenizer.encode(p) for p in ("hello there", "the cat sat on", "one two three", "why")]
    return [(o.token_ids, o.logprobs) for o in eng.generate(prompts, [params] * len(prompts))], eng


@needs_thp
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_engine_moves_streamed_weights_without_changing_results(tiny_model_dir, monkeypatch, quantize):
    from cbgen.models import load_model

    cfg = ModelConfig(model=str(tiny_model_dir), dtype="bfloat16", quantize=quantize)
    with monkeypatch.context() as m:   # the reference: huge pages unavailable, nothing moved
        m.setattr(hugepages, "available", lambda: False)
        ref_loaded = load_model(cfg)
        ref, _ = _greedy(ref_loaded)
        assert not any(p.huge_pages for p in ref_loaded.model.projections())
    loaded = load_model(cfg)
    got, eng = _greedy(loaded)
    assert got == ref
    model = loaded.model
    for p in model.projections():
        read = p.w if p.q is None else p.q
        assert p.huge_pages and _thp_eligible(read.data_ptr())
        if p.rows is not None:   # the kernel was bound to the moved tensor, not the old one
            assert p.rows._keep[0].data_ptr() == read.data_ptr()
    if quantize == "none":   # the tied LM head is still the embedding: one tensor, moved once
        assert model.lm_head.w.data_ptr() == model.embed.data_ptr()
    before = [p.w.data_ptr() for p in model.projections()]
    Engine.from_loaded(loaded, EngineConfig(max_num_seqs=2))   # a second engine moves nothing again
    assert [p.w.data_ptr() for p in model.projections()] == before


def test_a_transformers_wrapped_forward_is_not_moved(sharp):
    """Its projections view the transformers model's parameters, which would stay allocated."""
    from test_deterministic import _llama
    import dataclasses

    loaded = dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16))
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=2))
    assert not eng.runner.model.owns_weights
    assert not any(p.huge_pages for p in eng.runner.model.projections())
