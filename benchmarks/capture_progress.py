"""Render the live progress view of a real run into text (for the README).

Runs the first dev prompts on the embedded model and, after ``--steps`` engine
steps, prints what `cbgen run` shows on stderr at that moment, through a Rich
recording console.

    .venv/bin/python benchmarks/capture_progress.py [--prompts N] [--steps K]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.frontends.progress import ProgressView
from cbgen.frontends.prompting import encode
from cbgen.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--width", type=int, default=118)
    args = ap.parse_args()
    loaded = load_model(ModelConfig())
    engine = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=8))
    rows = [json.loads(x) for x in (ROOT / ".." / "shared" / "bench" / "prompts-dev.jsonl").read_text().splitlines()]
    for r in rows[: args.prompts]:
        engine.add_request(r["id"], encode(loaded.tokenizer, messages=r["messages"]), SamplingParams(max_new_tokens=256))
    view = ProgressView(engine, max_lines=10)
    for _ in range(args.steps):
        for o in engine.step():
            view.observe(o)
            if o.finished:
                view.record_done()
    view.total = args.prompts
    console = Console(record=True, width=args.width, force_terminal=False)
    console.print(view.render())


if __name__ == "__main__":
    main()
