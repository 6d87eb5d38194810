"""Input parsing: every format, every bad-input class, overrides, aliases, duplicate ids."""

import json
from pathlib import Path

import pytest

from cbgen.config import SamplingParams
from cbgen.io.reader import read_records
from cbgen.io.records import InputError, InputRecord, LineParser, parse_line

D = SamplingParams(max_new_tokens=100, temperature=0.5, seed=3)
PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def p(obj, line_no=7, **kw):
    line = obj if isinstance(obj, str) else json.dumps(obj)
    return parse_line(line, line_no, D, **kw)


def test_plain_text_is_a_user_turn_and_keeps_the_line():
    r = p("  Hello, {name}!  \r\n", 3)
    assert isinstance(r, InputRecord) and r.kind == "text" and r.id == "input:3" and r.line_no == 3
    assert r.messages == [{"role": "user", "content": "  Hello, {name}!  "}] and r.prompt is None
    assert r.params is D and r.raw_format == "cbgen"


@pytest.mark.parametrize("line", ["", "\n", "   \t\r\n"])
def test_blank_lines_are_skipped(line):
    assert parse_line(line, 1, D) is None


def test_prompt_and_messages_formats():
    r = p({"prompt": "Once", "id": "a", "metadata": {"k": 1}, "answer": "x"})
    assert (r.kind, r.id, r.prompt, r.messages, r.extra) == ("prompt", "a", "Once", None, {"metadata": {"k": 1}})
    r = p({"id": 5, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                 {"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}]})
    assert r.id == "5" and r.kind == "messages" and r.is_chat
    assert r.messages[2] == {"role": "system", "content": "ab"}


def test_system_prepended_only_to_chats_without_one():
    r = p("hi", system="Be brief.")
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = p({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}, system="X")
    assert r.messages[0]["content"] == "S" and len(r.messages) == 2
    assert p({"prompt": "raw"}, system="X").prompt == "raw"


def test_openai_chat_and_completions_envelopes():
    r = p({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 9,
                    "temperature": 0, "top_p": 0.9, "stop": "END", "seed": None, "n": 2,
                    "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True, "user": "u1"}})
    assert (r.kind, r.raw_format, r.id) == ("openai", "openai", "c1")
    assert r.extra == {"url": "/v1/chat/completions", "method": "POST", "model": "m"}
    pr = r.params
    assert (pr.max_new_tokens, pr.temperature, pr.top_p, pr.stop, pr.seed, pr.n) == (9, 0, 0.9, ("END",), 3, 2)
    assert (pr.presence_penalty, pr.frequency_penalty, pr.logprobs) == (0.5, -0.5, 0)   # vLLM: 0 alternatives
    r = p({"custom_id": "c2", "url": "/v1/completions", "method": "POST",
           "body": {"prompt": "The", "max_completion_tokens": 4}})
    assert r.prompt == "The" and r.messages is None and r.params.max_new_tokens == 4


def test_per_line_overrides_and_aliases():
    r = p({"prompt": "x", "max_tokens": 12, "stop": ["a", "b"], "top_k": 5, "seed": None})
    assert (r.params.max_new_tokens, r.params.stop, r.params.top_k) == (12, ("a", "b"), 5)
    assert r.params.temperature == 0.5 and r.params.seed == 3  # untouched defaults; null = default
    assert p({"prompt": "x", "max_new_tokens": 8, "max_tokens": 8}).params.max_new_tokens == 8


@pytest.mark.parametrize("obj, field, expect", [
    ('{"prompt": "x",}', "json", "line 7: invalid JSON: "),
    ("{not json", "json", "line 7: invalid JSON"),
    ('{"a": ' + "[" * 100_000, "json", "line 7: invalid JSON"),
    ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", "json", "line 7: invalid JSON"),
    ({"temperature": 0.3}, "prompt", "line 7: field 'prompt': missing"),
    ({"prompt": 5}, "prompt", "line 7: field 'prompt': expected a string, got 5"),
    ({"prompt": "x", "messages": []}, "messages", "not both"),
    ({"messages": []}, "messages", "expected a non-empty list"),
    ({"messages": "hi"}, "messages", "got \"hi\""),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]},
     "messages[1].content", "line 7: field 'messages[1].content': expected a string or a list of text parts, got 3"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "messages[0].role", "expected one of system, user, assistant"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "text part"),
    ({"prompt": "x", "temperature": -1}, "temperature",
     "line 7: field 'temperature': expected a number in [0, 100] (0 = greedy), got -1"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "got \"hot\""),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "field 'max_tokens': expected an integer >= 1, got 0"),
    ({"prompt": "x", "max_tokens": 5, "max_new_tokens": 6}, "max_new_tokens", "conflicts with 'max_tokens'"),
    ({"prompt": "x", "max_new_tokens": 5, "min_new_tokens": 9}, "min_new_tokens", "max_new_tokens=5"),
    ({"prompt": "x", "stop": 5}, "stop", "expected a string or a list of strings, got 5"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop", "at most 16 non-empty strings"),
    ({"prompt": "x", "stop_token_ids": 2}, "stop_token_ids", "expected a list of token ids"),
    ({"prompt": "x", "n": True}, "n", "got true"),
    ({"prompt": "x", "temprature": 0.1}, "temprature", "unknown field (did you mean 'temperature'?)"),
    ({"prompt": "x", "samples": 2}, "samples", "unknown field (did you mean 'n'?)"),
    ({"prompt": "x", "max_batched_tokens": 64}, "max_batched_tokens", "(the option --max-batched-tokens)"),
    ({"prompt": "x", "deterministic": True}, "deterministic",
     "field 'deterministic': a setting of the whole run, not of one line (the option --deterministic)"),
    ({"messages": [{"role": "user", "content": "q"}], "max_num_seqs": 4}, "max_num_seqs", "--max-num-seqs"),
    ({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "q"}], "temprature": 1}},
     "body.temprature", "unknown field (did you mean 'temperature'?)"),
    ({"custom_id": "c", "deterministic": True, "body": {"messages": [{"role": "user", "content": "q"}]}},
     "deterministic", "a setting of the whole run"),
    ({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "q"}], "kv_cache_gb": 4}},
     "body.kv_cache_gb", "a setting of the whole run, not of one line (the option --kv-cache-gb)"),
    ({"prompt": "x", "id": [1]}, "id", "field 'id': expected a non-empty string or an integer"),
    ({"prompt": "x", "id": ""}, "id", "expected a non-empty string"),
    ({"prompt": "\ud800"}, "prompt", "invalid UTF-8"),
    ({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "q"}], "temperature": -2}},
     "body.temperature", "line 7: field 'body.temperature': expected a number in [0, 100]"),
    ({"custom_id": "c", "url": "/v1/embeddings", "body": {}}, "url", "expected one of /v1/chat/completions"),
    ({"custom_id": "c", "method": "GET", "body": {}}, "method", "expected \"POST\""),
    ({"custom_id": "c", "body": "x"}, "body", "expected an object"),
    ({"custom_id": "c", "body": {"prompt": "p"}}, "body.messages", "missing"),
    ({"custom_id": "c", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}}, "body.prompt", "expected a string"),
    ({"body": {"messages": []}}, "custom_id", "missing"),
])
def test_bad_input_is_an_error_naming_line_and_field(obj, field, expect):
    r = p(obj)
    assert isinstance(r, InputError), r
    assert r.field == field and r.line_no == 7 and expect in r.message and r.message.startswith("line 7: ")
    assert "\n" not in r.message and str(r) == r.message


