"""The transformers fallback (engine/hf_fallback.py): architectures the paged engine does not
serve run correctly through ``cbgen run``; what cannot run at all is refused in one line.

The oracle is transformers' own ``generate`` (greedy) and a full forward (logprobs) on the
same saved weights. The tiny models are random (``helpers.sharpen``: larger weights, so the
output depends on the whole context) and saved with the conftest BPE tokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.hf_fallback import TransformersFallback, checkpoint_refusal, fallback_notice, make_fallback
from cbgen.engine.runner import UnsupportedModelError
from cbgen.engine.scheduler import Scheduler
from cbgen.frontends.prompting import encode_prompt
from conftest import build_tiny_tokenizer
from helpers import drain, hf_greedy, sharpen

REPO = Path(__file__).resolve().parents[1]
NEW = 12                       # greedy tokens per prompt
BLOCK = 16                     # EngineConfig.block_size (the CLI default)
PROMPTS = [
    "Paris is",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Continuous batching lets a server keep its accelerator busy: new requests join the running batch",
    "What is the capital of Spain? Madrid is the capital of Spain, and it is known for",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def _gpt_neox(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


ARCHS = {"gpt2": _gpt2, "gpt_neox": _gpt_neox}


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    """(model dir, the model as transformers loads it back, tokenizer) for one architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tmp_path_factory.mktemp(request.param)
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    sharpen(ARCHS[request.param](tok).eval()).save_pretrained(path)
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == request.param
    return path, model, AutoTokenizer.from_pretrained(path)


def _bytes_per_block(model) -> int:
    return make_fallback(model).spec.kv_bytes_per_token * BLOCK


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' own forward over ``ids``: [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _check_sample(model, prompt: list[int], entries: list[dict]) -> None:
    """One sample's logprob entries: its tokens are HF's greedy ones, each logprob HF's."""
    got = [e["token_id"] for e in entries]
    assert got == hf_greedy(model, prompt, NEW)
    lp = _full_logprobs(model, prompt + got)
    for i, e in enumerate(entries):
        assert e["logprob"] == pytest.approx(lp[len(prompt) - 1 + i, got[i]].item(), abs=1e-4)


def _run(args, input=None):
    return CliRunner().invoke(app, ["run", *args], input=input, catch_exceptions=False)


def _write(tmp_path, lines) -> str:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return str(p)


class _Count:
    """Counts calls of a real method (it still runs)."""

    def __init__(self, monkeypatch, cls, name: str) -> None:
        self.n = 0
        real = getattr(cls, name)

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)
        monkeypatch.setattr(cls, name, counted)


# ---- through `cbgen run` -------------------------------------------------------

def test_cli_greedy_matches_generate_under_concurrency_chunking_and_preemption(tiny, tmp_path, monkeypatch):
    path, model, tok = tiny
    preempts = _Count(monkeypatch, Scheduler, "_preempt")
    steps = _Count(monkeypatch, TransformersFallback, "_step")
    lines = [{"id": f"p{i}", "prompt": p, "max_new_tokens": NEW, "ignore_eos": True} for i, p in enumerate(PROMPTS)]
    # 5 blocks of 16 tokens: two of the long prompts (33 and 24 tokens, +12) running at once overflow it.
    gb = 5 * _bytes_per_block(model) / 2**30
    r = _run([_write(tmp_path, lines), "--model", str(path), "--dtype", "float32", "-q", "--logprobs",
              "--prompt-logprobs", "1", "--max-num-seqs", "4", "--max-batched-tokens", "16",
              "--kv-cache-gb", f"{gb:.12f}"])
    assert r.exit_code == 0, r.stderr
    notice = fallback_notice(model.config.model_type)
    assert r.stderr.count(notice) == 1 and r.stderr.strip() == notice, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in recs] == [f"p{i}" for i in range(len(PROMPTS))]   # one record per input
    assert preempts.n > 0, "the tiny pool must force a preemption (and a recompute from position 0)"
    assert steps.n > 0
    for rec, text in zip(recs, PROMPTS):
        prompt = encode_prompt(tok, text)
        assert rec["finish_reason"] == "length" and rec["error"] is None
        assert rec["usage"]["completion_tokens"] == NEW
        _check_sample(model, prompt, rec["logprobs"])
        # Prompt logprobs come from rows inside prefill chunks (prompts longer than the 16-token budget).
        lp = _full_logprobs(model, prompt)
        assert rec["prompt_logprobs"][0] is None and len(rec["prompt_logprobs"]) == len(prompt)
        for i, e in enumerate(rec["prompt_logprobs"][1:], start=1):
            assert e["token_id"] == prompt[i]
            assert e["logprob"] == pytest.approx(lp[i - 1, prompt[i]].item(), abs=1e-4)
    assert max(len(encode_prompt(tok, p)) for p in PROMPTS) > 16, "some prompt is prefilled in chunks"


