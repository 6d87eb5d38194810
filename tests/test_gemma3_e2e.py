"""Gemma 3 270M (base, Q4_K_M GGUF from PyPI) end to end: resolve by short name, convert,
serve natively with its interleaved sliding-window layers, and match HF ``generate``.

Skips, with the install command, when the packages are absent (``make install`` has them).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.models.packaged import PACKAGED, installed

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not installed("gemma-3-270m"),
                                 reason=f"Gemma 3 270M is not installed: {PACKAGED['gemma-3-270m'].install}")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at", "import numpy as np\n",
           "The largest planet in our solar system is", "In 1969, the first person to walk on the Moon"]
# One prompt past the 512-token window of the sliding layers.
LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(60)) \
    + " The box that holds the most stones is"


@pytest.fixture(scope="module")
def gemma():
    """(native load, transformers load) of the same converted files, float32."""
    from cbgen.models import load_model
    native = load_model(ModelConfig(model="gemma-3-270m", dtype="float32", device="cpu"),
                        status=lambda m: print(f"[cbgen] {m}"))
    hf = load_model(ModelConfig(model="gemma-3-270m", dtype="float32", device="cpu", impl="transformers"))
    return native, hf


def test_spec_and_info_show_the_interleaved_layers(gemma):
    from cbgen.models import model_info
    native, _ = gemma
    spec = native.spec
    assert spec.architecture == "gemma3_text" and native.serving == "native"
    assert spec.num_layers == 18 and spec.sliding_windows.count(512) == 15
    assert {layer.rope_theta for layer in spec.layers} == {10_000.0, 1_000_000.0}
    info = model_info(native)
    assert info["attention"] == "15 sliding (512), 3 full; pattern 5 sliding (512) : 1 full"
    assert info["implementation"].startswith("cbgen native")


def test_greedy_matches_hf_generate_under_concurrency(gemma):
    from helpers import hf_greedy

    from cbgen.engine.engine import Engine
    native, hf = gemma
    tok = native.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS + [LONG]]
    assert len(prompts[-1]) > 512
    eng = Engine.from_loaded(native, EngineConfig(max_num_seqs=8, max_num_batched_tokens=128))
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=24, min_new_tokens=24))
    same = sum(o.token_ids == hf_greedy(hf.model, p, 24) for o, p in zip(outs, prompts))
    assert same >= len(prompts) - 1, f"{same}/{len(prompts)} token-identical to HF generate"


def test_cbgen_run_serves_32_raw_prompts(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                                       "max_tokens": 16}) + "\n" for i in range(32)))
    proc = subprocess.run([sys.executable, "-m", "cbgen.cli", "run", str(src), "--model", "gemma-3-270m",
                           "--max-num-seqs", "32", "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1500:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 32 and all(r["error"] is None and r["text"] for r in records)
