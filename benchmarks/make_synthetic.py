"""A randomly initialised Llama-3.2-1B-shaped checkpoint: safetensors (bf16) and a Q8_0 GGUF of the same weights.

    python benchmarks/make_synthetic.py OUT_DIR [--seed 0]

writes ``OUT_DIR/hf/`` (config.json, generation_config.json, bf16 safetensors shards + index,
tokenizer) and ``OUT_DIR/llama-3.2-1b-synthetic.Q8_0.gguf`` (~1.3 GB), for conversion-memory
and load-time benchmarks (``benchmarks/convert_memory.py``) and llama.cpp comparisons.

Shape: the real Llama-3.2-1B config (hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64,
intermediate 8192, vocab 128256, rope_theta 500000 with its llama3 rope scaling, tied embeddings),
max_position_embeddings capped at 8192. Weights: normal(0, 0.02), norms 1 (transformers' init).
Tokenizer: the embedded SmolLM2's (49152 tokens); vocab_size stays 128256, so embedding rows past
49152 are never produced by the tokenizer, and the GGUF's token list is padded to 128256 with
``[PADn]`` UNUSED tokens (as llama.cpp's convert_hf_to_gguf.py pads a short vocab) so that
llama.cpp's n_vocab matches the embedding.

The GGUF is laid out as llama.cpp's convert_hf_to_gguf.py writes a llama (``LlamaModel``):
Q/K rows permuted per head (``permute`` below), 1-D tensors F32, the rest Q8_0 (token_embd
too), no ``output.weight`` (tied), and the llama3 rope scaling as a ``rope_freqs.weight`` tensor
of per-frequency factors. Note: transformers' GGUF reader ignores ``rope_freqs``, so a cbgen
load of the GGUF uses plain RoPE, while the HF dir uses llama3 scaling (irrelevant for speed).

Memory: every tensor is produced and written on its own (row blocks for the 1 GB embedding);
nothing near the 5 GB float32 model is ever held.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cbgen.models.shards import OutTensor, write_shards  # noqa: E402

GGUF_NAME = "llama-3.2-1b-synthetic.Q8_0.gguf"

# meta-llama/Llama-3.2-1B config.json, max_position_embeddings capped (131072 in the original).
LLAMA_3_2_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, initializer_range=0.02,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)

# HF name -> llama.cpp name (gguf-py's TensorNameMap for MODEL_ARCH.LLAMA)
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

ROW_BLOCK_ELEMS = 16 * 2**20  # elements generated / quantised at a time (64 MB in float32)


def weight_shapes(c) -> list[tuple[str, tuple[int, ...]]]:
    """``[(hf_name, shape)]`` of a tied-embedding llama, in transformers' state-dict order."""
    h, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    shapes = [("model.embed_tokens.weight", (c.vocab_size, h))]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (c.num_attention_heads * c.head_dim, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, c.num_attention_heads * c.head_dim)),
                   (p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                   (p + "mlp.up_proj.weight", (c.intermediate_size, h)),
                   (p + "mlp.down_proj.weight", (h, c.intermediate_size)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,))]


