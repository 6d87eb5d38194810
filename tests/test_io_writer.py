"""Result records, the three writers (one write per record), BrokenPipe, ReorderBuffer."""

import io
import json
import random

import pytest

from cbgen.config import SamplingParams
from cbgen.engine.outputs import FinishReason, RequestMetrics, RequestOutput
from cbgen.io.records import parse_line
from cbgen.io.writer import (JsonlWriter, OpenAIWriter, OutputClosed, ReorderBuffer, TextWriter, error_result,
                             make_writer, result_from_outputs)


def out(text, index=0, n=1, reason=FinishReason.STOP, gen=5, finished_time=10.0, rid="r"):
    m = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.5, first_token_time=2.0,
                       finished_time=finished_time, num_prompt_tokens=12, num_cached_tokens=4,
                       num_generated_tokens=gen)
    return RequestOutput(rid, index, [], "", text, [], True, reason, m, num_samples=n)


class CountingStream(io.StringIO):
    encoding = "utf-8"

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


class BrokenStream(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


CHAT = parse_line('{"id": "c1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}', 1,
                  SamplingParams())
RAW = parse_line('{"id": "p1", "prompt": "The", "n": 2}', 2, SamplingParams())
BAD = parse_line('{"id": "e1", "prompt": "x", "temperature": -1}', 3, SamplingParams())


def records():
    return [result_from_outputs(CHAT, [out("Héllo\nthere")], model="smol"),
            result_from_outputs(RAW, [out("b", 1, 2, FinishReason.LENGTH, 3, 12.0), out("a", 0, 2)], model="smol"),
            error_result(BAD, model="smol"),
            error_result(CHAT, "prompt is 5000 tokens; max_model_len is 2048")]


def test_result_record_fields():
    single, multi, err, rejected = records()
    d = single.to_dict()
    assert list(d) == ["id", "line", "text", "finish_reason", "usage", "timings", "params", "model", "error"]
    assert (d["id"], d["line"], d["text"], d["finish_reason"], d["error"]) == ("c1", 1, "Héllo\nthere", "stop", None)
    assert d["usage"] == {"prompt_tokens": 12, "cached_tokens": 4, "completion_tokens": 5}
    assert d["timings"] == {"queue_s": 0.5, "ttft_s": 1.0, "total_s": 9.0, "tpot_s": 2.0, "tokens_per_s": 0.5}
    assert d["params"]["max_new_tokens"] == 9 and d["model"] == "smol"
    m = multi.to_dict()
    assert m["text"] == "a" and m["choices"] == [{"index": 0, "text": "a", "finish_reason": "stop"},
                                                 {"index": 1, "text": "b", "finish_reason": "length"}]
    assert m["usage"]["completion_tokens"] == 8 and m["timings"]["total_s"] == 11.0  # last sample to finish
    e = err.to_dict()
    assert (e["id"], e["line"], e["text"], e["finish_reason"], e["usage"]) == ("e1", 3, None, "error", None)
    assert e["error"].startswith("line 3: field 'temperature'")
    assert rejected.error.startswith("prompt is 5000") and rejected.params["max_new_tokens"] == 9


@pytest.mark.parametrize("fmt", ["jsonl", "openai", "text"])
def test_one_write_per_record_and_valid_json_lines(fmt):
    s = CountingStream()
    w = make_writer(fmt, s)
    recs = records()
    for r in recs:
        w.write(r)
    text_records = sum(r.text is not None for r in recs)
    assert s.writes == (text_records if fmt == "text" else len(recs))
    if fmt != "text":
        lines = s.getvalue().split("\n")
        assert lines[-1] == "" and all(json.loads(ln) for ln in lines[:-1]) and len(lines) == 5


def test_jsonl_writes_utf8_and_escapes_for_ascii_streams():
    s = CountingStream()
    JsonlWriter(s).write(records()[0])
    assert "Héllo" in s.getvalue()
    a = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    JsonlWriter(a).write(records()[0])
    a.seek(0)
    assert "H\\u00e9llo" in a.read()


def test_openai_shape():
    s = io.StringIO()
    w = OpenAIWriter(s)
    for r in records():
        w.write(r)
    chat, comp, err, rej = map(json.loads, s.getvalue().splitlines())
    assert chat["id"].startswith("batch_req_") and chat["custom_id"] == "c1" and chat["error"] is None
    resp = chat["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["model"] == "smol"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Héllo\nthere"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    cb = comp["response"]["body"]
    assert cb["object"] == "text_completion" and [c["text"] for c in cb["choices"]] == ["a", "b"]
    assert err["response"] is None and err["error"]["code"] == "invalid_request"
    assert err["custom_id"] == "e1" and "temperature" in err["error"]["message"]
    assert rej["response"] is None and rej["error"]["message"].startswith("prompt is 5000")


def test_text_writer_blocks():
    s = io.StringIO()
    w = TextWriter(s)
    for r in records():
        w.write(r)
    assert s.getvalue() == "Héllo\nthere\n\na\n\nb\n\n"


def test_broken_pipe_is_output_closed():
    with pytest.raises(OutputClosed):
        JsonlWriter(BrokenStream()).write(records()[0])


def test_unknown_format():
    with pytest.raises(ValueError, match="format='xml'"):
        make_writer("xml", io.StringIO())


def test_reorder_buffer_releases_in_input_order():
    buf = ReorderBuffer(limit=8)
    tickets = [buf.reserve() for _ in range(6)]
    finish = tickets[:]
    random.Random(0).shuffle(finish)
    released = []
    for t in finish:
        released += buf.push(t, f"r{t}")
        assert buf.outstanding + len(released) == 6 and buf.pending <= buf.outstanding
    assert released == [f"r{t}" for t in range(6)] and buf.pending == 0 and buf.outstanding == 0


def test_reorder_buffer_holds_behind_a_slow_head_and_reports_full():
    buf = ReorderBuffer(limit=3)
    a, b, c = buf.reserve(), buf.reserve(), buf.reserve()
    assert buf.full
    assert buf.push(b, "b") == [] and buf.push(c, "c") == [] and buf.pending == 2
    assert buf.push(a, "a") == ["a", "b", "c"] and not buf.full
    buf.reserve()  # aborted: never pushed
    buf.push(buf.reserve(), "e")
    assert buf.drain() == ["e"] and buf.outstanding == 0
    assert buf.push(buf.reserve(), "f") == ["f"]
