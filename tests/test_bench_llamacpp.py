"""llama.cpp as a bench system: parsing of real captured output (tests/data/llamacpp/README.md), the
skip-with-note path, and the real llama-server on the embedded GGUF (skipped when not built). No timing asserts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cbgen.bench import llamacpp as lc
from cbgen.bench.workloads import Workload

DATA = Path(__file__).parent / "data" / "llamacpp"
# ChatML of "Say hi." with SmolLM2's default system prompt, in the embedded GGUF's vocab (llama-server /tokenize).
SAY_HI = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
          8182, 2, 198, 1, 4093, 198, 36218, 15876, 30, 2, 198, 1, 520, 9531, 198]


def _lines(name: str) -> list[bytes]:
    return (DATA / name).read_bytes().splitlines(keepends=True)


def test_parse_llama_bench_json():
    [r] = lc.parse_llama_bench((DATA / "llama-bench-decode.json").read_text())
    raw = json.loads((DATA / "llama-bench-decode.json").read_text())[0]
    assert r.gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and r.model_type == "llama 256M Q4_1"
    assert (r.n_gen, r.repetitions, r.threads) == (8, 2, 2)
    assert r.ms_per_token == pytest.approx(raw["avg_ns"] / 8 / 1e6)
    assert r.samples_ms_per_token == pytest.approx([s / 8 / 1e6 for s in raw["samples_ns"]])
    assert r.tok_s == pytest.approx(1000 / r.ms_per_token)
    # a prompt-processing test is not a decode figure; output that is not llama-bench's is an error
    pp = dict(raw, n_prompt=512, n_gen=0)
    assert lc.parse_llama_bench(json.dumps([pp, raw]))[0].n_gen == 8
    with pytest.raises(ValueError, match="no decode test"):
        lc.parse_llama_bench(json.dumps([pp]))
    with pytest.raises(ValueError, match="not JSON"):
        lc.parse_llama_bench("| model | size |")


def test_collect_stream_natural_eos():
    ticks = iter(range(100))
    c = lc.collect_stream(_lines("completion-stream-eos.txt"), clock=lambda: next(ticks))
    assert c.stop_type == "eos" and c.tokens_predicted == 30 == len(c.token_ids)
    assert c.token_ids[-1] == 2                      # <|im_end|>: the EOS is streamed and counted
    assert c.timings["predicted_n"] == 30 and c.timings["prompt_n"] == 33
    assert (c.first_token_at, c.finished_at) == (0, 1)   # stamped at the first token and at the final event


def test_collect_stream_limit_and_errors():
    c = lc.collect_stream(_lines("completion-stream-limit.txt"))
    assert c.stop_type == "limit" and c.tokens_predicted == 8 == len(c.token_ids)
    assert c.first_token_at <= c.finished_at
    assert lc.parse_event(b"\n") is None
    with pytest.raises(ValueError, match="without a final"):
        lc.collect_stream(_lines("completion-stream-limit.txt")[:-2])   # cut before the stop event
    err = json.loads((DATA / "completion-error-400.json").read_text())
    assert lc.error_message(err) == ("llama-server: Prompt contains invalid tokens (HTTP 400, "
                                     "invalid_request_error)")
    with pytest.raises(lc.LlamaCppError, match="invalid tokens"):
        lc.collect_stream([b"data: " + json.dumps(err).encode() + b"\n"])


def test_request_body_and_ctx():
    wl = Workload("real", [[1, 2, 3], list(range(300))], 256, ignore_eos=False)
    body = lc.completion_body(wl.prompts[0], wl)
    assert body == {"prompt": [1, 2, 3], "n_predict": 256, "temperature": 0.0, "ignore_eos": False,
                    "return_tokens": True, "stream": True}
    assert lc.server_ctx(wl, 4) == 4 * 768           # 300 + 256 per slot, rounded up to 256


def test_missing_binaries_skip_with_a_note(tmp_path, monkeypatch):
    from cbgen.bench.suite import BenchOptions, _llamacpp

    monkeypatch.setenv("CBGEN_LLAMACPP_BIN", str(tmp_path))
    opts = BenchOptions.quick(systems=("cbgen", "llama-server", "llama-bench"), workloads=("real",))
    result = {"env": {"threads": 1}}
    said = []
    ggufs, fns = _llamacpp(opts, ["real"], result, said.append)
    assert (ggufs, fns) == ([], {})
    notes = result["llamacpp"]["notes"]
    assert notes == said and len(notes) == 2
    assert all("skipped: no llama-" in n and str(tmp_path) in n for n in notes)
    with pytest.raises(lc.LlamaCppError, match="skipped: no llama-bench"):
        lc.run_llama_bench(tmp_path / "x.gguf", 1)


def test_bench_options_llamacpp():
    from cbgen.bench.suite import BenchOptions

    assert BenchOptions.quick().llamacpp_np == (1, 4)
    with pytest.raises(ValueError, match="llamacpp_np"):
        BenchOptions(llamacpp_np=(0,))
    with pytest.raises(ValueError, match="--gguf: no such file"):
        lc.select_ggufs(("/nonexistent/x.gguf",), None)


def _embedded_gguf() -> Path:
    from cbgen.models import ModelError
    from cbgen.models.resolve import resolve_model
    try:
        return resolve_model(None).path
    except ModelError as e:
        pytest.skip(str(e))


needs_server = pytest.mark.skipif(lc.find_tool("llama-server") is None, reason=lc.missing_note("llama-server"))


@needs_server
def test_llama_server_end_to_end():
    gguf = _embedded_gguf()
    wl = Workload("uniform", [SAY_HI, [6403, 1980, 253, 655]], 8, ignore_eos=True)
    res = lc.run_llama_server(gguf, 2, 1, wl, "llama-server test")
    assert res.measured_requests == 2 and res.generated_tokens == 16
    assert [len(t) for t in res.token_ids] == [8, 8]
    for t in res.requests:
        assert t.num_tokens == 8 and 0 <= t.ttft <= t.latency <= res.wall_s
    assert res.setup_s > 0 and res.summary()["np"] == 2
    assert res.peak_rss_mb >= res.start_rss_mb > 0 and res.cpu_s > 0      # the server process's own
    assert res.summary()["gguf"] == gguf.name and "stop types {'limit': 2}" in res.notes[0]


@needs_server
def test_llama_server_stopped_on_error():
    spec = lc.ServerSpec(_embedded_gguf(), 1, 256, 1)
    with pytest.raises(KeyError):
        with lc.LlamaServer(spec) as srv:
            proc, port = srv.proc, srv.port
            raise KeyError("boom")
    assert proc.poll() is not None                   # the server process is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(lc.find_tool("llama-quantize") is None, reason=lc.missing_note("llama-quantize"))
def test_bf16_gguf_made_once(tiny_gguf, tmp_path):
    from gguf import GGUFReader, GGMLQuantizationType

    out = lc.bf16_gguf(tiny_gguf, tmp_path)
    assert out.parent == tmp_path and out.name == "tiny-llama.F32-requant-BF16.gguf"
    kinds = {t.tensor_type for t in GGUFReader(out).tensors}
    assert GGMLQuantizationType.BF16 in kinds
    mtime = out.stat().st_mtime_ns
    assert lc.bf16_gguf(tiny_gguf, tmp_path) == out and out.stat().st_mtime_ns == mtime   # cached
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is the capital of Spain? {i}"}]}
             for i in range(3)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _tiny_bench(tiny_loaded, prompt_file, tmp_path, **kw):
    from cbgen.bench import BenchOptions, run_bench
    from cbgen.config import ModelConfig
    from cbgen.models import load_model

    def load(impl):
        return load_model(ModelConfig(model=str(tiny_loaded.path), dtype="float32", device="cpu", impl=impl,
                                      threads=1))

    opts = BenchOptions.quick(prompts=str(prompt_file), out=str(tmp_path), real_n=3, real_max_new_tokens=6,
                              workloads=("real",), systems=("cbgen", "llama-server", "llama-bench"),
                              llama_bench_n=4, **kw)
    return run_bench(opts, load=load, write=False)


def test_run_bench_skips_llamacpp_with_a_note(tiny_loaded, prompt_file, tmp_path, monkeypatch):
    from cbgen.bench.report import markdown

    monkeypatch.setenv("CBGEN_LLAMACPP_BIN", str(tmp_path))
    result = _tiny_bench(tiny_loaded, prompt_file, tmp_path, gguf=("/does/not/matter.gguf",))
    assert [r["system"] for r in result["workloads"]["real"]["systems"]] == ["cbgen"]
    assert "llama_bench" not in result and len(result["llamacpp"]["notes"]) == 2
    md = markdown(result)
    assert f"- llama.cpp: llama-server: skipped: no llama-server in {tmp_path}" in md


@needs_server
@pytest.mark.skipif(lc.find_tool("llama-bench") is None, reason=lc.missing_note("llama-bench"))
def test_run_bench_with_llamacpp_on_tiny_gguf(tiny_loaded, tiny_gguf, prompt_file, tmp_path):
    """The whole suite path (rounds, ratios, agreement, best -np, report) with the real binaries, on
    the tiny llama's own GGUF: the same weights and vocab as the HF model cbgen loads."""
    from cbgen.bench.report import markdown

    result = _tiny_bench(tiny_loaded, prompt_file, tmp_path, gguf=(str(tiny_gguf),), llamacpp_np=(1, 2))
    real = result["workloads"]["real"]
    names = [r["system"] for r in real["systems"]]
    assert names == ["cbgen", "llama-server tiny-llama.F32 -np 1", "llama-server tiny-llama.F32 -np 2"]
    for r in real["systems"][1:]:
        assert r["measured_requests"] == 3 and 3 <= r["generated_tokens"] <= 18 and r["gguf"] == tiny_gguf.name
    assert real["llama_server_best_np"]["tiny-llama.F32.gguf"] in names[1:]
    assert set(real["ratios"]) == set(names[1:])
    assert all(a["compared"] == 3 for a in real["agreement"].values()) and set(real["agreement"]) == set(names[1:])
    [lb] = result["llama_bench"]["rows"]
    assert lb["gguf"] == tiny_gguf.name and lb["n_gen"] == 4 and lb["ms_per_token"] > 0
    md = markdown(result)
    assert "(best -np)" in md and "| llama-bench tiny-llama.F32.gguf" in md
    assert any(t["target"].startswith("real: cbgen >= 2x llama-server at its best -np on tiny-llama.F32.gguf")
               for t in result["targets"])
