"""--deterministic (EngineConfig.deterministic; cbgen/engine/batch_invariant.py).

With it, a request's tokens and logprobs (compared bit for bit) must not depend on the
batch size, its position in the batch, the other requests, chunked-prefill boundaries,
prefix-cache hits, preemption and recompute, or the thread count. Checked on tiny random
llama, Mistral (sliding window) and Gemma 3 models, float32 and bfloat16, greedy and
seeded sampling.

The harness also flips each source of variance on its own (deterministic off, or one
of its two fixes taken out) and shows it changes bits: where a source does not show on
this CPU (a GEMM library that happens to be row-invariant here), that test skips and
says so, rather than pass without having checked anything.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import native_or_skip, sharpen

from cbgen.config import EngineConfig, SamplingParams, cache_root
from cbgen.engine import paged_kernel
from cbgen.engine.batch_invariant import row_tile_for, tiled
from cbgen.engine.engine import Engine

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    return native_or_skip(paged_kernel.load(cache_root() / "kernels"), "native attention kernel")


# ---- the op: a tiled GEMM ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(256, 768), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("how", ["per tile", "weight given (bmm in float32)"])
def test_tiled_linear_rows_do_not_depend_on_the_batch_or_threads(dtype, K, N, how):
    """Row r of ``tiled`` is the same bits whatever T, its position and the thread count."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    x = torch.randn(300, K, generator=g).to(dtype)
    tile = row_tile_for(dtype)

    def lin(t, tile):
        return tiled(lambda u: F.linear(u, w), t, tile, w if how != "per tile" else None)

    ref = lin(x[:1], tile)[0]
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, 3, threads}):
            torch.set_num_threads(n)
            for T in (1, 2, 3, 5, 16, 17, 64, 65, 300):
                rows = torch.cat([x[1:T], x[:1]]) if T > 1 else x[:1]   # row 0 last
                assert torch.equal(lin(rows, tile)[T - 1], ref), (n, T)
                if T > 2:   # and in the middle
                    mid = torch.cat([x[1:T // 2 + 1], x[:1], x[T // 2 + 1:T]])
                    assert torch.equal(lin(mid, tile)[T // 2], ref), (n, T)
    finally:
        torch.set_num_threads(threads)


def test_tiled_linear_equals_the_plain_one_up_to_rounding():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    x = torch.randn(37, 24, generator=g)
    got = tiled(lambda t: F.linear(t, w, b), x, 16)
    assert got.shape == (37, 40)
    torch.testing.assert_close(got, F.linear(x, w, b))
    torch.testing.assert_close(tiled(None, x, 16, w, b), F.linear(x, w, b))   # float32: one bmm


# ---- the engine --------------------------------------------------------------

def _llama(tok, dtype, **over):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kind = over.pop("kind", "llama")
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=True, **over)
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=24, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return sharpen(model.eval(), std=0.08).to(dtype)


def _gemma(tok, dtype):
    from test_gemma3 import tiny_gemma3

    return tiny_gemma3(tok, hidden_size=128, head_dim=64, query_pre_attn_scalar=64).to(dtype)


MODELS = {
    "llama-float32": lambda tok: _llama(tok, torch.float32),
    "llama-bfloat16": lambda tok: _llama(tok, torch.bfloat16),
    "mistral-window-float32": lambda tok: _llama(tok, torch.float32, kind="mistral"),
    "gemma3-bfloat16": lambda tok: _gemma(tok, torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(MODELS))
def loaded(request, sharp):
    return dataclasses.replace(sharp, model=MODELS[request.param](sharp.tokenizer))


def _prompts(tok) -> list[list[int]]:
    """Eight prompts of 5-70 tokens (past the Mistral window and a few KV blocks)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge its form".split()
    out = []
    for i in range(8):
        text = " ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i * 9))
        out.append(tok(text)["input_ids"])
    return out


def _engine(loaded, **cfg) -> Engine:
    cfg.setdefault("deterministic", True)
    cfg.setdefault("max_num_seqs", 16)
    return Engine.from_loaded(loaded, EngineConfig(**cfg))


def _outputs(eng: Engine, jobs, arrive_every: int = 0) -> dict[str, tuple[list[int], list[float]]]:
    """Run ``jobs`` ((id, prompt, params)); with ``arrive_every`` one job joins every that many
    steps. {id: (token ids, logprob of each)} for ids not starting with "other"."""
    pending = list(jobs)
    finals = {}
    step = 0
    while pending or eng.has_unfinished:
        if pending and (not arrive_every or step % arrive_every == 0):
            rid, ids, params = pending.pop(0)
            eng.add_request(rid, ids, params)
            if not arrive_every:
                continue
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o
        step += 1
    return {rid: (o.token_ids, [e.chosen.logprob for e in o.logprobs]) for rid, o in finals.items()
            if not rid.startswith("other")}


def _scenarios(loaded, params):
    """Every way the issue lists of running the same prompts; each -> {id: (tokens, logprobs)}."""
    tok = loaded.tokenizer
    prompts = _prompts(tok)
    jobs = [(f"p{i}", p, params) for i, p in enumerate(prompts)]
    others = [(f"other{i}", p[::-1] + p, params) for i, p in enumerate(prompts)]
    out = {}
    alone = {}
    for job in jobs:   # one at a time
        alone.update(_outputs(_engine(loaded, max_num_seqs=1), [job]))
    out["alone"] = alone
    out["batch"] = _outputs(_engine(loaded), jobs)
    out["reversed, with others"] = _outputs(_engine(loaded), others[:3] + jobs[::-1] + others[3:])
    out["arriving over time"] = _outputs(_engine(loaded), [x for pair in zip(others, jobs) for x in pair],
                                         arrive_every=2)
    out["chunked prefill (16)"] = _outputs(_engine(loaded, max_num_batched_tokens=16), jobs)
    eng = _engine(loaded)
    _outputs(eng, jobs)
    out["prefix cache warm"] = _outputs(eng, jobs)
    assert eng.stats().prefix_hit_rate > 0
    eng = _engine(loaded, num_kv_blocks=12, max_num_batched_tokens=32)
    out["preemption"] = _outputs(eng, jobs)
    assert eng.stats().num_preemptions > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        out["other thread count"] = _outputs(_engine(loaded), jobs)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_deterministic_outputs_do_not_depend_on_the_batch(loaded, params):
    runs = _scenarios(loaded, params)
    ref = runs.pop("alone")
    assert len(ref) == 8 and all(len(t) == 12 for t, _ in ref.values())
    for name, got in runs.items():
        diff = [rid for rid in ref if got[rid] != ref[rid]]
        assert not diff, f"{name}: {diff} differ from running alone"


def _alone_and_batch(loaded, fix):
    """The prompts one at a time and all at once, deterministic with one fix taken out."""
    jobs = [(f"p{i}", p, GREEDY) for i, p in enumerate(_prompts(loaded.tokenizer))]

    def engine(**cfg):
        eng = _engine(loaded, **cfg)
        fix(eng.runner)
        return eng
    alone = {}
    for job in jobs:
        alone.update(_outputs(engine(max_num_seqs=1), [job]))
    return alone, _outputs(engine(), jobs), _outputs(engine(max_num_batched_tokens=16), jobs)


def test_the_harness_can_fail_flag_off(loaded):
    """Without the flag, chunked prefill moves prompt tokens' attention between SDPA and the kernel."""
    alone, batch, chunked = _alone_and_batch(loaded, lambda r: r.set_deterministic(False))
    assert chunked != batch, "chunked prefill changed nothing without the flag"


def test_source_1_alone_gemm_tiles_taken_out(loaded):
    """Per-token attention kept, plain GEMMs: the batch size shows wherever the GEMM library
    is not row-invariant for the model's shapes and dtype."""
    def no_tiles(runner):
        runner.row_tile = None
    alone, batch, chunked = _alone_and_batch(loaded, no_tiles)
    if alone == batch == chunked:
        pytest.skip(f"plain {loaded.model.dtype} GEMMs of this model were row-invariant on this CPU")
    assert alone != batch or alone != chunked


def test_source_2_alone_per_token_attention_taken_out(loaded):
    """Tiled GEMMs kept, prefill chunks through SDPA again: the chunk boundaries show."""
    def no_per_token(runner):
        runner.per_token_attention = False
    alone, batch, chunked = _alone_and_batch(loaded, no_per_token)
    assert batch != chunked


# ---- the CLI -----------------------------------------------------------------

def _cli(args, input=None):
    from typer.testing import CliRunner

    from cbgen.cli import app
    return CliRunner().invoke(app, ["run", *args], input=input, catch_exceptions=False)


def test_cli_run_deterministic_same_records_alone_and_together(tiny_model_dir, tmp_path):
    import json

    lines = [json.dumps({"id": f"q{i}", "prompt": "the quick brown fox " * (i + 1), "max_tokens": 8,
                         "temperature": 0.8, "seed": 7, "logprobs": 0}) for i in range(6)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    base = ["--model", str(tiny_model_dir), "--dtype", "float32", "-q", "--deterministic"]
    got = {}
    for seqs in ("1", "6"):
        r = _cli([str(tmp_path / "in.jsonl"), *base, "--max-num-seqs", seqs, "--max-batched-tokens", "16"])
        assert r.exit_code == 0, r.stderr
        got[seqs] = {d["id"]: (d["text"], d["logprobs"]) for d in map(json.loads, r.stdout.splitlines())}
    assert len(got["1"]) == 6 and got["1"] == got["6"]


@pytest.mark.parametrize("extra, why", [
    (["--attention", "torch"], "error: --attention='torch' is invalid: expected auto or native with --deterministic"),
    (["--impl", "transformers"], "error: deterministic needs cbgen's native forward"),
])
def test_cli_run_deterministic_refused_in_one_line(tiny_model_dir, extra, why):
    r = _cli(["-", "--model", str(tiny_model_dir), "--dtype", "float32", "-q", "--deterministic", *extra],
             input="hello\n")
    assert r.exit_code == 2
    assert r.stderr.strip().startswith(why) and len(r.stderr.strip().splitlines()) == 1, r.stderr
