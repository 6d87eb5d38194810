"""The live progress view, rendered with a Rich recording console (no terminal needed)."""

from __future__ import annotations

import json

from rich.console import Console
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.frontends.progress import ProgressView
from cbgen.models import eos_token_ids


def _engine(tiny_loaded, **kw):
    return Engine(tiny_loaded.model, tiny_loaded.tokenizer, EngineConfig(**kw),
                  max_model_len=tiny_loaded.max_model_len,
                  eos_token_ids=eos_token_ids(tiny_loaded.tokenizer, tiny_loaded.model))


def test_view_shows_one_line_per_sequence_and_a_header(tiny_loaded):
    engine = _engine(tiny_loaded, max_num_seqs=3, max_num_batched_tokens=64)
    view = ProgressView(engine)
    tok = tiny_loaded.tokenizer
    long_prompt = tok.encode("the quick brown fox " * 40)
    for i in range(3):
        engine.add_request(f"req-{i}", tok.encode("hello world"), SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.add_request("queued", tok.encode("hi"), SamplingParams(max_new_tokens=5))
    for _ in range(6):
        for o in engine.step():
            view.observe(o)
    console = Console(record=True, width=110, force_terminal=False)
    console.print(view.render())
    screen = console.export_text()
    assert "done 0/?" in screen and "tok/s" in screen and "KV" in screen and "ETA" in screen
    lines = screen.splitlines()
    for rid in ("req-0", "req-1", "req-2"):
        (line,) = [ln for ln in lines if ln.startswith(rid)]
        assert "decode" in line and "/50" in line
    assert any(ln.startswith("long") and "queued" in ln for ln in lines)
    assert any(ln.startswith("queued") and "queued" in ln for ln in lines)
    while engine.has_unfinished:
        for o in engine.step():
            view.observe(o)
            if o.finished:
                view.record_done()
    console.print(view.render())
    assert "done 5/?" in console.export_text()
    assert engine.block_manager.all_free()


def test_forced_progress_goes_to_stderr_only(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "max_new_tokens": 8}) + "\n" for i in range(4)))
    r = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--dtype", "float32",
                                 "--progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert all(json.loads(line) for line in r.stdout.splitlines())  # records only
    assert "4 requests" in r.stderr  # the summary line
    assert "running" in r.stderr and "\x1b[" in r.stderr   # the view's frames, though stderr is no terminal