def test_vllm_min_tokens_and_a_body_column_beside_a_prompt():
    assert p({"prompt": "x", "min_tokens": 2}).params.min_new_tokens == 2
    r = p({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "q"}], "min_tokens": 3}})
    assert r.kind == "openai" and r.params.min_new_tokens == 3
    r = p({"prompt": "The sky is", "body": "an email body column"})
    assert isinstance(r, InputRecord) and r.kind == "prompt"
    r = p({"custom_id": "c1", "prompt": "x"})
    assert isinstance(r, InputRecord) and (r.kind, r.id) == ("prompt", "c1")


def test_extra_columns_a_dataset_carries_are_ignored():
    """Only typos of sampling fields and whole-run settings are errors; other keys (a dataset's
    columns, including generic words like model or device) are ignored."""
    r = p({"prompt": "x", "model": "gpt-4", "device": "a phone", "category": "qa", "temperature": 0.5,
           "top": 3, "temperature_note": "warm", "max_tokens_hint": "short"})
    assert isinstance(r, InputRecord) and r.params.temperature == 0.5


def test_error_keeps_the_lines_id_when_it_has_one():
    assert p({"id": "q1", "prompt": "x", "top_p": 0}).id == "q1"
    assert p({"custom_id": "c9", "body": 1}).id == "c9"
    assert p("{bad").id == "input:7"


