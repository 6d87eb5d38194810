"""Structured output without a model: input fields, CLI defaults, the compile cache,
library errors, the sampler's bitmask step, and what records say."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import build_tiny_tokenizer

from cbgen.config import SamplingParams
from cbgen.engine.outputs import FinishReason, RequestMetrics, RequestOutput
from cbgen.engine.request import Request
from cbgen.engine.sampler import GrammarMasks, sample
from cbgen.engine.structured import GrammarCache, one_line
from cbgen.engine.structured_params import StructuredOutputsParams as S
from cbgen.frontends.structured_summary import incomplete_warning
from cbgen.io.records import InputError, LineParser, parse_line
from cbgen.io.structured_fields import from_options
from cbgen.io.writer import JsonlWriter, OpenAIWriter, result_from_outputs

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
RF = {"type": "json_schema", "json_schema": {"name": "lab", "schema": SCHEMA, "strict": True}}
D = SamplingParams()


@pytest.fixture(scope="module")
def grammars():
    tok = build_tiny_tokenizer()
    return GrammarCache(tok, len(tok), (tok.eos_token_id,))


# ---- input fields ---------------------------------------------------------------

def test_every_constraint_field_per_line():
    rec = parse_line(json.dumps({"prompt": "x", "response_format": RF}), 1, D)
    assert rec.structured == S.json_schema(SCHEMA, "lab") and rec.structured.is_json
    assert rec.structured.field == "response_format.json_schema.schema"
    rec = parse_line(json.dumps({"prompt": "x", "response_format": {"type": "json_object"}}), 1, D)
    assert rec.structured.kind == "json_object"
    assert parse_line(json.dumps({"prompt": "x", "regex": r"\d+"}), 1, D).structured == S("regex", r"\d+")
    assert json.loads(parse_line(json.dumps({"prompt": "x", "choice": ["yes", "no"]}), 1, D).structured.spec) == \
        ["yes", "no"]
    g = parse_line(json.dumps({"prompt": "x", "grammar": 'start: "a"'}), 1, D).structured
    assert (g.kind, g.spec) == ("grammar", 'start: "a"')
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": RF}
    rec = parse_line(json.dumps({"custom_id": "c", "body": body}), 1, D)
    assert rec.structured.kind == "json_schema" and rec.structured.field == "body.response_format.json_schema.schema"


def test_line_constraint_replaces_the_default_and_text_turns_it_off():
    default = S("regex", "[a-z]+")
    p = LineParser(D, structured=default)
    assert p("plain text line", 1).structured == default
    assert p(json.dumps({"prompt": "x"}), 2).structured == default
    assert p(json.dumps({"prompt": "x", "choice": ["a"]}), 3).structured.kind == "choice"
    assert p(json.dumps({"prompt": "x", "response_format": {"type": "text"}}), 4).structured is None


def test_same_schema_with_other_spacing_is_the_same_spec():
    a = parse_line('{"prompt": "x", "response_format": ' + json.dumps(RF) + "}", 1, D).structured
    b = parse_line('{"prompt":"x","response_format":' + json.dumps(RF, indent=3).replace("\n", "") + "}", 2, D)
    assert a == b.structured and hash(a) == hash(b.structured)


@pytest.mark.parametrize("obj, field, words", [
    ({"response_format": "json"}, "response_format", "expected an object with 'type'"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "got \"xml\""),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "expected an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "response_format.json_schema.schema", "missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema", "expected a JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", "true or false"),
    ({"regex": 5}, "regex", "expected a non-empty string"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"choice": ["a", 1]}, "choice", "non-empty list"),
    ({"grammar": ""}, "grammar", "non-empty string"),
    ({"regex": "a", "choice": ["a"]}, "choice", "conflicts with 'regex'"),
])
def test_bad_constraint_shapes_are_error_records(obj, field, words):
    e = parse_line(json.dumps({"id": "r", "prompt": "x", **obj}), 7, D)
    assert isinstance(e, InputError) and e.field == field and e.id == "r"
    assert e.message.startswith(f"line 7: field '{field}': ") and words in e.message, e.message


def test_cli_defaults(tmp_path):
    assert from_options(json_mode=True).kind == "json_object"
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SCHEMA))
    assert from_options(json_schema=str(f)) == S.json_schema(SCHEMA)
    f.write_text(json.dumps(RF))   # a whole response_format works too
    assert from_options(json_schema=str(f)) == S.json_schema(SCHEMA)
    assert json.loads(from_options(choice="pos, neg,neutral").spec) == ["pos", "neg", "neutral"]
    assert from_options(regex="a+").spec == "a+"
    g = tmp_path / "g.lark"
    g.write_text('start: "x"')
    assert from_options(grammar=str(g)).spec == 'start: "x"'
    assert from_options() is None
    with pytest.raises(ValueError, match="--json and --regex cannot be combined"):
        from_options(json_mode=True, regex="a")
    f.write_text("{nope")
    with pytest.raises(ValueError, match="--json-schema .*invalid JSON"):
        from_options(json_schema=str(f))
    with pytest.raises(ValueError, match="--grammar .*cannot read"):
        from_options(grammar=str(tmp_path / "missing.lark"))
    # An empty value (a shell variable that was empty) is an error, never "no constraint".
    for kw, why in (("choice", "--choice '': expected a comma-separated list"), ("regex", "--regex '': expected"),
                    ("json_schema", "--json-schema '': expected a file"), ("grammar", "--grammar '': expected")):
        with pytest.raises(ValueError, match=re.escape(why)):
            from_options(**{kw: ""})


# ---- compiling --------------------------------------------------------------------

def test_ten_thousand_lines_sharing_a_schema_compile_it_once(grammars):
    before = grammars.num_compiles
    parser = LineParser(D)
    for i in range(10_000):
        rec = parser(json.dumps({"id": f"r{i}", "prompt": "x", "response_format": RF}), i + 1)
        matcher = grammars.compile(rec.structured).new_matcher()
    assert grammars.num_compiles == before + 1
    assert matcher.num_consumed == 0 and not matcher.is_stopped
    grammars.compile(S.json_schema({**SCHEMA, "required": []}))
    assert grammars.num_compiles == before + 2


@pytest.mark.parametrize("spec, words", [
    (S.json_schema({"type": "foo"}), "field 'response_format': invalid JSON schema: "),
    (S("regex", "[a-", field="regex"), "field 'regex': invalid regex: "),
    (S("grammar", "start: missing_rule", field="grammar"), "field 'grammar': invalid grammar: "),
])
def test_library_rejections_name_the_field_on_one_line(grammars, spec, words):
    with pytest.raises(ValueError) as ei:
        grammars.compile(spec)
    msg = str(ei.value)
    assert msg.startswith(words) and "\n" not in msg and len(msg) > len(words) + 5, msg


def test_one_line_drops_source_excerpts():
    msg = 'at 1(8): invalid regex "[a-": regex parse error:\n    [a-\n    ^\nerror: unclosed class\n   1 | start: /[a-/\n'
    assert one_line(msg) == 'at 1(8): invalid regex "[a-": regex parse error: [a- error: unclosed class'


def test_matcher_allows_eos_only_where_the_grammar_accepts(grammars):
    tok = grammars.hf_tokenizer
    m = grammars.compile(S("regex", "ab")).new_matcher()
    eos = tok.eos_token_id
    assert not m.raw.validate_tokens([eos])     # nothing matched yet: EOS refused
    for t in tok.encode("ab"):
        assert m.accept(t)
    assert m.is_accepting and m.is_stopped and m.num_consumed == len(tok.encode("ab"))


# ---- sampler ------------------------------------------------------------------------

def _bitmask(allowed: list[list[int]], V: int) -> torch.Tensor:
    bits = torch.zeros((len(allowed), -(-V // 32) * 32), dtype=torch.int64)
    for r, ids in enumerate(allowed):
        bits[r, ids] = 1
    words = (bits.view(len(allowed), -1, 32) << torch.arange(32)).sum(-1)
    return words.to(torch.int64).apply_(lambda w: w - (1 << 32) if w >= 1 << 31 else w).to(torch.int32)


def test_sampler_applies_masks_before_greedy_random_and_penalties():
    V = 70
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    logits[:, 5] = 50.0                           # the unconstrained favourite
    ps = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=3),
          SamplingParams(repetition_penalty=1.3), SamplingParams()]
    reqs = [Request(str(i), [1, 2], p) for i, p in enumerate(ps)]
    allowed = [[3, 64], [10, 11, 12], [2, 69], None]
    masks = GrammarMasks([0, 1, 2], _bitmask(allowed[:3], V))
    for _ in range(20):
        out = sample(logits.clone(), reqs, masks=masks).token_ids
        for r in range(3):
            assert out[r] in allowed[r]
        assert out[3] == 5                        # an unconstrained row is untouched
    # The mask applies to a bf16 argmax fast path too.
    calls = []
    out = sample(logits.clone().bfloat16(), [reqs[0], reqs[3]],
                 lambda x: calls.append(1) or x.float().argmax(-1),
                 GrammarMasks([0], _bitmask([allowed[0]], V))).token_ids
    assert calls and out[0] in allowed[0] and out[1] == 5


# ---- records ------------------------------------------------------------------------

def _out(text: str, reason: FinishReason, complete: bool, index: int = 0, n: int = 1) -> RequestOutput:
    m = RequestMetrics(0.0, 0.0, 0.1, 0.2, 3, 0, 4)
    return RequestOutput("r", index, [], "", text, [1, 2, 3, 4], True, reason, m, num_samples=n,
                         structured_complete=complete)


def test_record_has_parsed_only_for_a_complete_json_output():
    rec = parse_line(json.dumps({"id": "r", "prompt": "x", "response_format": RF}), 1, D)
    good = result_from_outputs(rec, [_out('{"label": "a"}', FinishReason.STOP, True)]).to_dict()
    assert good["structured"] == {"type": "json_schema", "name": "lab", "complete": True}
    assert good["parsed"] == {"label": "a"}
    cut = result_from_outputs(rec, [_out('{"label": "', FinishReason.LENGTH, False)]).to_dict()
    assert cut["finish_reason"] == "length" and cut["structured"]["complete"] is False and cut["parsed"] is None
    # A complete-looking JSON text the engine did not call complete (e.g. cut by a stop string) is not parsed.
    stop_cut = result_from_outputs(rec, [_out('{"label": "a"}', FinishReason.STOP, False)]).to_dict()
    assert stop_cut["parsed"] is None
    two = result_from_outputs(rec, [_out('{"label": "b"}', FinishReason.STOP, True, 1, 2),
                                    _out('{"label": "', FinishReason.LENGTH, False, 0, 2)]).to_dict()
    assert [c["parsed"] for c in two["choices"]] == [None, {"label": "b"}]
    assert two["parsed"] is None
    chat = parse_line(json.dumps({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                             "response_format": RF}}), 1, D)
    openai_line = json.loads(OpenAIWriter(None).format(result_from_outputs(
        chat, [_out('{"label": "a"}', FinishReason.STOP, True)])))
    assert openai_line["response"]["body"]["choices"][0]["message"]["content"] == '{"label": "a"}'


def test_regex_records_have_no_parsed_and_free_records_no_structured():
    rec = parse_line(json.dumps({"prompt": "x", "regex": "a+"}), 1, D)
    d = result_from_outputs(rec, [_out("aaa", FinishReason.STOP, True)]).to_dict()
    assert d["structured"] == {"type": "regex", "complete": True} and "parsed" not in d
    free = parse_line(json.dumps({"prompt": "x"}), 1, D)
    d = json.loads(JsonlWriter(None).format(result_from_outputs(free, [_out("hi", FinishReason.STOP, False)])))
    assert "structured" not in d and "parsed" not in d


def test_incomplete_warning_is_one_line():
    w = incomplete_warning([f"r{i}" for i in range(8)])
    assert "\n" not in w and w.startswith("warning: 8 constrained outputs are incomplete") and "3 more" in w


def test_every_row_constrained_with_a_precomputed_mask():
    from cbgen.engine.sampler import blocked_tokens
    V = 40
    bitmask = _bitmask([[1, 33], [39]], V)
    blocked = blocked_tokens(bitmask, V)
    assert blocked.shape == (2, V) and (~blocked).nonzero().tolist() == [[0, 1], [0, 33], [1, 39]]
    logits = torch.randn(2, V)
    reqs = [Request("a", [1], SamplingParams()), Request("b", [1], SamplingParams(temperature=2.0, seed=1))]
    out = sample(logits, reqs, masks=GrammarMasks([0, 1], bitmask, blocked)).token_ids
    assert out[0] in (1, 33) and out[1] == 39
    assert torch.isinf(logits[1, :39]).all()   # masked in place


def test_bitmask_worker_fills_the_same_masks_inline_and_overlapped(grammars):
    from cbgen.engine.structured import BitmaskWorker
    tok = grammars.hf_tokenizer
    words = -(-grammars.vocab_size // 32)
    ms = [grammars.compile(S("regex", "(ab|cd)+")).new_matcher() for _ in range(3)]
    for t in tok.encode("ab"):
        ms[1].accept(t)
    bufs = {}
    for inline in (False, True):
        w = BitmaskWorker(inline=inline)
        buf = torch.zeros((3, words), dtype=torch.int32)
        seen = []
        w.submit(ms, buf.data_ptr(), words * 4, 3, then=lambda: seen.append(1)).result()
        w.close()
        assert seen == [1] and w.times.steps == 1 and w.times.rows == 3
        bufs[inline] = buf
    assert torch.equal(bufs[True], bufs[False]) and bufs[True].any(dim=1).all()
    assert torch.equal(bufs[True][0], bufs[True][2]) and not torch.equal(bufs[True][0], bufs[True][1])
