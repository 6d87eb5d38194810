"""Scheduler with a fake model: admission, budgets, chunking, preemption, token stops. No torch."""

import subprocess
import sys

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.block_manager import BlockManager
from cbgen.engine.outputs import FinishReason, TokenLogprobs
from cbgen.engine.request import Request, RequestStatus
from cbgen.engine.scheduler import Scheduler

EOS = 2


def make(max_num_seqs=4, budget=64, num_blocks=64, block_size=4, max_model_len=1000, prefix=True):
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=block_size,
                       num_kv_blocks=num_blocks, enable_prefix_caching=prefix)
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(cfg, bm, max_model_len)


def req(rid, n_prompt, start=10, **params):
    params.setdefault("max_new_tokens", 5)
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(**params), frozenset({EOS}))


def step(s, token=7):
    """schedule + a fake forward that samples ``token`` for every sampling request."""
    out = s.schedule()
    n = sum(1 for x in out.scheduled if x.samples)
    tok = token if not callable(token) else None
    sampled = [tok if tok is not None else token(x.request) for x in out.scheduled if x.samples]
    assert len(sampled) == n
    s.update(out, sampled, None)
    return out


def run(s, token=7, limit=1000):
    steps = []
    while s.has_unfinished:
        steps.append(step(s, token))
        assert len(steps) < limit, "no progress"
    assert s.bm.all_free()
    return steps


def ids(out):
    return [x.request.request_id for x in out.scheduled]


def test_scheduler_imports_without_torch():
    code = "import sys, cbgen.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fifo_admission_and_max_num_seqs():
    s = make(max_num_seqs=2)
    a, b, c = req("a", 5, max_new_tokens=2), req("b", 5, 30, max_new_tokens=3), req("c", 5, 60)
    for r in (a, b, c):
        s.add(r)
    first = step(s)
    assert ids(first) == ["a", "b"] and c.status is RequestStatus.WAITING
    second = step(s)                     # a finishes (2 tokens) during this update
    assert ids(second) == ["a", "b"] and a.is_finished
    third = step(s)
    assert sorted(ids(third)) == ["b", "c"]
    assert [x.num_tokens for x in third.scheduled if x.request is c] == [5]
    run(s)
    assert all(r.finish_reason is FinishReason.LENGTH for r in (a, b, c))


def test_token_budget_caps_each_step_and_chunks_the_rest():
    s = make(budget=32)
    a, b = req("a", 20), req("b", 20, start=100)
    s.add(a)
    s.add(b)
    out = step(s)
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 20), ("b", 12)]
    assert out.num_tokens == 32
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0, "a partial chunk samples nothing"
    out = step(s)
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 1), ("b", 8)]
    for o in run(s):
        assert o.num_tokens <= 32


def test_long_prompt_is_chunked_while_decodes_continue():
    s = make(budget=32, num_blocks=128)
    d = req("d", 3, max_new_tokens=50)
    s.add(d)
    step(s)
    long = req("long", 100, start=200, max_new_tokens=2)
    s.add(long)
    chunks = []
    while not long.prefilled:
        before = d.num_output_tokens
        out = step(s)
        assert out.num_tokens <= 32
        assert d.num_output_tokens == before + 1, "the decoder gets a token every step"
        chunks.append(next(x.num_tokens for x in out.scheduled if x.request is long))
    assert chunks == [31, 31, 31, 7] and long.num_output_tokens == 1
    run(s)


def test_long_prefill_threshold_caps_a_chunk():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_kv_blocks=64, long_prefill_token_threshold=16)
    s = Scheduler(cfg, BlockManager(64, 4), 1000)
    s.add(req("a", 40))
    assert [o.num_tokens for o in run(s)][:3] == [16, 16, 8]


def test_decodes_are_scheduled_before_prefill_chunks():
    s = make(budget=64)
    s.add(req("a", 3, max_new_tokens=10))
    step(s)
    s.add(req("b", 30, start=100))
    out = step(s)
    assert [x.num_tokens for x in out.scheduled] == [1, 30]
    run(s)


def test_preemption_takes_the_newest_and_everything_finishes():
    # 6 blocks of 4 tokens; three requests of 4 prompt + 8 new tokens need 3 blocks each at the end.
    s = make(num_blocks=6, block_size=4)
    reqs = [req(f"r{i}", 4, start=10 * i, max_new_tokens=8) for i in range(3)]
    for r in reqs:
        s.add(r)
    preempted = []
    while s.has_unfinished:
        out = step(s)
        preempted += [r.request_id for r in out.preempted]
        assert not (set(out.preempted) & {x.request for x in out.scheduled})
        for r in out.preempted:
            assert r.status is RequestStatus.WAITING and r.block_table == [] and r.num_computed_tokens == 0
            assert s.waiting[0] is r or r in s.waiting
    assert preempted and preempted[0] == "r2", "the newest running request goes first"
    assert s.num_preemptions == len(preempted)
    assert all(r.num_output_tokens == 8 and r.finish_reason is FinishReason.LENGTH for r in reqs)
    assert sum(r.num_preemptions for r in reqs) == len(preempted)
    assert s.bm.all_free()


