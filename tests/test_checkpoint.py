"""The memory-mapped safetensors loader (cbgen/models/checkpoint.py) under the native forwards.

Tiny random llama, qwen2 (q/k/v biases, none on o_proj) and Gemma 3 checkpoints are written in
two layouts: transformers' ``save_pretrained`` order, and the order of cbgen's GGUF conversion
(shards.write_shards, q/k/v and gate/up back to back), each in one file and sharded, stored in
float32 and in bfloat16, and loaded in float32 and in bfloat16. Every weight of the loaded
forward must equal what safetensors' ``safe_open`` + ``.to(dtype)`` + ``torch.cat`` give; the
fused weights of a same-dtype load must be the file's own mapping (no copy); and a load through
``load_model`` must generate the same greedy tokens as transformers on the same weights.
"""

from __future__ import annotations

import copy
import gc
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import hf_greedy, sharpen

from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.engine.gemma3 import Gemma3Forward
from cbgen.engine.llama import LlamaForward
from cbgen.models.checkpoint import MappedCheckpoint, checkpoint_files
from cbgen.models.load import _load_native
from cbgen.models.shards import OutTensor, write_shards

KINDS = ["llama", "qwen2", "gemma3"]
F32, BF16 = torch.float32, torch.bfloat16
SHARD_BYTES = 100_000   # a few shards for these models (~0.5 MB in float32)
# Within a layer, the order cbgen's GGUF conversion writes (q, k, v and gate, up back to back).
CBGEN_ORDER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def tiny_model(kind: str, tok):
    """A sharp (large random weights, random biases and norms) tiny model of ``kind``."""
    if kind == "gemma3":
        from test_gemma3 import tiny_gemma3
        return tiny_gemma3(tok, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"])
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)) if kind == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)))
    model = sharpen(model.eval())
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.dim() == 1:   # biases (qwen2's q/k/v) and norms: not left at their constant init
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2 if "norm" in name
                        else torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def models(sharp):
    return {kind: tiny_model(kind, sharp.tokenizer) for kind in KINDS}


def _cbgen_order(names: list[str]) -> list[str]:
    def key(name: str):
        if not name.startswith("model.layers."):
            return (0 if "embed" in name else 2, 0, name)
        layer, rest = name.split(".", 3)[2:]
        return (1, int(layer), CBGEN_ORDER.index(rest) if rest in CBGEN_ORDER else len(CBGEN_ORDER))
    return sorted(names, key=key)


def save(model, tok, path: Path, layout: str, dtype: torch.dtype, sharded: bool) -> Path:
    """``model`` in ``dtype`` as a checkpoint dir (config, tokenizer, safetensors) in ``layout``."""
    path.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to(dtype)
    if layout == "hf":
        model.save_pretrained(path, max_shard_size=SHARD_BYTES if sharded else "10GB")
    else:
        model.config.save_pretrained(path)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        tensors = [OutTensor(n, tuple(state[n].shape), dtype, lambda t=state[n]: iter([t.contiguous()]))
                   for n in _cbgen_order(list(state))]
        write_shards(path, tensors, SHARD_BYTES if sharded else 1 << 30)
    tok.save_pretrained(path)
    assert (len(checkpoint_files(path)) > 1) == sharded
    return path


def safe_open_reference(path: Path, dtype: torch.dtype):
    """name -> the tensor as safetensors' own ``safe_open`` reads it, cast with ``.to(dtype)``."""
    from safetensors import safe_open
    out = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k).to(dtype) for k in h.keys()})
    return out


def load_forward(path: Path, dtype: torch.dtype, eos: int):
    c = json.loads((path / "config.json").read_text())
    return _load_native(path, c, dtype, torch.device("cpu"), (eos,), 2048)


