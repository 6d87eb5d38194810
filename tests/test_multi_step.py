"""Multi-step scheduling (EngineConfig.num_scheduler_steps): scheduler.lookahead gives a
decode-only greedy step KV slots for several steps, the runner runs them in one native call
(decode_forward.NativeDecode.steps, csrc decode_steps, each token from greedy_head.py), the
engine applies them one step at a time. The records equal those of single steps; tokens computed past a stop leave nothing
behind; only requests whose tokens the model alone fixes take it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cbgen.config import EngineConfig, SamplingParams, cache_root
from cbgen.engine import decode_forward
from cbgen.engine.engine import Engine

from test_deterministic import _llama, _prompts
from test_scheduler import make, req


@pytest.fixture(scope="module")
def loaded(sharp):
    from helpers import native_or_skip

    native_or_skip(decode_forward.load(cache_root() / "kernels"), "native decode step")
    return dataclasses.replace(sharp, model=_llama(sharp.tokenizer, torch.bfloat16))


def _run(loaded, steps: int, prompts, params, monkeypatch, **cfg):
    """Records (tokens, text, finish and stop reason) of ``prompts``, the S of every multi-step
    call, and the engine (to look at its pool)."""
    eng = Engine.from_loaded(loaded, EngineConfig(num_scheduler_steps=steps, **cfg))
    assert eng.runner.native_decode is not None
    calls = []
    real = decode_forward.NativeDecode.steps
    monkeypatch.setattr(decode_forward.NativeDecode, "steps",
                        lambda self, *a: calls.append(a[3].shape[0]) or real(self, *a))
    outs = eng.generate(prompts, params)
    monkeypatch.undo()
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs], calls, eng


def test_same_records_as_single_steps_with_stops_inside_a_burst(loaded, monkeypatch):
    prompts = _prompts(loaded.tokenizer)[:5]
    free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (13, 21, 30, 30, 30)]
    ref0, none, _ = _run(loaded, 1, prompts, free, monkeypatch, max_num_seqs=8)
    assert not none
    # Stops that land inside a burst of 8: a stop id at token 10, a stop string ending in
    # token 12's text, and EOS at token 19 (that token as the EOS id of the request's own params).
    stop_id = ref0[2][0][10]
    k = next(i for i in range(12, 30) if ref0[3][0][i] not in ref0[3][0][:i])
    text = loaded.tokenizer.decode(ref0[3][0][:k + 1])
    stop_str = text[-3:] if len(text) >= 3 else text
    params = free[:2] + [SamplingParams(max_new_tokens=30, ignore_eos=True, stop_token_ids=(stop_id,)),
                         SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop_str,)),
                         SamplingParams(max_new_tokens=30, min_new_tokens=3)]
    ref, none, _ = _run(loaded, 1, prompts, params, monkeypatch, max_num_seqs=8)
    got, calls, eng = _run(loaded, 8, prompts, params, monkeypatch, max_num_seqs=8)
    assert not none and calls and max(calls) == 8
    assert eng.runner.native_decode.greedy_head.rows_exact > 0   # tokens from the int8 proxy + exact rows
    assert got == ref
    assert ref[2][2] == "stop" and len(ref[2][0]) <= 11 and ref[3][2] == "stop"
    assert [len(r[0]) for r in ref[:2]] == [13, 21]
    assert eng.block_manager.all_free()


def test_steps_past_a_stop_leave_nothing_in_the_prefix_cache(loaded, monkeypatch):
    """A request stopped mid-burst computed KV for tokens it then dropped, in its last block. A
    later prompt that extends its text hits the cache, and gets what it gets after the same
    request ran in single steps (which never computed those tokens)."""
    prompt = _prompts(loaded.tokenizer)[6]
    first, _, _ = _run(loaded, 1, [prompt], [SamplingParams(max_new_tokens=40, ignore_eos=True)], monkeypatch)
    stop_id = first[0][0][21]
    stopped = SamplingParams(max_new_tokens=40, ignore_eos=True, stop_token_ids=(stop_id,))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = {}
    for steps in (1, 8):
        eng = Engine.from_loaded(loaded, EngineConfig(num_scheduler_steps=steps))
        out = eng.generate([prompt], [stopped])[0]
        assert out.finish_reason == "stop" and len(out.token_ids) < 40
        longer = prompt + list(out.token_ids) + prompt[:5]
        hits = eng.block_manager.prefix_hits
        got[steps] = eng.generate([longer], [params])[0].token_ids
        assert eng.block_manager.prefix_hits - hits >= 16   # whole blocks of the stopped request's text
    assert got[8] == got[1]


def test_sampling_and_logprobs_requests_step_one_at_a_time(loaded, monkeypatch):
    prompts = _prompts(loaded.tokenizer)[:3]
    for p in (SamplingParams(max_new_tokens=12, temperature=0.8, seed=1),
              SamplingParams(max_new_tokens=12, logprobs=2),
              SamplingParams(max_new_tokens=12, repetition_penalty=1.3)):
        _, calls, _ = _run(loaded, 8, prompts, [p] * 3, monkeypatch)
        assert not calls


def test_timings_per_step_count_every_step_of_a_call(loaded):
    """--dry-run's probe and `cbgen bench`'s decode figure divide by the steps a call ran."""
    from cbgen.bench.engine_runs import decode_throughput
    from cbgen.frontends.probe import timed_step

    eng = Engine.from_loaded(loaded, EngineConfig(num_scheduler_steps=8))
    eng.add_request("a", _prompts(loaded.tokenizer)[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
    eng.step()                                     # the prefill
    before = eng.num_steps
    sample, outputs = timed_step(eng)
    assert eng.num_steps - before == 8 and len(outputs[0].new_token_ids) == 8
    assert sample.num_decode == 1 and sample.num_prefill_tokens == 0
    res = decode_throughput(lambda: Engine.from_loaded(loaded, EngineConfig(num_scheduler_steps=8)),
                            _prompts(loaded.tokenizer), 1, 3)
    assert res["steps"] == 24 and res["tok_s"] > 0


# ---- scheduler.lookahead, no torch ----------------------------------------------------

def _decoding(s, *reqs):
    """``reqs`` admitted, prefilled and given one token: the next schedule is decode-only."""
    for r in reqs:
        s.add(r)
    out = s.schedule()
    s.update(out, [7] * sum(x.samples for x in out.scheduled), None)
    return s.schedule()


def test_lookahead_caps_at_the_remaining_tokens_and_allocates_their_slots():
    s = make(block_size=4)
    a, b = req("a", 6, max_new_tokens=5), req("b", 3, max_new_tokens=20)
    out = _decoding(s, a, b)
    s.lookahead(out, 8)
    assert out.num_steps == 4                       # a has 4 tokens left
    for r in (a, b):                                # slots for every step's token
        assert len(r.block_table) * 4 >= r.num_computed_tokens + 4


def test_lookahead_caps_at_the_context_length():
    s = make(max_model_len=9)
    a = req("a", 6, max_new_tokens=50)
    out = _decoding(s, a)                            # 7 tokens: 2 more fit the context
    s.lookahead(out, 8)
    assert out.num_steps == 2


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(logprobs=1), dict(repetition_penalty=1.2),
                                    dict(min_new_tokens=3)])
def test_lookahead_refuses_requests_whose_tokens_depend_on_more_than_the_model(params):
    s = make()
    out = _decoding(s, req("a", 5, max_new_tokens=20), req("b", 5, max_new_tokens=20, **params))
    s.lookahead(out, 8)
    assert out.num_steps == 1


def test_lookahead_waits_for_nobody_who_could_join_but_for_a_full_pool_or_batch():
    s = make(max_num_seqs=4)
    out = _decoding(s, req("a", 5, max_new_tokens=20))
    s.add(req("late", 5))                           # a free sequence slot: it joins next step
    s.lookahead(out, 8)
    assert out.num_steps == 1
    s = make(max_num_seqs=1)
    out = _decoding(s, req("a", 5, max_new_tokens=20))
    s.add(req("late", 5))                           # no slot until "a" finishes anyway
    s.lookahead(out, 8)
    assert out.num_steps == 8


def test_lookahead_needs_free_blocks_for_every_step():
    s = make(num_blocks=3, block_size=4)
    a = req("a", 6, max_new_tokens=20)
    out = _decoding(s, a)                            # 7 tokens in 2 blocks; 1 block free
    s.lookahead(out, 8)                              # 8 more slots need 2 more blocks
    assert out.num_steps == 1 and len(a.block_table) == 2
    s.lookahead(out, 4)                              # 4 more fit the free block
    assert out.num_steps == 4 and len(a.block_table) == 3


def test_lookahead_leaves_prefill_steps_alone():
    s = make()
    a = req("a", 5, max_new_tokens=20)
    s.add(a)
    out = s.schedule()
    s.lookahead(out, 8)
    assert out.num_steps == 1


def test_num_scheduler_steps_is_validated():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineConfig(num_scheduler_steps=0)