def test_cli_n_samples_each_have_their_own_cache(tiny, tmp_path):
    path, model, tok = tiny
    lines = [{"id": "a", "prompt": PROMPTS[1], "max_new_tokens": NEW, "ignore_eos": True},
             {"id": "b", "prompt": PROMPTS[3], "max_new_tokens": NEW, "ignore_eos": True}]
    r = _run([_write(tmp_path, lines), "--model", str(path), "--dtype", "float32", "-q", "--logprobs",
              "--samples", "3"])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in recs] == ["a", "b"]
    for rec, text in zip(recs, (PROMPTS[1], PROMPTS[3])):
        assert [c["index"] for c in rec["choices"]] == [0, 1, 2]
        for c in rec["choices"]:   # greedy: every sample is generate's answer
            _check_sample(model, encode_prompt(tok, text), c["logprobs"])


def test_cli_second_ctrl_c_aborts_the_running_sequences(tiny, tmp_path):
    path, _, _ = tiny
    lines = [{"id": "quick", "prompt": "x", "max_new_tokens": 1}]
    lines += [{"id": f"c{i}", "prompt": "x", "max_new_tokens": 900, "ignore_eos": True} for i in range(5)]
    p = subprocess.Popen([sys.executable, "-m", "cbgen.cli", "run", _write(tmp_path, lines), "--model", str(path),
                          "--dtype", "float32", "--max-num-seqs", "3", "--order", "finish"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert json.loads(p.stdout.readline())["id"] == "quick"   # generation is under way
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    err = err.decode()
    recs = [json.loads(line) for line in out.decode().splitlines()]
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.count("runs on the transformers fallback") == 1, err
    assert [r["finish_reason"] for r in recs] == ["abort"] * 3
    assert all(0 < r["usage"]["completion_tokens"] < 900 for r in recs)


# ---- the engine around it ------------------------------------------------------

def _engine(model, tok, impl="auto", **cfg) -> Engine:
    return Engine(model, tok, EngineConfig(**cfg), impl=impl, eos_token_ids=(tok.eos_token_id,))


def test_engine_uses_the_fallback_without_prefix_caching_or_pool(tiny):
    _, model, tok = tiny
    eng = _engine(model, tok)
    fb = eng.runner.model
    assert isinstance(fb, TransformersFallback) and not fb.spec.kv_pool
    assert eng.notice == fallback_notice(model.config.model_type)
    assert not eng.block_manager.enable_prefix_caching and not eng.config.enable_prefix_caching
    assert eng.runner.kv == [] and eng.runner.kernel is None
    # The block manager bounds the fallback's own caches: kv_cache_gb / (bytes per token * block size).
    cfg = eng.config
    assert eng.block_manager.num_blocks == min(int(cfg.kv_cache_gb * 2**30) // (fb.spec.kv_bytes_per_token * BLOCK),
                                               cfg.max_num_seqs * -(-1024 // BLOCK) + 1)
    with pytest.raises(UnsupportedModelError, match="attention='native' is unavailable"):
        _engine(model, tok, attention="native")
    with pytest.raises(UnsupportedModelError, match=f"impl='native' is unavailable: model type '{model.config.model_type}' has no native"):
        _engine(model, tok, impl="native")
    with pytest.raises(UnsupportedModelError, match=f"impl='transformers' is unavailable: model type '{model.config.model_type}' does not run"):
        _engine(model, tok, impl="transformers")


def test_engine_preemption_and_abort_release_caches(tiny, monkeypatch):
    _, model, tok = tiny
    released: list[tuple[str, int]] = []
    real_release = TransformersFallback.release

    def release(self, key):
        released.append(key)
        real_release(self, key)
    monkeypatch.setattr(TransformersFallback, "release", release)
    eng = _engine(model, tok, max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=5)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    eng.add_request("gone", prompts[1], SamplingParams(max_new_tokens=500, ignore_eos=True))
    for i, ids in enumerate(prompts):
        eng.add_request(f"r{i}", ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert ("gone", 0) in eng.runner.model._caches, "running when aborted"
    eng.abort("gone")
    finals = drain(eng)
    assert finals[("gone", 0)].finish_reason.value == "abort"
    assert eng.scheduler.num_preemptions > 0
    for i, ids in enumerate(prompts):
        assert finals[(f"r{i}", 0)].token_ids == hf_greedy(model, ids, NEW)
    assert eng.runner.model.num_live_caches == 0, "every finished, aborted or preempted sequence's cache is freed"
    assert set(released) == {(f"r{i}", 0) for i in range(len(prompts))} | {("gone", 0)}
    assert len(released) >= len(prompts) + 1 + eng.scheduler.num_preemptions, "preempted ones are released too"


def test_fallback_on_llama_samples_as_the_paged_engine_does(sharp):
    """The same seeded samples (n=3) and logprobs from the fallback and from the paged engine."""
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=3, n=3, logprobs=2)
    prompts = [sharp.tokenizer.encode(p) for p in PROMPTS[:3]]
    results = []
    for model in (make_fallback(sharp.model), sharp.model):
        eng = Engine(model, sharp.tokenizer, EngineConfig(max_num_batched_tokens=16, max_num_seqs=8),
                     eos_token_ids=(sharp.tokenizer.eos_token_id,))
        assert isinstance(eng.runner.model, TransformersFallback) == (model is not sharp.model)
        for i, ids in enumerate(prompts):
            eng.add_request(str(i), ids, params)
        results.append(drain(eng))
    fallback, paged = results
    assert fallback.keys() == paged.keys() and len(paged) == 9
    for key, out in paged.items():
        assert fallback[key].token_ids == out.token_ids, key
        assert [p.chosen.logprob for p in fallback[key].logprobs] == pytest.approx(
            [p.chosen.logprob for p in out.logprobs], abs=1e-4)


def test_a_continuation_without_its_cache_is_an_error(tiny):
    from cbgen.engine.attention import BatchSequence, PagedBatch
    _, model, _ = tiny
    fb = make_fallback(model)
    batch = PagedBatch([], BLOCK, *[None] * 3, 0, None, None, None, None, [], None,
                       sequences=(BatchSequence(("x", 0), 0, 1, 5),))
    with pytest.raises(RuntimeError, match=r"continues at position 5 but its cache holds 0 tokens"):
        fb.forward(torch.tensor([3]), torch.tensor([5]), batch, torch.tensor([0]))


# ---- refusals: what cannot run at all, in one line -----------------------------

def _tiny_config(kind: str):
    from transformers import BartConfig, BertConfig, T5Config
    small = dict(vocab_size=100)
    if kind == "bart":
        return BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, **small)
    if kind == "t5":
        return T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, **small)
    return BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **small)


@pytest.mark.parametrize("kind, cls, why", [
    ("bert", "BertLMHeadModel", "attends both ways"),                     # a masked LM as a causal LM
    ("t5", "T5ForConditionalGeneration", "is an encoder-decoder"),
    ("bert", "BertModel", "has no language-model head"),
])
def test_engine_refuses_what_cannot_run(kind, cls, why):
    import transformers
    model = getattr(transformers, cls)(_tiny_config(kind)).eval()
    with pytest.raises(UnsupportedModelError, match=why) as e:
        Engine(model, build_tiny_tokenizer())
    assert "\n" not in str(e.value)


def test_cli_refuses_checkpoints_that_cannot_run(tmp_path):
    bart = tmp_path / "bart"
    _tiny_config("bart").save_pretrained(bart)   # AutoModelForCausalLM would load just its decoder
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "acme_lm", "architectures": ["AcmeForCausalLM"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_acme.Acme"}}))
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    src = _write(tmp_path, [{"prompt": "hi"}])
    for path, why in [(bart, "'bart' is an encoder-decoder"), (remote, "needs the checkpoint's own Python code"),
                      (vit, "'vit' has no causal-LM class")]:
        assert why in checkpoint_refusal(path)
        r = _run([src, "--model", str(path), "-q"])
        assert r.exit_code == 2, r.stdout
        assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert checkpoint_refusal(tmp_path) is None   # no config.json: the loader says what is wrong
