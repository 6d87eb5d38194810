"""The engine on a tiny random llama: continuous batching, no recompute, chunked prefill,
preemption, prefix cache, abort, token/text stops, input validation, greedy fidelity vs HF.

The shared ``tiny_loaded`` model (random init, tied embeddings) mostly repeats its last
input token, so its greedy output barely depends on attention. The fidelity checks
below therefore use ``sharp``: the same architecture and tokenizer with larger random
weights, whose greedy output depends on the whole context.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from helpers import hf_greedy, skip_without_native_kernel
import torch

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.outputs import FinishReason

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Continuous batching lets a server keep its accelerator busy: new requests join the running batch",
    "Numbers: 0 1 2 3",
    "Write a short poem about the sea.",
    "What is the capital of Spain? Madrid is the capital of Spain, and it is known for its museums.",
    "Hi",
    "Please summarise the following text in one sentence.",
    "The weather today is sunny with a light breeze, and the temperature will reach twenty degrees.",
    "Berlin",
    "Each step the scheduler decides which sequences to run, how many prompt tokens to prefill, and which",
    "Translate this sentence into French, please.",
    "A journey of a thousand miles begins with a single step.",
    "so memory is allocated on demand and shared between requests that start with the same prefix.",
    "Rome is the capital of Italy. Berlin is the capital of Germany.",
    "Punctuation: , . ; : ! ?",
]


@pytest.fixture(scope="module")
def tok(tiny_loaded):
    return tiny_loaded.tokenizer


def engine(loaded, **cfg) -> Engine:
    return Engine.from_loaded(loaded, EngineConfig(**cfg))


def greedy(n: int, **kw) -> SamplingParams:
    """Exactly ``n`` greedy tokens (EOS suppressed, as HF's min_new_tokens does)."""
    return SamplingParams(max_new_tokens=n, min_new_tokens=n, **kw)


def spy(eng: Engine) -> list[dict[str, int]]:
    """Records, per executed step, {request_id: tokens forwarded}."""
    log: list[dict[str, int]] = []
    execute = eng.runner.execute

    def wrapped(out):
        log.append({f"{s.request.request_id}/{s.request.index}": s.num_tokens for s in out.scheduled})
        return execute(out)

    eng.runner.execute = wrapped
    return log


class Run:
    """Steps an engine, keeping every output: streamed text, tokens and final outputs per sequence."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.finals: dict[tuple[str, int], object] = {}
        self.streamed: dict[tuple[str, int], str] = defaultdict(str)
        self.tokens: dict[tuple[str, int], list[int]] = defaultdict(list)

    def step(self):
        outs = self.eng.step()
        for o in outs:
            key = (o.request_id, o.index)
            assert key not in self.finals, "nothing is reported after finished"
            self.streamed[key] += o.text_delta
            self.tokens[key] += o.new_token_ids
            assert self.tokens[key] == o.token_ids
            if o.finished:
                self.finals[key] = o
        return outs

    def drain(self, limit: int = 5000):
        """Step to the end; checks streamed deltas add up and the pool is fully free."""
        for _ in range(limit):
            if not self.eng.has_unfinished:
                break
            self.step()
        assert not self.eng.has_unfinished
        for key, o in self.finals.items():
            assert self.streamed[key] == o.text, key
        assert self.eng.block_manager.all_free()
        return self.finals


def drain(eng: Engine):
    return Run(eng).drain()


def prompts(tok, k=16):
    return [tok.encode(t) for t in TEXTS[:k]]


# ---- continuous batching -----------------------------------------------------

def test_request_added_while_others_decode_joins_at_the_next_step(sharp, tok):
    eng = engine(sharp, max_num_seqs=8)
    log = spy(eng)
    ps = prompts(tok, 4)
    run = Run(eng)
    for i in range(3):
        eng.add_request(f"r{i}", ps[i], greedy(20))
    for _ in range(5):
        run.step()
    forwarded = eng.runner.num_forward_tokens
    eng.add_request("new", ps[3], greedy(5))
    outs = run.step()
    assert log[-1] == {"r0/0": 1, "r1/0": 1, "r2/0": 1, "new/0": len(ps[3])}
    # The running requests forward exactly one token each: nothing of theirs is recomputed.
    assert eng.runner.num_forward_tokens - forwarded == 3 + len(ps[3])
    assert {o.request_id for o in outs} == {"r0", "r1", "r2", "new"} and not any(o.finished for o in outs)
    assert eng.stats().num_running == 4
    run.drain()


def test_no_forward_recomputes_a_cached_token(sharp, tok):
    eng = engine(sharp, max_num_seqs=6)
    ps = prompts(tok)
    system = tok.encode(TEXTS[2] + " " + TEXTS[10])   # > 2 full blocks, shared by half the requests
    run = Run(eng)
    sent = 0
    for wave in range(4):
        for i in range(4):
            p = (system + ps[sent % 16]) if sent % 2 else ps[sent % 16]
            eng.add_request(f"q{sent}", p, greedy(4 + 3 * i))
            sent += 1
        if wave == 1:   # n samples: the siblings reuse the first sample's prompt blocks
            eng.add_request("multi", system + ps[0], SamplingParams(n=3, max_new_tokens=6, temperature=1.0,
                                                                    seed=5, ignore_eos=True))
        for _ in range(3):
            run.step()
    finals = run.drain()
    assert len(finals) == 16 + 3
    assert eng.stats().num_preemptions == 0
    m = [o.metrics for o in finals.values()]
    assert sum(x.num_cached_tokens for x in m) > 0
    expected = sum(x.num_prompt_tokens - x.num_cached_tokens + x.num_generated_tokens - 1 for x in m)
    assert eng.runner.num_forward_tokens == expected


def test_chunked_prefill_of_a_long_prompt_while_decodes_continue(sharp, tok):
    budget = 256
    eng = engine(sharp, max_num_batched_tokens=budget, max_num_seqs=8)
    log = spy(eng)
    ps = prompts(tok, 3)
    run = Run(eng)
    for i, p in enumerate(ps):
        eng.add_request(f"d{i}", p, greedy(30))
    run.step()
    run.step()
    rng = random.Random(0)
    long = [rng.randrange(3, len(tok)) for _ in range(1000)]
    eng.add_request("long", long, greedy(4))
    prefill_steps = 0
    while eng.has_unfinished:
        outs = run.step()
        step = log[-1]
        assert sum(step.values()) <= budget
        if "long/0" in step and step["long/0"] > 1:
            prefill_steps += 1
            got = {o.request_id for o in outs if len(o.new_token_ids) == 1}
            assert {"d0", "d1", "d2"} <= got, "every running decoder gets a token in a prefill step"
            assert all(step[f"d{i}/0"] == 1 for i in range(3))
    assert prefill_steps >= 4
    finals = run.drain()
    # Chunking does not change the result.
    assert finals[("long", 0)].token_ids == hf_greedy(sharp.model, long, 4)
    for i, p in enumerate(ps):
        assert finals[(f"d{i}", 0)].token_ids == hf_greedy(sharp.model, p, 30)


def test_preemption_under_a_tiny_kv_pool_gives_the_same_outputs(sharp, tok):
    ps = prompts(tok, 8)
    params = [greedy(40) for _ in range(6)] + [
        SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.8, seed=11),
        SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=1.0, top_k=20, seed=12)]

    def run(**cfg):
        eng = engine(sharp, max_num_seqs=8, **cfg)
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(str(i), p, sp)
        finals = drain(eng)
        return [finals[(str(i), 0)] for i in range(len(ps))], eng.stats()

    big, big_stats = run()
    assert big_stats.num_preemptions == 0
    # A tiny pool; then also tiny chunks, so that some requests are preempted mid-prefill.
    for cfg in (dict(num_kv_blocks=10), dict(num_kv_blocks=10, max_num_batched_tokens=16)):
        small, small_stats = run(**cfg)
        assert small_stats.num_preemptions > 0, cfg
        assert sum(o.metrics.num_preemptions for o in small) == small_stats.num_preemptions
        for a, b in zip(big, small):
            assert a.token_ids == b.token_ids and a.text == b.text, cfg
            assert b.finish_reason is FinishReason.LENGTH and len(b.token_ids) == 40


def test_prefix_cache_hits_are_counted_and_outputs_unchanged(sharp, tok):
    system = tok.encode("You are a helpful assistant. " + TEXTS[2] + " " + TEXTS[13])
    assert len(system) >= 48
    users = prompts(tok, 5)

    def run(prefix: bool):
        eng = engine(sharp, enable_prefix_caching=prefix)
        eng.add_request("first", system + users[0], greedy(6))
        drain(eng)
        for i, u in enumerate(users[1:]):
            eng.add_request(f"u{i}", system + u, greedy(6))
        eng.add_request("again", system + users[0], greedy(6))   # the whole prompt seen before
        return drain(eng), eng.stats()

    cached, cstats = run(True)
    plain, pstats = run(False)
    full = len(system) // 16 * 16
    for key, o in cached.items():
        assert o.metrics.num_cached_tokens >= full, key
        assert o.metrics.num_cached_tokens < o.metrics.num_prompt_tokens
        assert o.token_ids == plain[key].token_ids
        assert plain[key].metrics.num_cached_tokens == 0
    assert cstats.prefix_hit_rate > 0 and pstats.prefix_hit_rate == 0
    assert cstats.num_forward_tokens < pstats.num_forward_tokens


def test_cache_hit_leaving_one_or_few_tokens_matches_hf(sharp, tok):
    # 33 tokens: a repeat hits 32 and computes 1 token (the decode path, with a cached context);
    # 40 tokens: a repeat computes an 8-token chunk after a cached prefix.
    base = tok.encode(" ".join(TEXTS))
    eng = engine(sharp)
    for n in (33, 40):
        p = base[:n]
        first = eng.generate([p], greedy(6))[0]
        again = eng.generate([p], greedy(6))[0]
        assert again.metrics.num_cached_tokens == 32
        assert first.token_ids == again.token_ids == hf_greedy(sharp.model, p, 6), n
    assert eng.block_manager.all_free()


# ---- abort --------------------------------------------------------------------

def test_abort_running_and_waiting_requests_frees_their_blocks(sharp, tok):
    eng = engine(sharp, max_num_seqs=2)
    ps = prompts(tok, 4)
    for i in range(3):
        eng.add_request(f"r{i}", ps[i], greedy(30))
    eng.add_request("multi", ps[3], SamplingParams(max_new_tokens=30, min_new_tokens=30, n=2, temperature=1.0))
    run = Run(eng)
    for _ in range(3):
        run.step()
    assert eng.stats().num_waiting == 3
    assert eng.abort("r0") and eng.abort("r2") and eng.abort("multi")
    outs = run.step()
    aborted = {(o.request_id, o.index): o for o in outs if o.finish_reason is FinishReason.ABORT}
    assert set(aborted) == {("r0", 0), ("r2", 0), ("multi", 0), ("multi", 1)}
    assert all(o.finished for o in aborted.values())
    assert len(aborted[("r0", 0)].token_ids) == 3 and aborted[("r2", 0)].token_ids == []
    assert not eng.abort("r0") and not eng.abort("nope")
    finals = run.drain()
    assert set(finals) == {("r0", 0), ("r1", 0), ("r2", 0), ("multi", 0), ("multi", 1)}
    assert finals[("r1", 0)].finish_reason is FinishReason.LENGTH and len(finals[("r1", 0)].token_ids) == 30
    assert eng.block_manager.all_free()


# ---- stops --------------------------------------------------------------------

def test_token_stops_eos_stop_ids_min_new_ignore_eos_and_length(sharp, tok):
    p = tok.encode(TEXTS[4])
    base = engine(sharp).generate([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    j = next(i for i in range(2, 12) if base[i] not in base[:i])
    stop_tok = base[j]

    eng = Engine(sharp.model, tok, EngineConfig(), max_model_len=2048, eos_token_ids=(stop_tok,))
    o = eng.generate([p], SamplingParams(max_new_tokens=12))[0]
    assert (o.token_ids, o.finish_reason, o.stop_reason) == (base[:j + 1], FinishReason.STOP, stop_tok)
    o = eng.generate([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert (o.token_ids, o.finish_reason) == (base, FinishReason.LENGTH)
    o = eng.generate([p], SamplingParams(max_new_tokens=12, min_new_tokens=j + 2))[0]
    assert len(o.token_ids) >= j + 2 and stop_tok not in o.token_ids[:j + 1]
    assert o.token_ids[:j] == base[:j]
    assert eng.block_manager.all_free()

    eng = engine(sharp)
    o = eng.generate([p], SamplingParams(max_new_tokens=12, min_new_tokens=12, stop_token_ids=[stop_tok]))[0]
    assert len(o.token_ids) == 12, "stop ids are suppressed below min_new_tokens too"
    o = eng.generate([p], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_tok], ignore_eos=True))[0]
    assert (o.token_ids, o.finish_reason, o.stop_reason) == (base[:j + 1], FinishReason.STOP, stop_tok)
    o = eng.generate([p], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert (o.token_ids, o.finish_reason) == (base[:5], FinishReason.LENGTH)


def test_stop_string_across_token_boundary(sharp, tok):
    p = tok.encode(TEXTS[0])
    n = 24
    base = engine(sharp).generate([p], greedy(n))[0]
    text = base.text
    assert text == tok.decode(base.token_ids).removesuffix("\ufffd")
    # A stop string made of the end of token k and the start of token k+1.
    for k in range(2, n - 2):
        left, right = tok.decode(base.token_ids[:k + 1]), tok.decode(base.token_ids[k + 1:k + 2])
        if len(left) < 2 or len(right) < 2 or "\ufffd" in left + right:
            continue
        stop = left[-2:] + right[:2]
        at = len(left) - 2
        if text.find(stop) == at and text.startswith(left + right):
            break
    else:
        pytest.fail("no token boundary to test in the greedy output")

    for include in (False, True):
        eng = engine(sharp)
        # EOS suppressed as in ``base`` through token k + 1, which completes the stop string.
        eng.add_request("s", p, SamplingParams(max_new_tokens=n, min_new_tokens=k + 2, stop=[stop, "never-there"],
                                               include_stop_str_in_output=include))
        streamed = ""
        while eng.has_unfinished:
            for o in eng.step():
                streamed += o.text_delta
                if not o.finished:
                    assert len(streamed) <= at, "no part of the stop string is streamed"
        assert o.finish_reason is FinishReason.STOP and o.stop_reason == stop
        assert o.token_ids == base.token_ids[:k + 2]
        assert o.text == streamed == (text[:at + len(stop)] if include else text[:at])
        assert eng.block_manager.all_free()

    # Below min_new_tokens a stop string does not end the output (vLLM's min_tokens), as EOS
    # and stop ids do not.
    o = engine(sharp).generate([p], greedy(n, stop=[stop]))[0]
    assert len(o.token_ids) > k + 2 and o.token_ids[:k + 2] == base.token_ids[:k + 2]


# ---- validation ---------------------------------------------------------------

def test_add_request_rejects_invalid_input(sharp):
    eng = engine(sharp, max_model_len=64, num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"prompt: is empty"):
        eng.add_request("a", [])
    with pytest.raises(ValueError, match=r"prompt: 64 tokens .*context length of 64"):
        eng.add_request("a", [5] * 64)
    with pytest.raises(ValueError, match=r"prompt_token_ids: 600 is outside the vocabulary \[0, 600\)"):
        eng.add_request("a", [5, 600])
    with pytest.raises(ValueError, match=r"params: expected SamplingParams"):
        eng.add_request("a", [5], {"temperature": 1.0})
    eng.add_request("a", [5] * 63, SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match=r"request_id: 'a' is already running"):
        eng.add_request("a", [5])
    small = engine(sharp, num_kv_blocks=2, block_size=16)
    with pytest.raises(ValueError, match=r"prompt: 40 tokens leave no room to generate in the KV cache of 32"):
        small.add_request("a", [5] * 40)
    finals = drain(eng)
    assert finals[("a", 0)].finish_reason is FinishReason.LENGTH
    assert len(finals[("a", 0)].token_ids) == 1, "the context length caps the output"


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("n", 0)])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}={value} is invalid: expected .*\d"):
        SamplingParams(**{field: value})


# ---- fidelity -----------------------------------------------------------------

@pytest.mark.parametrize("attention", ["native", "torch"])
def test_greedy_matches_hf_generate_with_requests_joining_and_leaving(sharp, tok, attention):
    skip_without_native_kernel(attention)
    ps = prompts(tok, 16)
    lens = [8 + (5 * i) % 17 for i in range(16)]
    expected = [hf_greedy(sharp.model, p, n) for p, n in zip(ps, lens)]
    eng = engine(sharp, max_num_seqs=4, attention=attention)
    assert (eng.runner.kernel is not None) == (attention == "native")
    log = spy(eng)
    outs = eng.generate(ps, [greedy(n) for n in lens])
    assert eng.block_manager.all_free()
    mixed = [s for s in log if 1 in s.values() and any(v > 1 for v in s.values())]
    assert mixed, "some request joined while others were decoding"
    assert max(len(s) for s in log) == 4
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.token_ids == e, f"prompt {i}"
        # a character cut short by max_new_tokens is dropped, not shown as U+FFFD
        assert o.text == tok.decode(e, skip_special_tokens=True).removesuffix("\ufffd")


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop(sharp, tok):
    """The reviewer's case: max_new_tokens=k and a stop string ending in token k gave 'length'."""
    p = tok.encode(TEXTS[0])
    base = engine(sharp).generate([p], greedy(8))[0]
    k = next((k for k in range(2, 8) if len(tok.decode(base.token_ids[k - 1:k]).strip()) >= 2), None)
    if k is None:
        pytest.skip("no token with visible text to stop on in the greedy output")
    stop = tok.decode(base.token_ids[k - 1:k]).strip()
    prefix = tok.decode(base.token_ids[:k])
    if prefix.find(stop) != len(prefix.rstrip()) - len(stop):
        pytest.skip("the stop text occurs earlier in the output")
    o = engine(sharp).generate([p], greedy(k, stop=[stop]))[0]
    assert (o.finish_reason, o.stop_reason) == (FinishReason.STOP, stop)
    assert stop not in o.text
