"""Structured output on the embedded SmolLM2 (greedy, float32): JSON extraction validated
with jsonschema, free lines unchanged by constrained neighbours, regex / choice / Lark."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import run_to_end
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.outputs import FinishReason
from cbgen.engine.structured_params import StructuredOutputsParams as S

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
DEV_PROMPTS = REPO.parent.parent / "shared" / "bench" / "prompts-dev.jsonl"
jsonschema = pytest.importorskip("jsonschema")


def _extraction():
    spec = importlib.util.spec_from_file_location("make_extraction", REPO / "benchmarks" / "make_extraction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dev_prompts() -> Path:
    for p in (DEV_PROMPTS, Path("/work/shared/bench/prompts-dev.jsonl")):
        if p.is_file():
            return p
    pytest.skip("dev prompts not found (../shared/bench/prompts-dev.jsonl)")


@pytest.fixture(scope="module")
def loaded(embedded_model):
    """The embedded model as `cbgen run` loads it (native forward where supported), float32."""
    from cbgen.config import ModelConfig
    from cbgen.models import load_model
    return load_model(ModelConfig(dtype="float32"))


@pytest.fixture(scope="module")
def eng(loaded):
    return Engine.from_loaded(loaded, EngineConfig(max_num_seqs=32))


def _chat(loaded, text: str) -> list[int]:
    from cbgen.frontends.prompting import encode
    return encode(loaded.tokenizer, prompt=None, messages=[{"role": "user", "content": text}])


def _finals(eng: Engine, jobs) -> dict[str, object]:
    return {rid: o for (rid, _), o in run_to_end(eng, jobs).items()}


def test_extraction_outputs_that_stop_validate_against_their_schema(tmp_path, embedded_model):
    """The 'must show' job through `cbgen run` (24 of the 64 lines here for CI time;
    benchmarks/structured_speed.py runs all 64 and reports the same figures)."""
    mk = _extraction()
    lines = mk.extraction_lines(str(_dev_prompts()), 24)
    src = tmp_path / "extraction.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = CliRunner().invoke(app, ["run", str(src), "-n", "96", "--dtype", "float32", "--no-progress"],
                           catch_exceptions=False)
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == len(lines) and r.exit_code == 0, r.stderr
    stopped = [x for x in recs if x["finish_reason"] == "stop"]
    cut = [x for x in recs if x["finish_reason"] == "length"]
    print(f"\nextraction: {len(stopped)} stop, {len(cut)} length cuts of {len(recs)}")
    assert len(stopped) + len(cut) == len(recs) and len(stopped) >= len(recs) // 2
    for x in stopped:   # 100% of the outputs that finish with stop parse and validate
        assert x["structured"]["complete"] is True
        value = json.loads(x["text"])
        jsonschema.validate(value, mk.SCHEMA)
        assert x["parsed"] == value
    for x in cut:       # never reported as valid
        assert x["parsed"] is None and x["structured"]["complete"] is False
    if cut:
        assert f"warning: {len(cut)} constrained" in r.stderr


def test_free_lines_are_token_identical_without_the_constrained_lines(eng, loaded):
    texts = ["Name three fruits.", "What is the capital of France?", "Write a haiku about rain.",
             "Explain gravity in one sentence.", "Give me a tip for sleeping better.", "What is 12 times 7?"]
    schema = _extraction().SCHEMA
    free = [(f"free{i}", _chat(loaded, t), SamplingParams(max_new_tokens=24), None)
            for i, t in enumerate(texts)]
    constrained = [(f"json{i}", _chat(loaded, f"Return JSON about: {t}"), SamplingParams(max_new_tokens=24),
                    S.json_schema(schema)) for i, t in enumerate(texts)]
    alone = _finals(eng, free)
    mixed = _finals(eng, [x for pair in zip(constrained, free) for x in pair])
    for rid, o in alone.items():
        assert mixed[rid].token_ids == o.token_ids, rid
    assert all(mixed[f"json{i}"].text.startswith('{"title": ') for i in range(len(texts)))


def test_regex_iso_date(eng, loaded):
    iso = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    o = _finals(eng, [("date", _chat(loaded, "When did Apollo 11 land on the Moon? Answer with the date."),
                       SamplingParams(max_new_tokens=16), S("regex", iso))])["date"]
    assert re.fullmatch(iso, o.text) and o.finish_reason is FinishReason.STOP and o.structured_complete


def test_choice_label_set(eng, loaded):
    labels = ["positive", "neutral", "negative"]
    reviews = {"good": "I absolutely love this phone, it is fantastic!",
               "bad": "This was the worst meal I have ever had. Terrible."}
    outs = _finals(eng, [(k, _chat(loaded, f"Classify the sentiment of this review: {v}"),
                          SamplingParams(max_new_tokens=8), S.choice(labels)) for k, v in reviews.items()])
    for o in outs.values():
        assert o.text in labels and o.finish_reason is FinishReason.STOP and o.structured_complete
    assert outs["good"].text == "positive"


def test_small_lark_grammar(eng, loaded):
    grammar = 'start: answer ", because " REASON\nanswer: "yes" | "no"\nREASON: /[a-z ]{1,40}/'
    o = _finals(eng, [("lark", _chat(loaded, "Is the sky blue? Answer yes or no and say why."),
                       SamplingParams(max_new_tokens=24), S("grammar", grammar))])["lark"]
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,40}", o.text), o.text
    assert o.structured_complete is (o.finish_reason is FinishReason.STOP)
