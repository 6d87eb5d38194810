"""benchmarks/make_synthetic.py on a tiny copy of its Llama-3.2-1B shape: the Q8_0 GGUF holds the
same weights as the bf16 safetensors (within Q8_0 rounding, Q/K un-permuted by cbgen's converter),
llama.cpp's metadata, and the embedded tokenizer padded to vocab_size; cbgen loads both."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cbgen.config import ModelConfig
from cbgen.models import gguf as gguf_mod
from cbgen.models import load_model

REPO = Path(__file__).resolve().parents[1]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=49152 + 128, max_position_embeddings=512)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "benchmarks" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hf_dir, gguf_path = mod.make(tmp_path_factory.mktemp("synthetic"), seed=1, **TINY)
    return mod, hf_dir, gguf_path


def test_config_is_the_llama_3_2_1b_shape(synthetic):
    mod, hf_dir, _ = synthetic
    c = json.loads((hf_dir / "config.json").read_text())
    assert c["rope_parameters"]["rope_type"] == "llama3" and c["rope_parameters"]["rope_theta"] == 500000.0
    assert c["tie_word_embeddings"] and c["dtype"] == "bfloat16" and c["vocab_size"] == TINY["vocab_size"]
    full = mod.LLAMA_3_2_1B  # the real shape, as the benchmark writes it by default
    assert (full["hidden_size"], full["num_hidden_layers"], full["num_attention_heads"], full["num_key_value_heads"],
            full["head_dim"], full["intermediate_size"], full["vocab_size"]) == (2048, 16, 32, 8, 64, 8192, 128256)
    n = sum(int(np.prod(s)) for _, s in mod.weight_shapes(SimpleNamespace(**full)))
    assert 1.23e9 < n < 1.24e9  # 1.236 B parameters, embedding counted once (tied)


def test_gguf_metadata_and_padded_vocab(synthetic):
    import gguf

    mod, _, gguf_path = synthetic
    r = gguf.GGUFReader(str(gguf_path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert f["general.architecture"] == "llama" and f["llama.vocab_size"] == TINY["vocab_size"]
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.freq_base"]) == (4, 2, 500000.0)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == TINY["vocab_size"] == len(f["tokenizer.ggml.token_type"])
    assert tokens[49152] == "[PAD49152]" and f["tokenizer.ggml.token_type"][-1] == int(gguf.TokenType.UNUSED)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["rope_freqs.weight"] == "F32"
    assert "output.weight" not in types  # tied
    rope = next(t for t in r.tensors if t.name == "rope_freqs.weight").data
    assert rope.shape == (TINY["head_dim"] // 2,) and rope[0] == 1.0 and rope[-1] == 32.0


def test_gguf_weights_equal_the_safetensors_within_q8_0(synthetic, tmp_path):
    _, hf_dir, gguf_path = synthetic
    dest, _ = gguf_mod.ensure_converted(gguf_path, torch.float32, str(tmp_path), status=lambda _m: None)
    ref = {k: h for h in (safe_open(str(p), "pt") for p in hf_dir.glob("*.safetensors")) for k in h.keys()}
    got = {k: h for h in (safe_open(str(p), "pt") for p in dest.glob("*.safetensors")) for k in h.keys()}
    assert got.keys() == ref.keys()
    for name in ref:
        want, have = ref[name].get_tensor(name).float(), got[name].get_tensor(name)
        if want.dim() == 1:
            assert torch.equal(have, want), name
            continue
        # Q8_0: a scale per 32 values, amax/127 stored in fp16 (relative error 2^-11, times |q| <= 127),
        # so each value is within 0.5 + 0.07 steps of it. A wrong Q/K permutation would be off by
        # the weights' own size (std 0.02), some 40 steps.
        amax = want.reshape(want.shape[0], -1, 32).abs().amax(-1, keepdim=True)
        err = (have - want).reshape_as(amax.expand(-1, -1, 32)).abs()
        assert bool((err <= amax / 127 * 0.57).all()), name


def test_cbgen_loads_both(synthetic, tmp_path):
    _, hf_dir, gguf_path = synthetic
    from_dir = load_model(ModelConfig(model=str(hf_dir), dtype="float32"))
    from_gguf = load_model(ModelConfig(model=str(gguf_path), dtype="float32", cache_dir=str(tmp_path)))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert from_dir.tokenizer(text).input_ids == from_gguf.tokenizer(text).input_ids
    assert from_gguf.tokenizer.convert_tokens_to_ids("[PAD49152]") == 49152
    assert from_dir.has_chat_template and from_gguf.has_chat_template
