"""Resume: ids of complete records, a half-written tail cut off, no duplicate ids after appending."""

import json

import pytest

from cbgen.config import SamplingParams
from cbgen.io.reader import read_records
from cbgen.io.records import LineParser
from cbgen.io.resume import ResumeError, load_done_ids, open_for_append
from cbgen.io.writer import JsonlWriter, OpenAIWriter, ResultRecord


def rec(i):
    return ResultRecord(id=str(i), line=i, text=f"answer {i}", finish_reason="stop")


def test_missing_file_is_nothing_done(tmp_path):
    assert load_done_ids(tmp_path / "none.jsonl") == (set(), 0, 0)


def test_half_written_last_line_is_dropped_and_truncated(tmp_path):
    f = tmp_path / "out.jsonl"
    full = "".join(json.dumps(rec(i).to_dict()) + "\n" for i in (1, 2))
    tail = json.dumps(rec(3).to_dict())[:25]
    f.write_text(full + tail)
    state = load_done_ids(f)
    assert state.done_ids == {"1", "2"} and state.num_records == 2
    assert state.truncated_bytes == len(tail) and f.read_text() == full


def test_complete_json_without_newline_is_not_done(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text(json.dumps(rec(1).to_dict()) + "\n" + json.dumps(rec(2).to_dict()))
    assert load_done_ids(f).done_ids == {"1"} and f.read_text().count("\n") == 1


def test_openai_output_uses_custom_id(tmp_path):
    f = tmp_path / "out.jsonl"
    with open(f, "w", encoding="utf-8") as s:
        for i in (1, 2):
            OpenAIWriter(s).write(rec(i))
    assert load_done_ids(f).done_ids == {"1", "2"}


def test_not_an_output_file_refuses(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("some generated text\n\n")
    with pytest.raises(ResumeError, match="line 1"):
        load_done_ids(f)


def test_resumed_run_appends_only_missing_ids(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(f"prompt {i}\n" for i in range(1, 6)))
    out = tmp_path / "out.jsonl"
    # a killed first run: records 1 and 3 finished, 4 was half-written
    out.write_text(json.dumps(rec(1).to_dict()) + "\n" + json.dumps(rec(3).to_dict()) + "\n"
                   + json.dumps(rec(4).to_dict())[:10])
    stream, state = open_for_append(out)
    parser = LineParser(SamplingParams(), skip_ids=state.done_ids)
    with stream:
        w = JsonlWriter(stream)
        for r in read_records([str(inp)], parser):
            w.write(rec(int(r.id)))
    ids = [json.loads(ln)["id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == ["1", "2", "3", "4", "5"] and parser.skipped == 2