def assert_weights_match(fwd, ref: dict, dtype: torch.dtype) -> None:
    def cat(names):
        present = [ref[n] for n in names if n in ref]
        assert len(present) in (0, len(names))
        return torch.cat(present) if present else None

    def same(got, want, what):
        assert (got is None) == (want is None), what
        if want is not None:
            assert got.dtype == dtype and torch.equal(got, want), what

    gemma = isinstance(fwd, Gemma3Forward)
    for i, L in enumerate(fwd.layers):
        p = f"model.layers.{i}."
        for proj, mods in ((L.qkv, [p + f"self_attn.{x}_proj" for x in "qkv"]), (L.o, [p + "self_attn.o_proj"]),
                           (L.gate_up, [p + "mlp.gate_proj", p + "mlp.up_proj"]), (L.down, [p + "mlp.down_proj"])):
            same(proj.w, cat([m + ".weight" for m in mods]), mods)
            same(proj.b, cat([m + ".bias" for m in mods]), mods)
        norms = (L.norm_weights if gemma else (L.in_norm, L.post_norm))
        names = [n for n in ref if n.startswith(p) and "norm" in n]
        assert len(norms) == len(names)
        for w in norms:
            assert any(torch.equal(w, ref[n]) for n in names)
    same(fwd.norm_weight if gemma else fwd.norm, ref["model.norm.weight"], "norm")
    same(fwd.embed, ref["model.embed_tokens.weight"], "embed")
    same(fwd.lm_head.w, ref.get("lm_head.weight", ref["model.embed_tokens.weight"]), "lm_head")


def fused_weights(fwd, path: Path):
    """(fused weight, whether all its pieces are in one file) for each layer's q/k/v and gate/up."""
    index = path / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    for i, L in enumerate(fwd.layers):
        p = f"model.layers.{i}."
        for proj, mods in ((L.qkv, [f"self_attn.{x}_proj" for x in "qkv"]),
                           (L.gate_up, ["mlp.gate_proj", "mlp.up_proj"])):
            yield proj.w, len({where.get(p + m + ".weight") for m in mods}) == 1


def mapped_file(t: torch.Tensor) -> str:
    """The file whose mapping holds ``t``'s first byte ('' for anonymous memory)."""
    address = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("layout", ["hf", "cbgen"])
@pytest.mark.parametrize("kind", KINDS)
def test_loaded_weights_equal_safe_open_and_cat(models, sharp, tmp_path, kind, layout, sharded):
    for file_dtype in (F32, BF16):
        path = save(models[kind], sharp.tokenizer, tmp_path / str(file_dtype), layout, file_dtype, sharded)
        for dtype in (F32, BF16):
            fwd = load_forward(path, dtype, sharp.tokenizer.eos_token_id)
            assert isinstance(fwd, Gemma3Forward if kind == "gemma3" else LlamaForward)
            gc.collect()   # the loader's own objects are gone: the weights must outlive them
            assert_weights_match(fwd, safe_open_reference(path, dtype), dtype)
            if kind == "qwen2":   # biases on q/k/v, none on o_proj (stays None)
                assert fwd.layers[0].qkv.b is not None and fwd.layers[0].o.b is None
            fused = {w: mapped_file(w).endswith(".safetensors") for w, one_file in fused_weights(fwd, path)
                     if one_file}
            if layout == "cbgen" and dtype == file_dtype:   # stored back to back: the file's own pages
                assert fused and all(fused.values())
            elif dtype != file_dtype:                        # a cast: new memory
                assert not any(fused.values())


def test_mapped_weights_are_private(models, sharp, tmp_path):
    """A write to a loaded weight copies the page (MAP_PRIVATE); the file never changes."""
    path = save(models["llama"], sharp.tokenizer, tmp_path, "cbgen", F32, sharded=True)
    fwd = load_forward(path, F32, sharp.tokenizer.eos_token_id)
    w = fwd.layers[1].qkv.w
    assert mapped_file(w).endswith(".safetensors")
    before = w[0, :4].clone()
    w[0, :4] += 1.0
    assert torch.equal(w[0, :4], before + 1.0)
    assert torch.equal(safe_open_reference(path, F32)["model.layers.1.self_attn.q_proj.weight"][0, :4], before)


