"""Lazy reading: files, multiple sources, a live pipe, and Prefetcher backpressure."""

import os
import threading
import time

import pytest

from cbgen.config import SamplingParams
from cbgen.io.reader import Line, Prefetcher, iter_lines, read_records, source_names
from cbgen.io.records import InputError, LineParser


def test_iter_lines_strips_terminators_and_bom_and_numbers_per_source(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\n\nlast-no-newline")
    b.write_bytes(b"x\n")
    got = list(iter_lines([str(a), str(b)]))
    assert [(ln.line_no, ln.text) for ln in got] == [(1, "first"), (2, "second"), (3, ""),
                                                     (4, "last-no-newline"), (1, "x")]
    assert got[-1].source == "b.txt"  # base names: ids do not change with the working directory


def test_default_ids_are_source_and_line_number(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\n\nthree\n")
    b.write_text("uno\n")
    assert [r.id for r in read_records([str(a)], LineParser(SamplingParams()))] == ["a.txt:1", "a.txt:3"]
    ids = [r.id for r in read_records([str(a), str(b)], LineParser(SamplingParams()))]
    assert ids == ["a.txt:1", "a.txt:3", "b.txt:1"]
    # two inputs with one base name keep their paths apart
    (tmp_path / "d").mkdir()
    c = tmp_path / "d" / "a.txt"
    c.write_text("dos\n")
    assert source_names([str(a), str(c), "-"]) == [str(a), str(c), "stdin"]
    ids = [r.id for r in read_records([str(a), str(c)], LineParser(SamplingParams()))]
    assert ids == [f"{a}:1", f"{a}:3", f"{c}:1"]


def test_invalid_utf8_becomes_an_error_record_and_reading_goes_on(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\nbad \xc3\x28 here\nalso fine\n")
    recs = list(read_records([str(f)], LineParser(SamplingParams())))
    assert [type(r).__name__ for r in recs] == ["InputRecord", "InputError", "InputRecord"]
    assert recs[1].message == "bad.txt line 2: invalid UTF-8: byte 0xc3 at offset 4 in the line (9 in the file)"


def test_stdin_pipe_lines_arrive_one_by_one():
    # The writer sends line i+1 only after the reader has yielded line i, so a
    # block-buffered reader (waiting for more bytes or EOF) would time out here.
    r, w = os.pipe()
    acks = [threading.Event() for _ in range(3)]
    in_time = []

    def writer():
        for i, ack in enumerate(acks):
            os.write(w, f"line {i}\n".encode())
            in_time.append(ack.wait(5))
        os.close(w)

    threading.Thread(target=writer, daemon=True).start()
    with os.fdopen(r, "rb") as stdin:
        got = []
        for ln in iter_lines(["-"], stdin=stdin):
            got.append(ln)
            acks[ln.line_no - 1].set()
    assert got == [Line("stdin", i + 1, f"line {i}") for i in range(3)]
    assert in_time == [True, True, True]


def test_prefetcher_backpressure_bounds_read_ahead():
    produced = consumed = 0
    max_ahead = 0

    def items():
        nonlocal produced
        for i in range(100_000):
            produced += 1
            yield i

    pf = Prefetcher(items(), maxsize=64)
    out = []
    while not pf.exhausted:
        got = pf.get_many(7, timeout=1)
        consumed += len(got)
        out.extend(got)
        max_ahead = max(max_ahead, produced - consumed)
        if len(out) < 2000:
            time.sleep(0.0005)  # a slow consumer: the reader must wait, not run ahead
    assert out == list(range(100_000))
    # it does read ahead (queue full minus the batch just taken), but never beyond
    # the queue + the one item a blocked put holds
    assert 50 <= max_ahead <= 64 + 1, max_ahead


def test_prefetcher_parses_a_large_file_lazily(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("".join(f"prompt {i}\n" for i in range(100_000)))
    parsed = 0
    parser = LineParser(SamplingParams())

    def counting():
        nonlocal parsed
        for r in read_records([str(f)], parser):
            parsed += 1
            yield r

    pf = Prefetcher(counting(), maxsize=64)
    time.sleep(0.3)  # give the reader every chance to run ahead
    assert parsed <= 65 and pf.waiting <= 64
    assert [r.id for r in pf.get_nowait_many(3)] == ["big.txt:1", "big.txt:2", "big.txt:3"]
    pf.close()


def test_prefetcher_nowait_zero_and_end_of_input():
    gate = threading.Event()

    def items():
        yield "a"
        gate.wait(5)
        yield "b"

    pf = Prefetcher(items(), maxsize=4)
    assert pf.get_many(10, timeout=2) == ["a"]
    assert pf.get_nowait_many(10) == [] and not pf.exhausted  # nothing ready: returns at once
    assert pf.get_nowait_many(0) == []
    gate.set()
    assert pf.get_many(10, timeout=2) == ["b"]
    assert pf.get_many(10, timeout=2) == [] and pf.exhausted


def test_prefetcher_reraises_reader_errors_after_earlier_items():
    pf = Prefetcher(read_records(["/nonexistent/x.jsonl"], LineParser(SamplingParams())))
    with pytest.raises(FileNotFoundError):
        pf.get_many(5, timeout=2)

    def items():
        yield 1
        raise RuntimeError("boom")

    pf = Prefetcher(items())
    time.sleep(0.05)
    assert pf.get_many(5, timeout=2) == [1] and not pf.exhausted
    with pytest.raises(RuntimeError, match="boom"):
        pf.get_many(5, timeout=2)
    assert pf.exhausted


def test_prefetcher_close_stops_a_blocked_reader():
    pf = Prefetcher(iter(range(10**9)), maxsize=2)
    time.sleep(0.05)
    pf.close()
    pf._thread.join(1)
    assert not pf._thread.is_alive()


def test_error_records_flow_through_the_prefetcher(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": \n')
    pf = Prefetcher(read_records([str(f)], LineParser(SamplingParams())))
    got = []
    while not pf.exhausted:
        got += pf.get_many(10, timeout=2)
    assert isinstance(got[1], InputError) and got[1].field == "json"
