"""`--shard I/N` splits inputs by a stable hash of the id; `cbgen merge` puts the shard outputs back
together in input order and names missing and duplicate ids."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import SamplingParams
from cbgen.io.merge import MergeError, input_ids, merge_outputs
from cbgen.io.records import LineParser
from cbgen.io.shard import Shard, shard_of


def test_hash_is_the_documented_one_and_pinned():
    # README: first 8 bytes of SHA-256 of the UTF-8 id, big-endian, mod N. Pinned values
    # guard against any change (a job array must split the same way on every machine).
    assert [shard_of(x, 4) for x in ("r1", "r2", "1", "a.jsonl:7")] == [1, 1, 1, 2]
    assert shard_of("r1", 1000003) == 242976
    assert shard_of("x", 97) == int.from_bytes(hashlib.sha256(b"x").digest()[:8], "big") % 97
    assert shard_of("\udcff", 3) in range(3)  # a lone surrogate (bad input byte) still hashes


def test_shard_spec_parsing_and_errors():
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard.parse(" 0 / 1 ")) == "0/1"
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_shards_partition_the_ids_and_keep_duplicate_detection():
    lines = [json.dumps({"id": f"q{i}", "prompt": "x"}) for i in range(50)] + ['{"id": "q3", "prompt": "y"}']
    taken = []
    for i in range(3):
        parser = LineParser(SamplingParams(), shard=Shard(i, 3))
        taken.append([r for n, line in enumerate(lines, 1) if (r := parser(line, n)) is not None])
    ids = [r.id for part in taken for r in part]
    assert sorted(ids) == sorted({*(f"q{i}" for i in range(50)), "input:51"}) and len(ids) == 51
    assert all(len(part) > 5 for part in taken)  # the hash spreads them
    dup = [r for part in taken for r in part if r.id == "input:51"]  # the repeated q3, as in a single run
    assert len(dup) == 1 and dup[0].field == "id"


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _run(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_shard_runs_then_merge_equal_one_run(tmp_path, tiny_model_dir):
    base = ["--model", str(tiny_model_dir), "--dtype", "float32", "-q", "--max-new-tokens", "5"]
    lines = [json.dumps({"id": f"s{i}", "prompt": f"The quick brown fox {i}"}) for i in range(16)]
    lines += ["{not json", json.dumps({"prompt": "raw completion"})]  # an error record and a line-number id
    src = _write(tmp_path, "in.jsonl", lines)
    whole = _run(["run", src, *base])
    outs = []
    for i in range(3):
        out = tmp_path / f"part{i}.jsonl"
        r = _run(["run", src, "--shard", f"{i}/3", "-o", str(out), *base])
        assert r.exit_code in (0, 1), r.stderr
        outs.append(str(out))
    sizes = [len(_records(open(o).read())) for o in outs]
    assert sum(sizes) == 18 and all(sizes)
    merged = tmp_path / "all.jsonl"
    r = _run(["merge", *outs, "-o", str(merged), "--input", src])
    assert r.exit_code == 0, r.stderr
    assert "18 records from 3 files; every input id exactly once" in r.stderr
    strip = lambda recs: [{k: v for k, v in x.items() if k != "timings"} for x in recs]  # noqa: E731
    assert strip(_records(merged.read_text())) == strip(_records(whole.stdout))
    # Without --input the order comes from each record's line number: the same here.
    r = _run(["merge", *reversed(outs)])
    assert strip(_records(r.stdout)) == strip(_records(whole.stdout))
    assert "give --input to check for missing ones" in r.stderr


def _rec(rid, line, reason="stop"):
    return json.dumps({"id": rid, "line": line, "text": "t", "finish_reason": reason})


def test_merge_names_missing_duplicate_and_unexpected_ids(tmp_path):
    src = _write(tmp_path, "in.jsonl", [json.dumps({"id": f"k{i}", "prompt": "x"}) for i in range(1, 6)])
    a = _write(tmp_path, "a.jsonl", [_rec("k1", 1), _rec("k3", 3, "abort")])
    b = tmp_path / "b.jsonl"
    b.write_text(_rec("k3", 3) + "\n" + _rec("zz", 9) + "\n" + _rec("k5", 5)[:20])  # a killed shard's tail
    out = tmp_path / "all.jsonl"
    r = _run(["merge", a, str(b), "-o", str(out), "--input", src])
    assert r.exit_code == 1
    assert "duplicate ids (1, first kept): k3 (2x)" in r.stderr
    assert "missing ids (3): k2, k4, k5" in r.stderr
    assert "ids not in the inputs (1): zz" in r.stderr
    assert "half-written last line 3 skipped" in r.stderr
    recs = _records(out.read_text())
    assert [x["id"] for x in recs] == ["k1", "k3", "zz"]
    assert recs[1]["finish_reason"] == "stop"  # the complete record beats the aborted one


def test_merge_refuses_a_non_output_file_and_leaves_no_partial_file(tmp_path):
    bad = _write(tmp_path, "notes.txt", ["hello"])
    out = tmp_path / "all.jsonl"
    r = _run(["merge", bad, "-o", str(out)])
    assert r.exit_code == 2 and "notes.txt line 1: not a cbgen or OpenAI output record" in r.stderr
    assert not out.exists() and list(tmp_path.glob(".merge-*")) == []
    with pytest.raises(MergeError):
        merge_outputs([bad], open(tmp_path / "x", "wb"))


def test_merge_refuses_an_output_it_reads(tmp_path):
    """-o naming one of merge's files (a shard output or an --input) would truncate it first."""
    shard = _write(tmp_path, "s0.jsonl", [json.dumps({"id": "a", "text": "x", "finish_reason": "stop"})])
    prompts = _write(tmp_path, "p.txt", ["hello"])
    for out, extra in ((shard, []), (prompts, ["--input", prompts])):
        r = _run(["merge", shard, "-o", out, *extra])
        assert r.exit_code == 2 and "is read by this run" in r.stderr, r.stderr
    assert open(prompts).read() == "hello\n" and '"id": "a"' in open(shard).read()


def test_input_ids_match_run_ids_with_several_inputs(tmp_path):
    a = _write(tmp_path, "a.txt", ["hi", "", "there"])
    b = _write(tmp_path, "b.jsonl", [json.dumps({"id": "x", "prompt": "p"}), "{bad"])
    assert input_ids([a, b]) == ["a.txt:1", "a.txt:3", "x", "b.jsonl:2"]   # the run's default ids


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/2"], "--shard 3/2: expected I/N"),
    (["--workers", "2"], "--workers and --cpus-per-worker need --ray"),
    (["--ray", "--workers", "0"], "--workers 0: expected an integer >= 1"),
])
def test_bad_scale_out_options_fail_before_loading(tmp_path, args, message):
    src = _write(tmp_path, "in.txt", ["hi"])
    r = _run(["run", src, "--model", str(tmp_path / "never-loaded"), *args])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