def test_invalid_utf8_is_an_error_on_that_line():
    text = b"ok \xff\xfe bytes".decode("utf-8", "surrogateescape")
    r = parse_line(text, 2, D)
    assert isinstance(r, InputError) and r.field == "encoding"
    assert r.message == "line 2: invalid UTF-8: byte 0xff at offset 3 in the line"


def test_source_names_default_ids_and_messages():
    r = parse_line("hi", 4, D, source="a.txt")
    assert r.id == "a.txt:4"
    assert parse_line("{", 4, D, source="a.txt").message.startswith("a.txt line 4: invalid JSON")


def test_duplicate_ids_later_one_is_an_error_naming_both_lines_with_its_default_id():
    lp = LineParser(D)
    a = lp('{"id": "x", "prompt": "1"}', 1)
    b = lp('{"id": "x", "prompt": "2"}', 2)
    c = lp('{"id": 3, "prompt": "3"}', 3)
    d = lp('{"custom_id": "3", "body": {"messages": [{"role": "user", "content": "q"}]}}', 4)  # "3" again
    assert isinstance(a, InputRecord) and isinstance(c, InputRecord) and c.id == "3"
    assert isinstance(b, InputError) and b.field == "id" and b.id == "input:2"
    assert b.message == "line 2: field 'id': duplicate id \"x\" (first on line 1)"
    assert isinstance(d, InputError) and d.id == "input:4"
    assert d.message == "line 4: field 'id': duplicate id \"3\" (first on line 3)"
    assert len({r.id for r in (a, b, c, d)}) == 4


def test_line_parser_skips_resumed_ids_but_still_sees_them():
    lp = LineParser(D, skip_ids={"x", "input:3"})
    assert lp('{"id": "x", "prompt": "1"}', 1) is None
    assert lp("hi", 2).id == "input:2"
    assert lp('{"id": "x", "prompt": "again"}', 3) is None  # duplicate error, already written as "input:3"
    assert lp.skipped == 2


def test_default_ids_never_collide_with_explicit_ones():
    # An explicit "3" on line 1 and lines without ids: three distinct ids (cases/implicit-id-collision).
    lp = LineParser(D, sources=["in.jsonl"])
    got = [lp(line, n, "in.jsonl") for n, line in enumerate(
        ['{"id": "3", "prompt": "Hello"}', '{"prompt": "Hi"}', "Tell me a joke."], start=1)]
    assert all(isinstance(r, InputRecord) for r in got)
    assert [r.id for r in got] == ["3", "in.jsonl:2", "in.jsonl:3"]


