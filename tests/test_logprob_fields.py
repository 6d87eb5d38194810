"""Logprob request fields (no model): OpenAI chat, legacy completions, cbgen lines, CLI defaults."""

from __future__ import annotations

import json

import pytest

from cbgen.config import SamplingParams
from cbgen.io.logprob_fields import cli_defaults
from cbgen.io.records import InputError, InputRecord, parse_line

D = SamplingParams()


def chat(**body):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body})


def cmpl(**body):
    body = {"model": "m", "prompt": "The capital of", **body}
    return json.dumps({"custom_id": "t", "url": "/v1/completions", "body": body})


def line(**fields):
    return json.dumps({"id": "x", "prompt": "hello", **fields})


def parsed(text, defaults=D) -> SamplingParams:
    r = parse_line(text, 4, defaults)
    assert isinstance(r, InputRecord), r
    return r.params


def error(text, defaults=D) -> InputError:
    r = parse_line(text, 4, defaults)
    assert isinstance(r, InputError), r
    return r


@pytest.mark.parametrize("text,logprobs", [
    (chat(logprobs=True, top_logprobs=2), 2),
    (chat(logprobs=True), 0),
    (chat(logprobs=False), None),
    (chat(), None),
    (chat(logprobs=None, top_logprobs=None), None),
    (cmpl(logprobs=2), 2),                   # the legacy integer form
    (cmpl(logprobs=0), 0),
    (cmpl(logprobs=5), 5),
    (line(logprobs=True, top_logprobs=20), 20),
    (line(logprobs=3), 3),                   # vLLM's integer form on a cbgen line
    (line(logprobs=True), 0),
    (line(logprobs=False), None),
])
def test_every_request_shape_becomes_vllms_integer(text, logprobs):
    assert parsed(text).logprobs == logprobs


def test_prompt_logprobs_pass_through_and_are_validated():
    assert parsed(line(prompt_logprobs=1)).prompt_logprobs == 1
    assert parsed(chat(prompt_logprobs=0)).prompt_logprobs == 0
    e = error(line(prompt_logprobs=True))
    assert e.field == "prompt_logprobs" and "[0, 20]" in e.message and "got true" in e.message


@pytest.mark.parametrize("text,field,words", [
    (chat(logprobs=True, top_logprobs=21), "body.top_logprobs", ["[0, 20]"]),
    (chat(top_logprobs=2), "body.top_logprobs", ["needs 'logprobs': true"]),
    (chat(logprobs=False, top_logprobs=2), "body.top_logprobs", ["needs 'logprobs': true"]),
    (chat(logprobs=2), "body.logprobs", ["true or false", "top_logprobs"]),
    (chat(logprobs="yes"), "body.logprobs", ["true or false"]),
    (chat(logprobs=True, top_logprobs="2"), "body.top_logprobs", ["an integer"]),
    (chat(logprobs=True, top_logprobs=-1), "body.top_logprobs", ["[0, 20]"]),
    (cmpl(logprobs=6), "body.logprobs", ["[0, 5]"]),
    (cmpl(logprobs=True), "body.logprobs", ["[0, 5]"]),
    (cmpl(logprobs=1, top_logprobs=1), "body.top_logprobs", ["not a /v1/completions field"]),
    (line(top_logprobs=3), "top_logprobs", ["needs 'logprobs': true"]),
    (line(logprobs=21), "logprobs", ["[0, 20]"]),
    (line(logprobs=2.5), "logprobs", ["true, false or an integer"]),
    (line(logprobs=2, top_logprobs=2), "top_logprobs", ["conflicts"]),
])
def test_bad_logprob_fields_are_an_error_naming_line_and_field(text, field, words):
    e = error(text)
    assert e.field == field
    assert e.message.startswith(f"line 4: field '{field}': "), e.message
    for w in words:
        assert w in e.message, (w, e.message)


def test_a_typo_of_top_logprobs_is_caught():
    assert error(line(top_logprob=2)).message.endswith("did you mean 'top_logprobs'?)")


def test_lines_override_the_command_line_default():
    on = cli_defaults(D, logprobs=False, top_logprobs=3, prompt_logprobs=None)   # --top-logprobs implies --logprobs
    assert on.logprobs == 3 and on.prompt_logprobs is None
    assert parsed(line(), on).logprobs == 3
    assert parsed(line(logprobs=True), on).logprobs == 3       # on, with the default's alternatives
    assert parsed(line(top_logprobs=1), on).logprobs == 1      # logprobs already on by default
    assert parsed(line(logprobs=False), on).logprobs is None   # turned off for this line
    assert parsed(chat(logprobs=False), on).logprobs is None
    assert cli_defaults(D, True, None, 2) == D.replace(logprobs=0, prompt_logprobs=2)
    assert cli_defaults(D, False, None, None) == D
    with pytest.raises(ValueError, match=r"^--top-logprobs 21: expected an integer in \[0, 20\]"):
        cli_defaults(D, True, 21, None)
