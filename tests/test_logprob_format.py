"""Logprobs in the output records (no model): cbgen JSONL, OpenAI chat and legacy completions,
vLLM prompt logprobs; and, on the embedded model, the shared case through `cbgen run`."""

from __future__ import annotations

import io
import json
import math

import pytest
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import SamplingParams
from cbgen.engine.outputs import FinishReason, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from cbgen.io.records import parse_line
from cbgen.io.writer import JsonlWriter, OpenAIWriter, result_from_outputs


def pos(tok: str, tid: int, lp: float, top: list[tuple[str, int, float]], offset: int | None) -> PositionLogprobs:
    return PositionLogprobs(Logprob(tid, tok, tok.encode(), lp, rank=1 + sum(t[2] > lp for t in top)),
                            tuple(Logprob(i, t, t.encode(), v) for t, i, v in top), offset)


# " Pa" + "ris": the second token is not in its row's top 1 (legacy dicts then hold k + 1 keys).
GEN = [pos(" Pa", 11, -0.5, [(" Pa", 11, -0.5)], 0), pos("ris", 12, -2.0, [("ro", 13, -0.1)], 3)]
PROMPT_LP = [None, pos(" capital", 21, -math.inf, [(" cap", 22, -1.0)], None)]


def out(index=0, n=1, logprobs=GEN, prompt_logprobs=None):
    m = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.5, first_token_time=2.0, finished_time=3.0,
                       num_prompt_tokens=2, num_cached_tokens=0, num_generated_tokens=2)
    return RequestOutput("r", index, [], "", " Paris", [11, 12], True, FinishReason.LENGTH, m, num_samples=n,
                         logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def write(writer_cls, rec) -> dict:
    s = io.StringIO()
    writer_cls(s).write(rec)
    return json.loads(s.getvalue())


def test_jsonl_keeps_one_entry_per_token_for_every_sample():
    rec = parse_line('{"id": "r", "prompt": "The", "n": 2, "logprobs": true, "top_logprobs": 1}', 1, SamplingParams())
    d = write(JsonlWriter, result_from_outputs(rec, [out(1, 2), out(0, 2, prompt_logprobs=PROMPT_LP)]))
    entry = d["logprobs"][1]
    assert entry == {"token": "ris", "token_id": 12, "logprob": -2.0, "rank": 2, "bytes": list(b"ris"),
                     "top_logprobs": [{"token": "ro", "token_id": 13, "logprob": -0.1, "bytes": list(b"ro")}]}
    assert [len(c["logprobs"]) for c in d["choices"]] == [2, 2]
    assert d["prompt_logprobs"][0] is None and d["prompt_logprobs"][1]["logprob"] == -9999.0   # JSON has no -inf
    plain = write(JsonlWriter, result_from_outputs(rec, [out(0, 2, None), out(1, 2, None)]))
    assert "logprobs" not in plain and "prompt_logprobs" not in plain
    assert all("logprobs" not in c for c in plain["choices"])


def test_openai_chat_shape():
    rec = parse_line(json.dumps({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                            "logprobs": True, "top_logprobs": 1}}), 1,
                     SamplingParams())
    d = write(OpenAIWriter, result_from_outputs(rec, [out(prompt_logprobs=PROMPT_LP)]))
    body = d["response"]["body"]
    lp = body["choices"][0]["logprobs"]
    assert lp["refusal"] is None and len(lp["content"]) == 2
    assert lp["content"][1] == {"token": "ris", "logprob": -2.0, "bytes": list(b"ris"),
                                "top_logprobs": [{"token": "ro", "logprob": -0.1, "bytes": list(b"ro")}]}
    assert body["prompt_logprobs"][1] == {"22": {"logprob": -1.0, "rank": 1, "decoded_token": " cap"},
                                          "21": {"logprob": -9999.0, "rank": 2, "decoded_token": " capital"}}
    no = write(OpenAIWriter, result_from_outputs(rec, [out(logprobs=None)]))
    assert no["response"]["body"]["choices"][0]["logprobs"] is None and "prompt_logprobs" not in no["response"]["body"]


def test_openai_legacy_completions_shape_for_every_sample():
    rec = parse_line(json.dumps({"custom_id": "t", "url": "/v1/completions",
                                 "body": {"prompt": "The", "logprobs": 1, "n": 2}}), 1, SamplingParams())
    body = write(OpenAIWriter, result_from_outputs(rec, [out(0, 2), out(1, 2)]))["response"]["body"]
    for c in body["choices"]:
        assert c["logprobs"] == {"tokens": [" Pa", "ris"], "token_logprobs": [-0.5, -2.0],
                                 "top_logprobs": [{" Pa": -0.5}, {"ro": -0.1, "ris": -2.0}],
                                 "text_offset": [0, 3]}
        assert "prompt_logprobs" not in c


# ---- the shared case, with its own input, through `cbgen run` on the embedded model -------------

CASE = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "any", "messages": [{"role": "user", "content": "Name a colour."}], "logprobs": True,
              "top_logprobs": 3, "max_tokens": 6, "temperature": 0}},
    {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
     "body": {"model": "any", "prompt": "The largest planet is", "logprobs": 2, "max_tokens": 6, "n": 2,
              "temperature": 0.8, "seed": 5}},
    {"custom_id": "bad", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}},
]


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lp") / "case.jsonl"
    p.write_text("".join(json.dumps(c) + "\n" for c in CASE), encoding="utf-8")
    return str(p)


def _run(case_file, *args) -> tuple[int, dict[str, dict]]:
    r = CliRunner().invoke(app, ["run", case_file, "--max-new-tokens", "8", "-q", *args], catch_exceptions=False)
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return r.exit_code, {rec.get("custom_id") or rec["id"]: rec for rec in recs}


@pytest.mark.e2e
def test_shared_case_in_openai_format(embedded_model, case_file):
    code, recs = _run(case_file, "--format", "openai")
    assert code == 1 and "field 'body.top_logprobs'" in recs["bad"]["error"]["message"]
    body = recs["chat"]["response"]["body"]
    c = body["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] or c["finish_reason"] == "stop"
    assert content and "".join(e["token"] for e in content) == c["message"]["content"]
    for e in content:
        assert e["logprob"] <= 0 and bytes(e["bytes"]) == e["token"].encode() and len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["logprob"] >= e["logprob"]
    body = recs["cmpl"]["response"]["body"]
    assert len(body["choices"]) == 2
    for c in body["choices"]:
        lp = c["logprobs"]
        n = len(lp["tokens"])
        assert n > 0 and all(len(lp[k]) == n for k in ("token_logprobs", "top_logprobs", "text_offset"))
        assert all(2 <= len(d) <= 3 for d in lp["top_logprobs"]) and lp["text_offset"][0] == 0
        assert "".join(lp["tokens"]) == c["text"]


@pytest.mark.e2e
def test_shared_case_in_cbgen_jsonl(embedded_model, case_file):
    code, recs = _run(case_file)
    assert code == 1 and recs["bad"]["finish_reason"] == "error"
    assert recs["chat"]["params"]["logprobs"] == 3 and len(recs["chat"]["logprobs"][0]["top_logprobs"]) == 3
    cm = recs["cmpl"]
    assert [len(c["logprobs"]) for c in cm["choices"]] == [len(c["logprobs"]) for c in cm["choices"]]
    for c in cm["choices"]:
        assert c["logprobs"] and "".join(e["token"] for e in c["logprobs"]) == c["text"]
    assert cm["logprobs"] == cm["choices"][0]["logprobs"]