@pytest.mark.parametrize("order", ["explicit first", "default first"])
def test_an_explicit_id_that_is_another_lines_default_is_refused_in_either_order(order):
    explicit, plain = '{"id": "b.txt:4", "prompt": "x"}', "no id here"
    lines = {2: explicit, 4: plain} if order == "explicit first" else {2: plain, 4: '{"id": "b.txt:2", "prompt": "x"}'}
    lp = LineParser(D, sources=["a.txt", "b.txt"])
    got = {n: lp(line, n, "b.txt") for n, line in sorted(lines.items())}
    bad = got[2] if order == "explicit first" else got[4]
    good = got[4] if order == "explicit first" else got[2]
    assert isinstance(good, InputRecord) and good.id == f"b.txt:{good.line_no}"
    assert isinstance(bad, InputError) and bad.field == "id" and bad.id == f"b.txt:{bad.line_no}"
    assert f"b.txt line {bad.line_no}: field 'id': " in bad.message
    assert f"is the default id of b.txt line {good.line_no}" in bad.message
    # its own default id, another source's, or a name that is no source are fine
    assert lp('{"id": "b.txt:9", "prompt": "x"}', 9, "b.txt").id == "b.txt:9"
    assert isinstance(lp('{"id": "a.txt:9", "prompt": "x"}', 10, "b.txt"), InputError)
    assert lp('{"id": "c.txt:9", "prompt": "x"}', 11, "b.txt").id == "c.txt:9"
    assert lp('{"id": "b.txt:09", "prompt": "x"}', 12, "b.txt").id == "b.txt:09"  # never a default id


@pytest.mark.parametrize("prefix", ["\ufeff", "\u200b", "\u00a0", "\u2060", " \ufeff\u200d\t", "\ufffe", "\u00ad",
                                    "\u3000"])
def test_invisible_characters_before_json_do_not_make_it_text(prefix):
    r = p(prefix + '{"id": "j", "prompt": "Once"}')
    assert isinstance(r, InputRecord) and (r.kind, r.id, r.prompt) == ("prompt", "j", "Once")
    bad = p(prefix + '{"id": "j", "prompt": }')
    assert isinstance(bad, InputError) and bad.field == "json"
    text = p(prefix + "Hello")  # a text line keeps its whitespace, not the invisible characters
    assert text.messages[-1]["content"] == "".join(c for c in prefix if c.isspace()) + "Hello"  # NBSP stays
    assert p(prefix) is None  # nothing but invisible characters: a blank line


def test_bidi_marks_before_json_are_skipped_but_a_text_prompt_keeps_them():
    assert p('\u200f{"id": "j", "prompt": "x"}').kind == "prompt"
    assert p("\u200fשלום").messages[-1]["content"] == "\u200fשלום"


def test_a_bom_starting_json_inside_a_text_line_is_an_error():
    r = p('last line without newline\ufeff{"prompt": "x"}', 5)
    assert isinstance(r, InputError) and r.field == "encoding"
    assert r.message.startswith("line 5: a byte-order mark at character 26 starts a JSON object")


def test_reader_problem_is_an_encoding_error():
    r = parse_line("", 3, D, source="a.txt", problem="invalid UTF-16 LE: byte 0x00 at offset 6 in the line")
    assert isinstance(r, InputError) and r.field == "encoding" and r.id == "a.txt:3"
    assert r.message == "a.txt line 3: invalid UTF-16 LE: byte 0x00 at offset 6 in the line"


@pytest.mark.parametrize("name, n, kinds", [
    ("chat.jsonl", 6, {"messages"}), ("plain.txt", 4, {"text"}),
    ("prompts.jsonl", 4, {"prompt"}), ("openai-batch.jsonl", 3, {"openai"}),
])
def test_example_prompt_files_parse(name, n, kinds):
    recs = list(read_records([str(PROMPTS / name)], LineParser(SamplingParams())))
    assert len(recs) == n and all(isinstance(r, InputRecord) for r in recs), recs
    assert {r.kind for r in recs} == kinds and len({r.id for r in recs}) == n
    if name == "chat.jsonl":
        assert all(32 <= r.params.max_new_tokens <= 96 for r in recs)
        assert len({r.params.max_new_tokens for r in recs}) > 3
    if name == "prompts.jsonl":
        assert any(r.params.temperature > 0 and r.params.seed is not None for r in recs)
