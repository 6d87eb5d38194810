"""Constrained decoding in the engine on the tiny random llama: masks for greedy and
random rows, a matcher per sample, preemption, EOS / stop / length endings, and
free rows unchanged by constrained neighbours."""

from __future__ import annotations

import json
import re

import pytest
from helpers import run_to_end as run

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.outputs import FinishReason
from cbgen.engine.structured_params import StructuredOutputsParams as S

WORDS = r"(yes|no|maybe)( (yes|no|maybe)){0,6}"
LABELS = ["capital", "weather", "poem"]
SCHEMA = {"type": "object", "properties": {"topic": {"enum": LABELS}, "score": {"type": "integer"}},
          "required": ["topic", "score"], "additionalProperties": False}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "Write a short poem about the sea.", "Numbers: 0 1 2 3", "Hi", "Berlin",
         "The weather today is sunny with a light breeze.", "Translate this sentence into French, please."]


@pytest.fixture(scope="module")
def tok(sharp):
    return sharp.tokenizer


def engine(loaded, **cfg) -> Engine:
    return Engine.from_loaded(loaded, EngineConfig(**cfg))


def watch_matchers(eng: Engine) -> list[int]:
    """After every update, assert the invariant: each matcher has consumed exactly its
    request's output tokens (running, waiting and preempted alike). Returns a step counter."""
    steps = [0]
    update = eng.scheduler.update

    def checked(out, sampled, logprobs):
        changed = update(out, sampled, logprobs)
        for r in [*eng.scheduler.running, *eng.scheduler.waiting, *changed]:
            if r.matcher is not None:
                assert r.matcher.num_consumed == r.num_output_tokens, r.request_id
        steps[0] += 1
        return changed

    eng.scheduler.update = checked
    return steps