def _random_blocks(shape: tuple[int, ...], seed: int, std: float):
    """normal(0, std) in bf16, a row block at a time; the same ``seed`` gives the same tensor."""
    if len(shape) == 1:  # a norm: ones, as transformers initialises LlamaRMSNorm
        yield torch.ones(shape, dtype=torch.bfloat16)
        return
    gen = torch.Generator().manual_seed(seed)
    step = max(1, ROW_BLOCK_ELEMS // shape[1])
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        yield (torch.randn((rows, shape[1]), generator=gen) * std).to(torch.bfloat16)


def write_hf(out: Path, config, tokenizer, seed: int) -> None:
    """config, generation config, tokenizer and bf16 safetensors shards into ``out``."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tensors = [OutTensor(name, shape, torch.bfloat16,
                         lambda shape=shape, i=i: _random_blocks(shape, seed * 100_003 + i, config.initializer_range))
               for i, (name, shape) in enumerate(weight_shapes(config))]
    write_shards(out, tensors)
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF's rotate-half row order to
    GGML's interleaved pairs, per head; transformers' GGUF reader undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's converter writes for rope_type llama3 (one factor per
    rotary frequency; llama.cpp divides each frequency by it). Algorithm: Meta's llama3
    ``apply_scaling``, as in convert_hf_to_gguf.py ``LlamaModel.generate_extra_tensors``."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _tokenizer_fields(embedded_gguf: Path, vocab_size: int):
    """``[(key, value, type, sub_type)]``: every ``tokenizer.*`` key of the embedded GGUF, the token
    list (and its types/scores) padded to ``vocab_size`` the way convert_hf_to_gguf.py pads."""
    import gguf

    reader = gguf.GGUFReader(str(embedded_gguf))
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        n = len(value) if isinstance(value, list) else 0
        if key == "tokenizer.ggml.tokens":
            value = value + [f"[PAD{i}]" for i in range(n, vocab_size)]
        elif key == "tokenizer.ggml.token_type":
            value = value + [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
        elif key == "tokenizer.ggml.scores":
            value = value + [-1000.0] * (vocab_size - n)
        fields.append((key, value, vtype, sub))
    return fields


def write_gguf(path: Path, hf_dir: Path, config, embedded_gguf: Path) -> None:
    """The weights of ``hf_dir`` (bf16 safetensors) as a llama Q8_0 GGUF, tensor by tensor."""
    import json

    import gguf
    from gguf.quants import quantize
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    handles = {k: h for h in (safe_open(str(hf_dir / f), "pt") for f in files) for k in h.keys()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Llama-3.2-1B synthetic (random weights)")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in _tokenizer_fields(embedded_gguf, config.vocab_size):
        w.add_key_value(key, value, vtype, sub)

    q8 = gguf.GGMLQuantizationType.Q8_0
    block, type_size = gguf.GGML_QUANT_SIZES[q8]
    plan = [("rope_freqs.weight", None, (config.head_dim // 2,))]
    for name, shape in weight_shapes(config):
        if name == "model.embed_tokens.weight":
            plan.append(("token_embd.weight", name, shape))
        elif name == "model.norm.weight":
            plan.append(("output_norm.weight", name, shape))
        else:
            layer, rest = name.split(".")[2], name.split(".", 3)[3].removesuffix(".weight")
            plan.append((f"blk.{layer}.{_LAYER[rest]}.weight", name, shape))
    for gguf_name, _, shape in plan:
        if len(shape) == 1:
            w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            row_bytes = shape[1] // block * type_size
            w.add_tensor_info(gguf_name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes,
                              raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gguf_name, hf_name, shape in plan:
        if hf_name is None:
            w.write_tensor_data(llama3_rope_factors(config))
            continue
        tensor = handles[hf_name].get_tensor(hf_name)
        if len(shape) == 1:
            w.write_tensor_data(tensor.float().numpy())
            continue
        if gguf_name.endswith(".attn_q.weight"):
            tensor = torch.from_numpy(permute(tensor.float().numpy(), config.num_attention_heads,
                                              config.num_attention_heads))
        elif gguf_name.endswith(".attn_k.weight"):
            tensor = torch.from_numpy(permute(tensor.float().numpy(), config.num_attention_heads,
                                              config.num_key_value_heads))
        out = np.empty((shape[0], shape[1] // block * type_size), np.uint8)
        step = max(1, ROW_BLOCK_ELEMS // shape[1])
        for start in range(0, shape[0], step):  # a Q8_0 block never spans rows
            out[start:start + step] = quantize(tensor[start:start + step].float().numpy(), q8)
        w.write_tensor_data(out)
        del tensor, out
    w.close()


def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer (from its GGUF) and that GGUF's path."""
    from transformers import AutoTokenizer

    from cbgen.models.gguf import _gguf_chat_template
    from cbgen.models.resolve import _embedded_gguf

    src = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(src)
    return tokenizer, src


def make(out: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """Write the checkpoint (``overrides`` change the config, e.g. for a tiny test copy); returns (hf dir, gguf)."""
    from transformers import LlamaConfig

    tokenizer, src = embedded_tokenizer()
    config = LlamaConfig(**{**LLAMA_3_2_1B, **overrides, "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    hf_dir, gguf_path = out / "hf", out / GGUF_NAME
    write_hf(hf_dir, config, tokenizer, seed)
    write_gguf(gguf_path, hf_dir, config, src)
    return hf_dir, gguf_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    hf_dir, gguf_path = make(args.out_dir, args.seed)
    hf_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    print(f"wrote {hf_dir} ({hf_bytes / 1e9:.2f} GB of bf16 safetensors) and {gguf_path} "
          f"({gguf_path.stat().st_size / 1e9:.2f} GB, Q8_0) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