@pytest.mark.parametrize("kind", KINDS)
def test_native_load_generates_as_transformers(models, sharp, tmp_path, kind):
    """Through ``load_model`` (native), from a sharded cbgen-layout checkpoint stored in bfloat16
    and loaded as float32 and from one stored in float32 (the view path): the same greedy tokens
    as HF ``generate`` on the same weights."""
    from cbgen.models import load_model

    model, tok = models[kind], sharp.tokenizer
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 19, 12)]
    params = [SamplingParams(max_new_tokens=8, min_new_tokens=8)] * len(prompts)
    for file_dtype in (F32, BF16):
        path = save(model, tok, tmp_path / str(file_dtype), "cbgen", file_dtype, sharded=True)
        loaded = load_model(ModelConfig(model=str(path), dtype="float32", device="cpu", impl="native"))
        assert loaded.native and loaded.dtype == F32
        got = [o.token_ids for o in Engine.from_loaded(loaded, EngineConfig(max_num_seqs=3)).generate(
            prompts, params)]
        reference = copy.deepcopy(model)   # the weights the file holds (not .to(bf16): that rounds inv_freq too)
        with torch.no_grad():
            for w in reference.parameters():
                w.copy_(w.to(file_dtype).to(F32))
        assert got == [hf_greedy(reference, p, 8) for p in prompts]


def _write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], extra: bytes = b"") -> None:
    """A safetensors file written by hand: {name: (dtype code, shape, bytes)} in order, no padding."""
    header, offset = {}, 0
    for name, (code, shape, data) in tensors.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(d for _, _, d in tensors.values()) + extra)


def test_misaligned_tensor_is_read_correctly(tmp_path):
    """A float32 tensor starting at an odd offset (after 3 float16 values): copied, same values."""
    half = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16)
    full = torch.arange(6, dtype=F32).reshape(2, 3) / 7
    _write_raw(tmp_path / "model.safetensors", {"a.weight": ("F16", [3], half.numpy().tobytes()),
                                                "b.weight": ("F32", [2, 3], full.numpy().tobytes())})
    ck = MappedCheckpoint(tmp_path, F32, torch.device("cpu"))
    assert torch.equal(ck.get("b.weight"), full) and torch.equal(ck.get("a.weight"), half.float())
    assert torch.equal(ck.cat(["a.weight", "a.weight"]), torch.cat([half.float(), half.float()]))
    assert ck.get("b.bias") is None and ck.cat(["b.bias", "a.bias"]) is None
    with pytest.raises(KeyError, match="c.weight is missing"):
        ck.get("c.weight")


def test_mixed_biases_and_shapes_are_refused(tmp_path):
    w = torch.ones(2, 3).numpy().tobytes()
    _write_raw(tmp_path / "model.safetensors", {"q.weight": ("F32", [2, 3], w), "k.weight": ("F32", [3, 2], w),
                                                "q.bias": ("F32", [2], w[:8])})
    ck = MappedCheckpoint(tmp_path, F32, torch.device("cpu"))
    with pytest.raises(ValueError, match="mixed biases"):
        ck.cat(["q.bias", "k.bias"])
    with pytest.raises(ValueError, match="cannot concatenate"):
        ck.cat(["q.weight", "k.weight"])


@pytest.mark.parametrize("damage", ["truncated", "offsets", "header"])
def test_damaged_file_is_a_clean_error(models, sharp, tmp_path, damage):
    from cbgen.models import ModelError, load_model

    path = save(models["llama"], sharp.tokenizer, tmp_path, "cbgen", F32, sharded=True)
    shard = checkpoint_files(path)[1]
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[:len(data) // 2])
    elif damage == "offsets":   # the header claims more bytes than a tensor's shape holds
        shard.write_bytes(data.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1))
    else:
        shard.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ValueError, match=shard.name):
        MappedCheckpoint(path, F32, torch.device("cpu"))
    with pytest.raises(ModelError, match=f"cannot load {path}"):
        load_model(ModelConfig(model=str(path), dtype="float32", device="cpu", impl="native"))
