"""Sampling: the sampler on hand-made logits, then through the engine on the tiny model
(seeded determinism in any batch, top-k/top-p limits, penalties, n samples, logprobs)."""

from __future__ import annotations

import math

import pytest
import torch

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.request import Request
from cbgen.engine.sampler import _apply_penalties, sample
from helpers import drain

EOS = 2


def req(prompt=(10, 11, 12), output=(), index=0, **params):
    r = Request("r", list(prompt), SamplingParams(**params), frozenset({EOS}), index=index)
    r.token_ids += list(output)
    return r


# ---- the sampler alone --------------------------------------------------------

def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    reqs = [req(logprobs=0) for _ in range(6)]
    res = sample(logits.clone(), reqs)
    assert res.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).max(-1).values
    assert torch.allclose(torch.tensor([e.logprob for e in res.logprobs]), expected, atol=1e-6)
    assert all(e.logprob <= 0 and e.rank == 1 and e.top_token_ids == () for e in res.logprobs)
    assert sample(logits.clone(), [req() for _ in range(6)]).logprobs is None


def test_top_k_1_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g)
    argmax = logits.argmax(-1).tolist()
    for params in (dict(temperature=1.5, top_k=1), dict(temperature=1.5, top_p=1e-6)):
        assert sample(logits.clone(), [req(**params) for _ in range(64)]).token_ids == argmax, params


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    toks = torch.tensor(sample(logits, [req(temperature=1.0) for _ in range(4000)]).token_ids)
    freq = torch.bincount(toks, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.04), freq


def test_top_k_top_p_min_p_restrict_the_support():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().repeat(2000, 1)
    cases = {
        "top_k": (dict(top_k=2), {0, 1}),
        "top_p": (dict(top_p=0.7), {0, 1}),       # mass above token 1 is 0.5 < 0.7; above token 2 0.75
        "min_p": (dict(min_p=0.4), {0, 1}),       # threshold 0.2
        "min_p_low": (dict(min_p=0.25), {0, 1, 2}),
    }
    for name, (params, support) in cases.items():
        toks = set(sample(logits.clone(), [req(temperature=1.0, **params) for _ in range(2000)]).token_ids)
        assert toks == support, name


def test_seeded_draws_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 200, generator=g)
    seeded = req(temperature=1.0, seed=123)
    alone = sample(logits[3:4].clone(), [seeded]).token_ids[0]
    others = [req(temperature=1.0) for _ in range(8)]
    others[5] = seeded
    batch = logits.clone()
    batch[5] = logits[3]
    for _ in range(3):
        assert sample(batch.clone(), others).token_ids[5] == alone
    # Another sample index or output position draws other noise.
    draws = {sample(logits[3:4].clone(), [req(temperature=1.0, seed=123, index=i)]).token_ids[0]
             for i in range(12)}
    assert len(draws) > 1


def test_repetition_penalty_follows_hf_semantics():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5, 0.0]])
    r = req(prompt=[0, 1], repetition_penalty=2.0)
    out = logits.clone()
    _apply_penalties(out, [r])
    assert out.tolist() == [[1.0, -2.0, 1.5, 0.5, 0.0]]    # positive / p, negative * p; unseen untouched
    assert sample(logits.clone(), [r]).token_ids == [2]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    r = req(prompt=[4], output=[1, 1, 3], presence_penalty=0.5, frequency_penalty=0.25)
    _apply_penalties(logits, [r])
    assert logits.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0]]
    logits = torch.zeros(1, 5)
    _apply_penalties(logits, [req(output=[1], presence_penalty=-1.0)])
    assert logits[0, 1] == 1.0


def test_min_new_tokens_suppresses_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 1.0]])     # EOS (2) then stop id 3 are the top tokens
    below = req(output=[4], min_new_tokens=2, stop_token_ids=[3])
    assert sample(logits.clone(), [below]).token_ids == [4]
    reached = req(output=[4, 4], min_new_tokens=2, stop_token_ids=[3])
    assert sample(logits.clone(), [reached]).token_ids == [EOS]


def test_greedy_and_sampled_rows_mix_in_one_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=g)
    reqs = [req(), req(temperature=1.0, seed=1), req(repetition_penalty=1.5), req(temperature=0.5, top_k=3)]
    res = sample(logits.clone(), reqs)
    assert res.token_ids[0] == logits[0].argmax().item()
    assert res.token_ids[3] in logits[3].topk(3).indices.tolist()


# ---- through the engine ---------------------------------------------------------

def run(loaded, requests, **cfg):
    """requests: list of (id, prompt ids, params) -> {(id, index): final RequestOutput}."""
    eng = Engine.from_loaded(loaded, EngineConfig(**cfg))
    for rid, p, sp in requests:
        eng.add_request(rid, p, sp)
    return drain(eng)


