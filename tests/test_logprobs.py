"""Logprobs through the engine on the tiny model: top-k against the model's own
distribution, n samples, stop strings, prompt logprobs under chunked prefill and
the prefix cache, and that rows which did not ask cost nothing."""

from __future__ import annotations

import pytest
import torch

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine import runner as runner_mod
from cbgen.engine import sampler as sampler_mod
from cbgen.engine.detokenizer import Detokenizer
from cbgen.engine.engine import Engine
from cbgen.engine.request import Request
from cbgen.engine.token_bytes import TokenBytes
from helpers import drain

PROMPT = "Paris is the capital of France. Berlin is the capital of Germany. Rome is"


def run(loaded, requests, **cfg):
    """requests: (id, prompt ids, params) -> ({(id, index): final output}, engine)."""
    eng = Engine.from_loaded(loaded, EngineConfig(**cfg))
    for rid, p, sp in requests:
        eng.add_request(rid, p, sp)
    return drain(eng), eng


def reference(loaded, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids`` (HF forward, sdpa)."""
    model = loaded.model
    prev = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    finally:
        model.set_attn_implementation(prev)


def check_against(lsm: torch.Tensor, entries, k: int) -> None:
    """Each entry (PositionLogprobs) against the reference row that predicted its token."""
    assert len(entries) == lsm.shape[0]
    for row, e in zip(lsm, entries):
        c = e.chosen
        assert c.logprob == pytest.approx(row[c.token_id].item(), abs=1e-4) and c.logprob <= 0
        assert c.rank == int((row > row[c.token_id] + 1e-5).sum()) + 1
        top_v, top_i = row.topk(k)
        assert [t.token_id for t in e.top] == top_i.tolist()
        assert torch.allclose(torch.tensor([t.logprob for t in e.top]), top_v, atol=1e-4)


def test_top_logprobs_are_the_models_distribution_in_a_mixed_batch(sharp):
    tok = sharp.tokenizer
    p = tok.encode(PROMPT)
    outs, _ = run(sharp, [
        ("plain", p, SamplingParams(max_new_tokens=6, ignore_eos=True)),
        ("greedy", p, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5)),
        # Warped (temperature, top-k, penalty) but reported under the raw distribution.
        ("sampled", tok.encode("The sea is"), SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3,
                                                               temperature=1.3, top_k=5, seed=4,
                                                               repetition_penalty=1.5)),
    ], enable_prefix_caching=False)
    assert outs[("plain", 0)].logprobs is None
    g = outs[("greedy", 0)]
    check_against(reference(sharp, p + g.token_ids)[len(p) - 1:-1], g.logprobs, 5)
    assert all(e.chosen.rank == 1 and e.top[0].token_id == e.chosen.token_id for e in g.logprobs)
    assert g.token_ids == outs[("plain", 0)].token_ids, "asking for logprobs does not change the tokens"
    s = outs[("sampled", 0)]
    sp = tok.encode("The sea is")
    check_against(reference(sharp, sp + s.token_ids)[len(sp) - 1:-1], s.logprobs, 3)


def test_every_sample_of_n_keeps_its_own_logprobs(sharp):
    p = sharp.tokenizer.encode(PROMPT)
    sp = SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=9, ignore_eos=True, logprobs=2)
    outs, _ = run(sharp, [("n", p, sp)])
    assert len({tuple(outs[("n", i)].token_ids) for i in range(3)}) > 1
    for i in range(3):
        o = outs[("n", i)]
        assert [e.chosen.token_id for e in o.logprobs] == o.token_ids
        check_against(reference(sharp, p + o.token_ids)[len(p) - 1:-1], o.logprobs, 2)


@pytest.mark.parametrize("include", [False, True])
def test_entries_match_the_text_kept_after_a_stop_string(sharp, include):
    tok = sharp.tokenizer
    p = tok.encode(PROMPT)
    base, _ = run(sharp, [("b", p, SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0))])
    full = base[("b", 0)]
    assert b"".join(e.chosen.bytes for e in full.logprobs).decode("utf-8", "replace") == full.text
    # A stop string starting inside the text of the 5th token.
    start = full.logprobs[4].text_offset + 1
    stop = full.text[start:start + 3]
    assert len(stop) == 3 and full.text.find(stop) == start, "pick a stop string that first occurs there"
    outs, _ = run(sharp, [("s", p, SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0, stop=[stop],
                                                   include_stop_str_in_output=include))])
    o = outs[("s", 0)]
    assert o.text == full.text[:start + (3 if include else 0)]
    kept = o.logprobs
    assert [e.chosen.token_id for e in kept] == full.token_ids[:len(kept)]
    assert [e.text_offset for e in kept] == [e.text_offset for e in full.logprobs[:len(kept)]]
    # Every entry has text in the output, and together they cover it (the 5th straddles the cut).
    assert len(kept) >= 5 and all(e.text_offset < len(o.text) for e in kept)
    joined = b"".join(e.chosen.bytes for e in kept).decode("utf-8", "replace")
    assert joined.startswith(o.text) and len(joined) - len(o.text) < len(kept[-1].chosen.token)


def test_a_trailing_eos_has_no_entry_and_partial_characters_keep_their_bytes(tiny_loaded):
    tok = tiny_loaded.tokenizer
    tb = TokenBytes(tok)
    assert tb.byte_level
    text = "héllo — 🙂 world"
    ids = tok.encode(text)
    assert b"".join(tb.bytes_of(i) for i in ids) == text.encode("utf-8")
    partial = [i for i in ids if tb.bytes_of(i) and tb.bytes_of(i).decode("utf-8", "replace") != tb.text_of(i)]
    assert partial, "the tiny BPE splits the emoji into byte tokens"
    assert all("\\x" in tb.text_of(i) for i in partial)
    assert tb.text_of(tok.eos_token_id) == "<|im_end|>"
    d = Detokenizer(tok)
    for i in [*ids, tok.eos_token_id]:
        d.add([i])
    d.finish_text()
    assert d.text == text
    assert d.num_tokens_in(len(d.text)) == len(ids), "the EOS adds no text, so no entry"
    assert d.offsets[0] == 0 and d.offsets == sorted(d.offsets)


def test_prompt_logprobs_with_chunked_prefill_and_a_warm_prefix_cache(sharp):
    tok = sharp.tokenizer
    p = tok.encode(PROMPT + " the capital of Italy. Madrid is the capital of Spain.")
    assert len(p) > 32   # at least three chunks
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=16, block_size=4)   # prefill in 16-token chunks
    eng = Engine.from_loaded(sharp, EngineConfig(**cfg))
    eng.add_request("warm", p, SamplingParams(max_new_tokens=2))
    drain(eng)
    eng.add_request("lp", p, SamplingParams(max_new_tokens=3, prompt_logprobs=2, n=2, temperature=1.0, seed=1))
    outs = drain(eng)
    o = outs[("lp", 0)]
    assert o.metrics.num_cached_tokens == 0, "the cached prefix would have skipped the positions to report"
    assert outs[("lp", 1)].prompt_logprobs is None and outs[("lp", 1)].metrics.num_cached_tokens > 0
    assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
    assert [e.chosen.token_id for e in o.prompt_logprobs[1:]] == p[1:]
    check_against(reference(sharp, p)[:-1], o.prompt_logprobs[1:], 2)
    assert all(e.text_offset is None for e in o.prompt_logprobs[1:])
    # Others still hit the cache.
    eng.add_request("after", p, SamplingParams(max_new_tokens=2))
    assert drain(eng)[("after", 0)].metrics.num_cached_tokens > 0


def test_prompt_logprobs_survive_a_preemption_without_duplicates(sharp):
    tok = sharp.tokenizer
    p = tok.encode(PROMPT)
    others = [(f"o{i}", tok.encode(f"The sea is wide {i}"), SamplingParams(max_new_tokens=40, ignore_eos=True))
              for i in range(3)]
    # A pool too small for all: the newest (the logprobs request) is preempted and recomputed.
    outs, eng = run(sharp, [*others, ("lp", p, SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                               prompt_logprobs=1, logprobs=1))],
                    max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_kv_blocks=24)
    assert eng.scheduler.num_preemptions > 0
    o = outs[("lp", 0)]
    assert len(o.prompt_logprobs) == len(p) and len(o.logprobs) == 30
    check_against(reference(sharp, p)[:-1], o.prompt_logprobs[1:], 1)
    check_against(reference(sharp, p + o.token_ids)[len(p) - 1:-1], o.logprobs, 1)


def test_rows_that_did_not_ask_add_no_logprob_work(sharp, monkeypatch):
    seen = []
    real = sampler_mod.token_logprobs
    monkeypatch.setattr(sampler_mod, "token_logprobs", lambda x, *a: seen.append(x.shape) or real(x, *a))
    called = []
    monkeypatch.setattr(runner_mod, "prompt_logprobs", lambda *a: called.append(1) or [])
    V = 50
    logits = torch.randn(8, V)
    reqs = [Request(str(i), [1, 2], SamplingParams(logprobs=5 if i == 3 else None)) for i in range(8)]
    res = sampler_mod.sample(logits, reqs)
    assert seen == [(1, V)], "only the asking row is copied and log-softmaxed"
    assert [e is None for e in res.logprobs] == [i != 3 for i in range(8)]
    seen.clear()
    assert sampler_mod.sample(logits, [Request("a", [1], SamplingParams())] * 4).logprobs is None
    assert seen == []
    p = sharp.tokenizer.encode(PROMPT)
    run(sharp, [(str(i), p, SamplingParams(max_new_tokens=3)) for i in range(4)])
    assert seen == [] and called == [], "no logprob work in steps where nobody asked"


def test_sentencepiece_style_tokens_map_spaces_and_byte_fallback():
    """Llama 2 / Mistral vocabularies: ``▁`` is a space, ``<0xNN>`` one raw byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w"]:
        vocab.setdefault(t, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o"), ("▁", "w")]
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = tok.encode("hello wörld", add_special_tokens=False)
    tb = TokenBytes(tok)
    assert not tb.byte_level
    assert [tb.bytes_of(i) for i in ids] == [b" hello", b" w", b"\xc3", b"\xb6", b"r", b"l", b"d"]
    assert [tb.text_of(i) for i in ids][2:4] == ["\\xc3", "\\xb6"]
    assert tb.text_of(tok.eos_token_id) == "</s>"
