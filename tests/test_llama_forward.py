"""cbgen's native llama-family forward (engine/llama.py) against transformers' modules.

Greedy tokens must equal HF ``generate`` in float32 through either impl (native
forward, or transformers' modules with the paged attention);
bf16 pre-packed projections must be bit-identical to ``F.linear``; models the
native forward does not cover fall back to transformers' modules (auto) or are
refused with a clear error (native).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_greedy, sharpen

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.llama import LlamaForward, _Proj, _can_pack
from cbgen.engine.architectures import UnsupportedModelError
from cbgen.engine.hf_forward import TransformersForward

TEXTS = ["Paris is the capital of France.", "Hi", "Numbers: 0 1 2 3 4 5 6 7 8 9",
         "A journey of a thousand miles begins with a single step.", "Rome is the capital of Italy."]


def greedy_all(loaded, n=10, impl=None, **cfg):
    loaded = loaded if impl is None else dataclasses.replace(loaded, impl=impl)
    eng = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=3, **cfg))
    ps = [loaded.tokenizer.encode(t) for t in TEXTS]
    outs = eng.generate(ps, [SamplingParams(max_new_tokens=n, min_new_tokens=n)] * len(ps))
    return eng, ps, [o.token_ids for o in outs]


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_both_forwards_match_hf_greedy(sharp, impl):
    eng, ps, got = greedy_all(sharp, impl=impl)
    assert type(eng.model) is (LlamaForward if impl == "native" else TransformersForward)
    assert got == [hf_greedy(sharp.model, p, 10) for p in ps]


def test_fusing_keeps_the_model_usable_by_transformers(sharp):
    fwd = LlamaForward.for_model(sharp.model)
    assert LlamaForward.for_model(sharp.model) is fwd          # fused once per model object
    attn = sharp.model.model.layers[0].self_attn
    qkv = fwd.layers[0].qkv.w
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()      # views into the fused weight, no copy
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.weight.shape[0]:].data_ptr()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_bf16_projection_is_bit_identical(bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(384, 96, generator=g).bfloat16()
    b = torch.randn(384, generator=g).bfloat16() if bias else None
    proj = _Proj(w, b)
    proj.pack()
    if proj.packed is None:
        pytest.skip("oneDNN packing is not exact on this machine (the projection stays unpacked)")
    for m in (1, 5, 64, 200):
        x = torch.randn(m, 96, generator=g).bfloat16()
        assert torch.equal(proj(x), F.linear(x, w, b))


def test_bf16_engine_packs_and_agrees_with_transformers_forward(sharp):
    model = sharpen(sharp.model).to(torch.bfloat16)
    loaded = dataclasses.replace(sharp, model=model, dtype=torch.bfloat16)
    eng, _, native = greedy_all(loaded, impl="native")
    if _can_pack(model.dtype, model.device):
        # Packed at the first decode step that reaches oneDNN (one-call native steps never do:
        # tests/test_decode_forward.py).
        eng = Engine.from_loaded(dataclasses.replace(loaded, impl="native"), EngineConfig(max_num_seqs=3))
        eng.runner.native_decode = None   # every decode step through the Python forward
        eng.generate([loaded.tokenizer.encode(TEXTS[0])], SamplingParams(max_new_tokens=3, min_new_tokens=3))
        assert not eng.model.pack_pending and all(p.packed is not None for p in eng.model.projections())
    _, _, hf_modules = greedy_all(loaded, impl="transformers")
    # Same math op for op; bf16 GEMM shapes differ (fused q/k/v), so allow a rare late flip.
    same = sum(a[:5] == b[:5] for a, b in zip(native, hf_modules))
    assert same >= len(TEXTS) - 1


@pytest.fixture(scope="module")
def tiny_qwen3(sharp):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = sharp.tokenizer
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      tie_word_embeddings=True, use_sliding_window=False)
    torch.manual_seed(0)
    model = sharpen(Qwen3ForCausalLM(cfg).eval())
    return dataclasses.replace(sharp, model=model)


def test_model_without_native_forward_uses_transformers_modules(tiny_qwen3):
    assert not LlamaForward.supports(tiny_qwen3.model)              # q_norm / k_norm
    eng, ps, got = greedy_all(tiny_qwen3)
    assert type(eng.model) is TransformersForward
    assert got == [hf_greedy(tiny_qwen3.model, p, 10) for p in ps]
    with pytest.raises(UnsupportedModelError, match="impl='native' is unavailable: model type 'qwen3' has no native"):
        Engine.from_loaded(dataclasses.replace(tiny_qwen3, impl="native"))


# ---- loading without transformers' modelling code (cbgen/models/load.py, impl="native") ----

@pytest.fixture(scope="module")
def sharp_dir(sharp, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharp-llama")
    sharp.model.save_pretrained(path)
    sharp.tokenizer.save_pretrained(path)
    return path


def test_native_load_matches_hf_greedy(sharp, sharp_dir):
    from cbgen.config import ModelConfig
    from cbgen.models import load_model, model_info

    loaded = load_model(ModelConfig(model=str(sharp_dir), dtype="float32", device="cpu"))   # impl auto
    assert isinstance(loaded.model, LlamaForward) and loaded.native
    info = model_info(loaded)
    assert info["implementation"].startswith("cbgen native")
    assert info["parameters"] == sum(p.numel() for p in sharp.model.parameters())
    assert loaded.max_model_len == sharp.max_model_len
    _, ps, got = greedy_all(loaded)
    assert got == [hf_greedy(sharp.model, p, 10) for p in ps]
    assert info["attention"] == "2 full" and info["layers"] == 2


def test_native_load_refuses_what_it_cannot_run(tiny_qwen3, tmp_path):
    from cbgen.config import ModelConfig
    from cbgen.models import ModelError, load_model

    tiny_qwen3.model.save_pretrained(tmp_path)
    tiny_qwen3.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="impl='native' is unavailable: model type 'qwen3' has no native forward"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu", impl="native"))
    auto = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu"))
    assert type(auto.model).__name__ == "Qwen3ForCausalLM"


def test_native_load_names_a_missing_layer_weight(sharp_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from cbgen.config import ModelConfig
    from cbgen.models import ModelError, load_model

    shutil.copytree(sharp_dir, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.down_proj.weight is missing"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu", impl="native"))


def test_native_run_never_imports_transformers_modelling(sharp_dir):
    """The start-up saving is real: a whole native run leaves modeling_utils unimported."""
    import subprocess
    import sys
    code = f"""
import sys
from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.models import load_model
loaded = load_model(ModelConfig(model={str(sharp_dir)!r}, dtype="float32", device="cpu"))
out = Engine.from_loaded(loaded).generate([loaded.tokenizer.encode("hi")], SamplingParams(max_new_tokens=3))
assert len(out[0].token_ids) >= 1
print(sorted(m for m in sys.modules if m.startswith("transformers.model")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "transformers.modeling_utils" not in proc.stdout, proc.stdout


def test_generic_tokenizer_shortcut_is_what_autotokenizer_gives(sharp_dir):
    from transformers import AutoTokenizer

    from cbgen.models.load import _generic_tokenizer, _load_tokenizer

    assert _generic_tokenizer(sharp_dir, "llama") and not _generic_tokenizer(sharp_dir, "qwen2")
    fast, auto = _load_tokenizer(sharp_dir, "llama"), AutoTokenizer.from_pretrained(sharp_dir)
    assert type(fast) is type(auto)
    msgs = [{"role": "user", "content": "What is 2+2? <|im_end|> café"}]
    assert fast.apply_chat_template(msgs, add_generation_prompt=True) == \
        auto.apply_chat_template(msgs, add_generation_prompt=True)
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id, len(fast)) == \
        (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id, len(auto))
