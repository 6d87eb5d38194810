"""Smoke test of the bench machinery on the tiny random llama: shapes and sanity, no timing asserts."""

from __future__ import annotations

import json

import pytest

from cbgen.config import ModelConfig


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    lines = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is the capital of Spain? {i}"}]}
             for i in range(6)]
    lines.append({"id": "plain", "prompt": "The quick brown fox"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """The bench on 1 torch thread (tiny ops; robust when other tests load the CPU), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_quick_on_tiny_model(tiny_loaded, prompt_file, tmp_path, one_thread):
    from cbgen.bench import BenchOptions, run_bench
    from cbgen.bench.report import markdown
    from cbgen.models import load_model

    def load(impl):  # a fresh copy per system: cbgen and generate_batch switch the attention implementation
        return load_model(ModelConfig(model=str(tiny_loaded.path), dtype="float32", device="cpu", impl=impl))

    opts = BenchOptions.quick(prompts=str(prompt_file), out=str(tmp_path), uniform_n=4, uniform_m=6, real_n=4,
                              real_max_new_tokens=8, batch_size=2, hf_max_prompts=2, arrivals_n=4, rate=50.0,
                              concurrency=(1, 2), decode_steps=2, busy=2, probes=2,
                              workloads=("uniform", "real", "arrivals", "concurrency", "busy"))
    result = run_bench(opts, load=load)

    w = result["workloads"]
    for name in ("uniform", "real"):
        rows = {r["system"]: r for r in w[name]["systems"]}
        assert set(rows) == {"hf", "static", "generate_batch", "cbgen"}
        for r in rows.values():
            assert r["tok_s"] > 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 0
            assert r["generated_tokens"] >= r["measured_requests"]
            assert r["ttft_p50_s"] is not None and r["ttft_p50_s"] >= 0
        assert set(w[name]["ratios"]) == {"hf", "static", "generate_batch"}
    uni = {r["system"]: r for r in w["uniform"]["systems"]}
    assert uni["cbgen"]["generated_tokens"] == 4 * 6          # EOS ignored: exactly m each
    assert uni["static"]["generated_tokens"] == 4 * 6
    assert uni["hf"]["measured_requests"] == 2 and uni["hf"]["extrapolated"]
    assert w["arrivals"]["result"]["measured_requests"] == 4
    assert [c["concurrency"] for c in w["concurrency"]["levels"]] == [1, 2]
    assert all(c["tok_s"] > 0 for c in w["concurrency"]["levels"])
    assert w["busy"]["probes"] == 2 and w["busy"]["ttft_p50_s"] >= 0
    assert {t["target"] for t in result["targets"]}
    saved = json.loads(open(result["json_path"], encoding="utf-8").read())
    assert saved["targets"] == result["targets"]
    assert "png" in w["concurrency"]["plot"] or "skipped" in w["concurrency"]["plot"]
    assert "| cbgen |" in markdown(result)


def test_repeats_run_round_robin_with_paired_ratios(tiny_loaded, prompt_file, tmp_path, one_thread):
    from cbgen.bench import BenchOptions, run_bench
    from cbgen.bench.report import markdown
    from cbgen.models import load_model

    loads = []

    def load(impl):
        loads.append(impl)
        return load_model(ModelConfig(model=str(tiny_loaded.path), dtype="float32", device="cpu", impl=impl))

    opts = BenchOptions.quick(prompts=str(prompt_file), out=str(tmp_path), uniform_n=3, uniform_m=4,
                              workloads=("uniform",), systems=("static", "cbgen"), repeats=3)
    result = run_bench(opts, load=load, write=False)
    u = result["workloads"]["uniform"]
    assert loads == ["transformers", "auto"]             # one model per system, kept for all rounds
    assert all(len(r["rounds_tok_s"]) == 3 for r in u["systems"])
    p = u["paired_ratios"]["static"]
    assert len(p["per_round"]) == 3 and p["min"] <= p["median"]
    target = next(t for t in result["targets"] if t["target"].startswith("uniform: cbgen >= 2x HF static"))
    assert target["measured"] == p["median"]
    assert "per round (back to back)" in markdown(result)
    with pytest.raises(ValueError, match="repeats"):
        BenchOptions(repeats=0)


def test_bench_options_reject_unknown_names():
    from cbgen.bench import BenchOptions

    with pytest.raises(ValueError, match="workloads"):
        BenchOptions(workloads=("nope",))
    with pytest.raises(ValueError, match="systems"):
        BenchOptions(systems=("vllm",))


def test_percentile_and_agreement():
    from cbgen.bench.measure import percentile
    from cbgen.bench.report import agreement

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([], 50) is None
    ag = agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert ag["exact"] == 1 and ag["compared"] == 2 and ag["prefix_frac"] == 0.75
