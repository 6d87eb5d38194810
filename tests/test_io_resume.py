"""Resume: ids of complete records, a half-written tail cut off, no duplicate ids after appending."""

import json

import pytest

from cbgen.config import SamplingParams
from cbgen.io.reader import read_records
from cbgen.io.records import LineParser
from cbgen.io.resume import ResumeError, compact, load_done_ids, open_for_append
from cbgen.io.writer import JsonlWriter, OpenAIWriter, ResultRecord


def rec(i):
    return ResultRecord(id=str(i), line=i, text=f"answer {i}", finish_reason="stop")


def test_missing_file_is_nothing_done(tmp_path):
    assert load_done_ids(tmp_path / "none.jsonl") == (set(), 0, 0, 0)


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
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(f'{{"id": "{i}", "prompt": "p"}}\n' for i in range(1, 6)))
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


def _line(rid, reason="stop", text="t"):
    return json.dumps({"id": rid, "line": 1, "text": text, "finish_reason": reason}) + "\n"


def test_aborted_records_are_not_done_and_are_superseded(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text(_line("a") + _line("b", "abort") + _line("c", "error") + _line("a") + _line("d", "length"))
    state = load_done_ids(f)
    assert state.done_ids == {"a", "c", "d"} and state.num_records == 5
    assert state.superseded == 2  # the abort of "b" and the repeat of "a"


def test_openai_cancelled_lines_are_not_done(tmp_path):
    f = tmp_path / "out.jsonl"
    with open(f, "w", encoding="utf-8") as s:
        OpenAIWriter(s).write(rec(1))
        OpenAIWriter(s).write(ResultRecord(id="2", line=2, text="part", finish_reason="abort"))
    assert load_done_ids(f).done_ids == {"1"}


def test_compact_keeps_one_record_per_id_in_file_order(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text(_line("a", "abort", "a-partial") + _line("b") + _line("c", "abort", "c-old")
                 + _line("a", "length", "a-final") + _line("c", "abort", "c-new") + _line("b", "stop", "b-again")
                 + '{"id": "d", "te')
    f.chmod(0o640)
    assert compact(f) == 3
    got = [(r["id"], r["text"]) for r in map(json.loads, f.read_text().splitlines())]
    assert got == [("b", "t"), ("a", "a-final"), ("c", "c-new")]  # first final, else last abort
    assert f.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_compact_leaves_a_clean_file_untouched(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text(_line("a") + _line("b", "abort"))
    before = f.stat()
    assert compact(f) == 0
    after = f.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_compact_interrupted_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "out.jsonl"
    old = _line("a", "abort") + _line("a")
    f.write_text(old)

    def interrupted(src, dst):
        raise KeyboardInterrupt  # a Ctrl-C between the fsync and the rename

    monkeypatch.setattr("cbgen.io.resume.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compact(f)
    assert f.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
