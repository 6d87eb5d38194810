"""`cbgen run --dry-run` and its shared input check, on the tiny model."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.frontends import probe as probe_mod
from cbgen.frontends.probe import run_probe
from cbgen.frontends.validate import check_inputs


def _write(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def _lines(n):
    return [json.dumps({"id": f"q{i}", "prompt": "The quick brown fox " * (1 + i % 7), "max_new_tokens": 4 + i % 5})
            for i in range(n)]


def test_check_inputs_counts_samples_and_keeps_the_longest(tmp_path, tiny_loaded):
    src = _write(tmp_path, _lines(30) + ['{"prompt": 3}', json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                                       "n": 2})])
    problems = []
    tok = tiny_loaded.tokenizer
    check = check_inputs([src], tok, 2048, SamplingParams(), None, problems.append, sample_size=8, num_longest=3)
    assert (check.num_valid, check.num_invalid) == (31, 1) and "line 31" in problems[0]
    assert len(check.prompt_tokens) == 31 and check.num_samples[-1] == 2 and check.max_new_tokens[0] == 4
    assert [c.num_prompt_tokens for c in check.longest] == sorted(check.prompt_tokens, reverse=True)[:3]
    assert len(check.sample) == 8 and all(len(c.token_ids) == c.num_prompt_tokens for c in check.sample)
    again = check_inputs([src], tok, 2048, SamplingParams(), None, problems.append, sample_size=8)
    assert [c.id for c in again.sample] == [c.id for c in check.sample]  # seeded: the same sample
    assert len({c.id for c in check.sample}) == 8


def test_probe_measures_steps_and_natural_lengths(tmp_path, tiny_loaded):
    engine = Engine.from_loaded(tiny_loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))
    src = _write(tmp_path, _lines(12))
    check = check_inputs([src], tiny_loaded.tokenizer, engine.max_model_len, SamplingParams(), None, print,
                         sample_size=12)
    probe = run_probe(engine, check.sample, rows=12, length_samples=5, decode_steps=4, time_limit=30)
    assert probe.rows == probe.probe_rows == 8 and len(probe.lengths) == 5 and all(s.finished for s in probe.lengths)
    assert [s.limit for s in probe.lengths] == [c.params.max_new_tokens for c in check.sample[:5]]
    assert max(s.num_decode for s in probe.steps) == 8      # the whole batch decoded together
    assert any(s.num_prefill_tokens for s in probe.steps) and all(s.seconds > 0 for s in probe.steps)
    assert not engine.has_unfinished


def test_a_stopped_probe_returns_at_once_and_leaves_the_engine_idle(tmp_path, tiny_loaded):
    """Ctrl-C during --dry-run sets ``stop``: the probe aborts what runs at its next step."""
    import threading
    engine = Engine.from_loaded(tiny_loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))
    src = _write(tmp_path, [json.dumps({"id": f"q{i}", "prompt": "fox " * 5, "max_new_tokens": 500,
                                        "ignore_eos": True}) for i in range(8)])
    check = check_inputs([src], tiny_loaded.tokenizer, engine.max_model_len, SamplingParams(), None, print,
                         sample_size=8)
    stop = threading.Event()
    stop.set()
    probe = run_probe(engine, check.sample, rows=8, length_samples=4, time_limit=30, stop=stop)
    assert not engine.has_unfinished and len(probe.steps) <= 2 and not any(s.finished for s in probe.lengths)


def test_probe_bounds_its_prefill_so_the_batch_gets_to_decode_together(tmp_path, tiny_loaded):
    """The concurrency part takes no more prompts than PREFILL_STEPS full steps of prompt
    tokens: at 256 rows, prefilling every prompt outlasted the part's time, and the probe never
    saw a decode-only step at many rows."""
    engine = Engine.from_loaded(tiny_loaded, EngineConfig(max_num_seqs=32, max_num_batched_tokens=32))
    src = _write(tmp_path, [json.dumps({"id": f"q{i}", "prompt": f"{i} " + "The quick brown fox " * 6,
                                        "max_new_tokens": 4}) for i in range(32)])
    check = check_inputs([src], tiny_loaded.tokenizer, engine.max_model_len, SamplingParams(), None, print,
                         sample_size=32)
    per_prompt = check.sample[0].num_prompt_tokens
    probe = run_probe(engine, check.sample, rows=32, length_samples=2, decode_steps=4, time_limit=30)
    assert probe.rows == 32 and probe.probe_rows < 32
    assert sum(c.num_prompt_tokens for c in check.sample[:probe.probe_rows]) <= probe_mod.PREFILL_STEPS * 32 \
        < sum(c.num_prompt_tokens for c in check.sample[:probe.probe_rows + 1]), per_prompt
    # The chosen prompts all decoded together, with no prefill in the step.
    assert any(s.num_decode == probe.probe_rows and s.num_prefill_tokens == 0 for s in probe.steps)


def test_dry_run_reports_counts_longest_and_eta_without_generating(tmp_path, tiny_model_dir):
    src = _write(tmp_path, _lines(20) + ['{"prompt": 3}'])
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(app, ["run", src, "--dry-run", "-o", str(out), "--model", str(tiny_model_dir),
                                 "--dtype", "float32", "--max-num-seqs", "8"], catch_exceptions=False)
    assert r.exit_code == 1  # one invalid line, as --validate
    assert "invalid: in.jsonl line 21: field 'prompt'" in r.stderr
    assert not out.exists() and "{" not in r.stdout          # nothing generated, no records
    assert "dry run: 21 inputs, 20 valid, 1 invalid" in r.stdout
    assert re.search(r"prompt tokens: [\d,]+ in total", r.stdout)
    assert "output tokens: at most 120 (max_new_tokens)" in r.stdout   # sum of 4 + i % 5 over 20 lines
    longest = re.findall(r"^\s+([\d,]+) tokens\s+(q\d+) \(line (\d+)\)$", r.stdout, re.M)
    # Longest first (the prompt repeats 1 + i % 7 times), ties in input order.
    assert [rid for _, rid, _ in longest] == ["q6", "q13", "q5", "q12", "q19"]
    assert int(longest[0][0].replace(",", "")) > int(longest[2][0].replace(",", ""))
    m = re.search(r"ETA: (\d+)m(\d+)s \(range (\d+)m(\d+)s-(\d+)m(\d+)s\) for generation \+ [\d.]+s start-up", r.stdout)
    assert m, r.stdout
    eta, low, high = (int(m[i]) * 60 + int(m[i + 1]) for i in (1, 3, 5))
    assert low <= eta <= high


def test_validate_and_dry_run_refuse_a_prompt_the_kv_cache_cannot_hold(tmp_path, tiny_model_dir):
    """As the run would (an error record): the probe never sees it, so it cannot fail on it."""
    c = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 4
    gb = repr(32 * per_token / 2**30)   # a pool of 32 tokens in float32
    src = _write(tmp_path, [json.dumps({"prompt": "The quick brown fox " * 12}), '{"prompt": "Hi"}'])
    base = ["run", src, "--model", str(tiny_model_dir), "--dtype", "float32", "--kv-cache-gb", gb, "-n", "4"]
    for mode in ("--validate", "--dry-run"):
        r = CliRunner().invoke(app, [*base, mode], catch_exceptions=False)
        assert r.exit_code == 1, r.stderr
        assert re.search(r"invalid: in.jsonl line 1: prompt: \d+ tokens leave no room to generate in the KV cache "
                         r"of 32 tokens \(raise --kv-cache-gb\)", r.stderr), r.stderr