def test_preempted_request_recomputes_prompt_and_output_then_samples():
    s = make(num_blocks=3, block_size=4, prefix=False)
    a, b = req("a", 4, max_new_tokens=6), req("b", 4, start=50, max_new_tokens=6)
    s.add(a)
    s.add(b)
    seen = []
    while s.has_unfinished:
        out = step(s, token=lambda r: 20 + r.num_output_tokens)
        seen.append([(x.request.request_id, x.start, x.num_tokens, x.samples) for x in out.scheduled])
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    # After recomputing, b's output continues where it stopped: positions are never sampled twice.
    assert b.output_token_ids == [20, 21, 22, 23, 24, 25] and a.output_token_ids == b.output_token_ids
    recompute = [e for st in seen for e in st if e[0] == "b" and e[1] == 0 and e[2] > 4]
    assert recompute, "b's recompute covers its prompt and the tokens it had generated"
    assert s.bm.all_free()


def test_lone_sequence_outgrowing_the_pool_finishes_instead_of_looping():
    s = make(num_blocks=2, block_size=4)
    r = req("a", 4, max_new_tokens=50)
    s.add(r)
    run(s, limit=100)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens <= 9
    assert s.num_kv_exhausted == 1 and s.num_preemptions == 0   # counted, for the run's summary


def test_fifo_no_overtaking_when_the_pool_is_full():
    s = make(num_blocks=4, block_size=4, max_num_seqs=4)
    big, small = req("big", 12, max_new_tokens=1), req("small", 2, start=60, max_new_tokens=1)
    holder = req("holder", 8, start=90, max_new_tokens=3)
    s.add(holder)
    step(s)                                # holder holds 3 of 4 blocks
    s.add(big)
    s.add(small)
    out = step(s)
    assert ids(out) == ["holder"], "small must not overtake big"
    run(s)


def test_token_stops_eos_stop_ids_min_new_tokens_ignore_eos_and_context():
    cases = {
        "eos": (dict(), EOS, FinishReason.STOP, 1),
        "stop_id": (dict(stop_token_ids=(7,)), 7, FinishReason.STOP, 1),
        "min_new": (dict(min_new_tokens=3), EOS, FinishReason.STOP, 3),
        "ignore_eos": (dict(ignore_eos=True), EOS, FinishReason.LENGTH, 5),
        "length": (dict(), 7, FinishReason.LENGTH, 5),
    }
    for name, (params, token, reason, n_out) in cases.items():
        s = make()
        r = req(name, 4, **params)
        s.add(r)
        run(s, token=token)
        assert (r.finish_reason, r.num_output_tokens) == (reason, n_out), name
        if reason is FinishReason.STOP:
            assert r.stop_reason == token
    s = make(max_model_len=8)
    r = req("ctx", 5, max_new_tokens=100)
    s.add(r)
    run(s)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 8


def test_finish_frees_running_and_waiting_requests_once():
    s = make(max_num_seqs=1)
    a, b = req("a", 6, max_new_tokens=50), req("b", 6, start=40)
    s.add(a)
    s.add(b)
    step(s)
    assert a.block_table and b.status is RequestStatus.WAITING
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    s.finish(a, FinishReason.STOP)       # idempotent: the first reason stays
    assert a.finish_reason is FinishReason.ABORT and b.finish_reason is FinishReason.ABORT
    assert not s.has_unfinished and s.bm.all_free()


def test_sibling_samples_wait_for_the_first_prefill_and_share_its_blocks():
    s = make(budget=64, block_size=4)
    params = SamplingParams(max_new_tokens=3, n=3)
    first = Request("x", list(range(10, 22)), params, index=0)
    sibs = [Request("x", list(range(10, 22)), params, index=i, wait_for=first) for i in (1, 2)]
    for r in (first, *sibs):
        s.add(r)
    out = step(s)
    assert [x.request for x in out.scheduled] == [first]
    out = step(s)
    assert {x.request.index for x in out.scheduled} == {0, 1, 2}
    for r in sibs:
        assert r.num_cached_tokens == 8 and r.block_table[:2] == first.block_table[:2]
    run(s)


def test_update_appends_logprobs_and_reports_sampling_requests_only():
    s = make(budget=16)
    a = Request("a", list(range(30)), SamplingParams(max_new_tokens=2, logprobs=0))
    s.add(a)
    out = s.schedule()
    assert s.update(out, [], None) == []   # partial chunk
    out = s.schedule()
    lp = TokenLogprobs(5, -0.25, 1)
    assert s.update(out, [5], [lp]) == [a]
    assert a.logprobs == [lp] and a.output_token_ids == [5]