def test_seeded_request_gives_the_same_tokens_whatever_else_is_in_the_batch(sharp):
    tok = sharp.tokenizer
    p = tok.encode("Write a short poem about the sea.")
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = run(sharp, [("s", p, sp)])[("s", 0)].token_ids
    others = [(f"o{i}", tok.encode(t), SamplingParams(max_new_tokens=10 + 5 * i, temperature=0.9, ignore_eos=True))
              for i, t in enumerate(["Paris", "The quick brown fox", "Hi", "Numbers: 1 2", "Rome is"])]
    crowd = run(sharp, others[:2] + [("s", p, sp)] + others[2:], max_num_seqs=3)
    assert crowd[("s", 0)].token_ids == alone
    other_seed = run(sharp, [("s", p, sp.replace(seed=43))])[("s", 0)].token_ids
    assert other_seed != alone


def test_top_k_1_and_tiny_top_p_equal_greedy_in_the_engine(sharp):
    p = sharp.tokenizer.encode("The weather today is sunny")
    common = dict(max_new_tokens=16, ignore_eos=True)
    outs = run(sharp, [("g", p, SamplingParams(**common)),
                       ("k", p, SamplingParams(temperature=1.3, top_k=1, **common)),
                       ("p", p, SamplingParams(temperature=1.3, top_p=1e-6, **common))])
    assert outs[("k", 0)].token_ids == outs[("g", 0)].token_ids == outs[("p", 0)].token_ids


def repeats(ids):
    return len(ids) - len(set(ids))


@pytest.fixture
def shared_tiny(tiny_loaded):
    """The shared tiny model, its attention implementation restored after the engine used it."""
    prev = tiny_loaded.model.config._attn_implementation
    yield tiny_loaded
    tiny_loaded.model.set_attn_implementation(prev)


def test_penalties_change_repetition_in_the_right_direction(shared_tiny, sharp):
    tiny_loaded = shared_tiny
    # The shared tiny model repeats its last token forever: penalties must break that.
    p = tiny_loaded.tokenizer.encode("The weather today is sunny with a light breeze")
    common = dict(max_new_tokens=32, min_new_tokens=32)
    outs = run(tiny_loaded, [("plain", p, SamplingParams(**common)),
                             ("rep", p, SamplingParams(repetition_penalty=3.0, **common)),
                             ("freq", p, SamplingParams(frequency_penalty=1.0, **common)),
                             ("pres", p, SamplingParams(presence_penalty=1.0, **common))])
    plain = repeats(outs[("plain", 0)].token_ids)
    assert plain >= 16
    for name in ("rep", "freq", "pres"):
        assert repeats(outs[(name, 0)].token_ids) < plain, name
    # Negative penalties reward repeats.
    outs = run(sharp, [("plain", p, SamplingParams(**common)),
                       ("freq", p, SamplingParams(frequency_penalty=-1.0, **common)),
                       ("pres", p, SamplingParams(presence_penalty=-1.0, **common))])
    plain = repeats(outs[("plain", 0)].token_ids)
    for name in ("freq", "pres"):
        assert repeats(outs[(name, 0)].token_ids) > plain, name


def test_n_samples_share_prompt_blocks_and_differ(sharp):
    tok = sharp.tokenizer
    p = tok.encode("Continuous batching lets a server keep its accelerator busy: new requests join "
                   "the running batch as soon as others finish.")
    assert len(p) > 32
    sp = SamplingParams(n=3, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    outs = run(sharp, [("n", p, sp)])
    assert set(outs) == {("n", 0), ("n", 1), ("n", 2)}
    assert outs[("n", 0)].metrics.num_cached_tokens == 0
    for i in (1, 2):
        assert outs[("n", i)].metrics.num_cached_tokens == (len(p) - 1) // 16 * 16 > 0
    toks = [tuple(outs[("n", i)].token_ids) for i in range(3)]
    assert len(set(toks)) == 3
    assert all(o.num_samples == 3 for o in outs.values())
    assert run(sharp, [("n", p, sp)])[("n", 2)].token_ids == list(toks[2]), "seeded samples repeat"


def test_logprobs_of_greedy_tokens_are_the_log_softmax_max(sharp):
    tok = sharp.tokenizer
    p = tok.encode("Paris is the capital of France.")
    o = run(sharp, [("l", p, SamplingParams(max_new_tokens=10, min_new_tokens=10, logprobs=0,
                                                                 ignore_eos=True))])[("l", 0)]
    lps = [e.chosen.logprob for e in o.logprobs]
    assert len(lps) == len(o.token_ids) == 10
    assert all(lp <= 0 for lp in lps)
    model = sharp.model
    prev = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1:-1].float()
    finally:
        model.set_attn_implementation(prev)
    lsm = logits.log_softmax(-1)
    # EOS is suppressed (min_new_tokens) for the choice, not for the reported log-probability.
    chosen = lsm.gather(1, torch.tensor(o.token_ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(lps), chosen, atol=1e-4)
    no_eos = lsm.clone()
    no_eos[:, EOS] = -math.inf
    assert torch.allclose(chosen, no_eos.max(-1).values, atol=1e-4)
    sampled = run(sharp, [("s", p, SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, logprobs=0,
                                                    ignore_eos=True))])[("s", 0)]
    assert len(sampled.logprobs) == 5 and all(e.chosen.logprob <= 0 for e in sampled.logprobs)