def jobs_mixed(tok, n_tokens=24):
    ps = [tok.encode(t) for t in TEXTS]
    g = SamplingParams(max_new_tokens=n_tokens)
    r = SamplingParams(max_new_tokens=n_tokens, temperature=1.0, top_k=50, seed=5)
    return [
        ("re-greedy", ps[0], g, S("regex", WORDS)),
        ("re-random", ps[1], r, S("regex", WORDS)),
        ("choice", ps[2], g, S.choice(LABELS)),
        ("choice-n3", ps[3], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1), S.choice(LABELS)),
        ("json", ps[4], SamplingParams(max_new_tokens=40, repetition_penalty=1.2), S.json_schema(SCHEMA)),
        ("lark", ps[5], r, S("grammar", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/')),
    ]


def check_mixed(finals, tok):
    for (rid, _), o in finals.items():
        assert o.structured_complete is (o.finish_reason is FinishReason.STOP), (rid, o.text)
    assert re.fullmatch(WORDS, finals[("re-greedy", 0)].text) or finals[("re-greedy", 0)].finish_reason is \
        FinishReason.LENGTH
    for i in range(3):
        c = finals[("choice-n3", i)]
        assert c.text in LABELS and c.finish_reason is FinishReason.STOP
        # A done grammar ends the request at once: no EOS step after the label.
        assert c.token_ids == tok.encode(c.text)
    assert finals[("choice", 0)].text in LABELS
    j = finals[("json", 0)]
    if j.structured_complete:
        v = json.loads(j.text)
        assert v["topic"] in LABELS and isinstance(v["score"], int)
    else:
        assert j.finish_reason is FinishReason.LENGTH and j.text.startswith('{"topic": "')
    lark = finals[("lark", 0)]
    assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", lark.text) or lark.finish_reason is FinishReason.LENGTH


def test_constrained_rows_greedy_random_n_and_penalties(sharp, tok):
    eng = engine(sharp, max_num_seqs=8)
    steps = watch_matchers(eng)
    finals = run(eng, jobs_mixed(tok))
    check_mixed(finals, tok)
    assert steps[0] > 0
    # Masks were filled on the worker (one fill per step with a constrained row).
    t = eng.runner.mask_worker.times
    assert 0 < t.steps <= steps[0] and t.rows >= t.steps
    assert eng.grammars.num_compiles == 4   # regex and choice each serve two requests (choice: 4 matchers)


def test_preemption_rebuilds_the_exact_matcher_state(sharp, tok):
    """Preemption keeps output tokens and recomputes only KV: the matcher, which has
    consumed those tokens, needs no rollback, and greedy outputs do not change."""
    ps = [tok.encode(t) for t in TEXTS]
    jobs = [(f"r{i}", p, SamplingParams(max_new_tokens=30), S("regex", WORDS if i % 2 else r"[a-z ]{10,60}"))
            for i, p in enumerate(ps)]
    big = engine(sharp, max_num_seqs=8)
    want = run(big, jobs)
    assert big.stats().num_preemptions == 0
    small = engine(sharp, max_num_seqs=8, num_kv_blocks=10)
    watch_matchers(small)
    got = run(small, jobs)
    assert small.stats().num_preemptions > 0
    for key, o in want.items():
        assert got[key].token_ids == o.token_ids and got[key].structured_complete == o.structured_complete, key


def test_free_rows_are_token_identical_with_constrained_rows_in_the_batch(sharp, tok):
    ps = [tok.encode(t) for t in TEXTS]
    free = [(f"f{i}", p, SamplingParams(max_new_tokens=20, **({"temperature": 0.9, "seed": i} if i % 2 else {})),
             None) for i, p in enumerate(ps[:4])]
    alone = run(engine(sharp, max_num_seqs=16), free)
    mixed = run(engine(sharp, max_num_seqs=16), free + jobs_mixed(tok))
    for key, o in alone.items():
        assert mixed[key].token_ids == o.token_ids, key
        assert mixed[key].structured_complete is None


def test_length_cut_and_stop_string_cut_are_incomplete(sharp, tok):
    p = tok.encode(TEXTS[0])
    finals = run(engine(sharp), [
        ("len", p, SamplingParams(max_new_tokens=3), S("regex", r"[a-z]{40}")),
        ("stop", p, SamplingParams(max_new_tokens=40, stop=('"score"',)), S.json_schema(SCHEMA)),
        ("min", p, SamplingParams(max_new_tokens=20, min_new_tokens=20), S.choice(["poem"])),
    ])
    assert finals[("len", 0)].finish_reason is FinishReason.LENGTH
    assert finals[("len", 0)].structured_complete is False
    s = finals[("stop", 0)]
    assert s.finish_reason is FinishReason.STOP and s.stop_reason == '"score"' and s.structured_complete is False
    # A finished grammar wins over min_new_tokens: nothing else could be generated.
    m = finals[("min", 0)]
    assert m.text == "poem" and m.finish_reason is FinishReason.STOP and m.structured_complete is True


def test_eos_is_only_sampled_where_the_grammar_accepts(sharp, tok):
    """A regex that may end after any 'ab' pair: EOS (or more pairs) only at even lengths."""
    p = tok.encode(TEXTS[1])
    eos = tok.eos_token_id
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=0)
    finals = run(engine(sharp), [(f"r{i}", p, params.replace(seed=i), S("regex", "(ab)*")) for i in range(6)])
    for o in finals.values():
        assert re.fullmatch("(ab)*", o.text) or o.finish_reason is FinishReason.LENGTH
        if o.finish_reason is FinishReason.STOP:
            assert o.token_ids[-1] == eos and o.structured_complete
    assert any(o.finish_reason is FinishReason.STOP for o in finals.values())


def test_bad_spec_is_refused_at_add_request(sharp, tok):
    eng = engine(sharp)
    with pytest.raises(ValueError, match="field 'regex': invalid regex"):
        eng.add_request("x", tok.encode("hi"), SamplingParams(), structured=S("regex", "(", field="regex"))
    assert not eng.has_unfinished
