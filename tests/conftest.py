"""Shared model fixtures: a tiny random llama with a real BPE tokenizer, and the embedded SmolLM2.

The tiny model is built in a session tmp dir in well under 2 s, with no network;
its weights are random (fixed seed), so its text is gibberish but deterministic.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest

from cbgen.config import ModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2-Instruct's ChatML template (with its default system prompt shortened).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Continuous batching lets a server keep its accelerator busy: new requests join the running batch as
soon as others finish, instead of waiting for the slowest sequence in a static batch to complete.
Each step the scheduler decides which sequences to run, how many prompt tokens to prefill, and which
sequences only need to decode one more token. The key and value cache is split into fixed-size blocks,
so memory is allocated on demand and shared between requests that start with the same prefix.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
What is the capital of Spain? Madrid is the capital of Spain, and it is known for its museums.
Write a short poem about the sea. The sea is wide and deep and blue; it sings of storms and sailors too.
Please summarise the following text in one sentence. Translate this sentence into French, please.
The weather today is sunny with a light breeze, and the temperature will reach twenty degrees.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % & *
"""


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE trained on ``CORPUS``, wrapped as a transformers fast tokenizer with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, tokenizer, seed: int = 0):
    """A randomly initialised 2-layer llama (GQA 4:2), deterministic for ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny llama + BPE tokenizer dir (config.json, model.safetensors, tokenizer.json, ...)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """``load_model`` of ``tiny_model_dir`` in float32 on CPU, as a transformers model (tests
    use it both for the engine and as the HF ``generate`` reference)."""
    from cbgen.models import load_model

    import dataclasses

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", impl="transformers"))
    # Loaded through transformers (tests need its module tree as the reference); stepped with
    # the fastest forward for it, as `--impl auto` would.
    return dataclasses.replace(loaded, impl="auto")


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2 in float32, from the user's real cache ($CBGEN_CACHE or ~/.cache/cbgen).

    The first use on a machine converts the GGUF (~15 s) and the result is shared
    with other test files and ``make run``. Tests using it are ``@pytest.mark.e2e``.
    """
    from cbgen.models import ModelError, load_model

    import dataclasses

    try:
        loaded = load_model(ModelConfig(dtype="float32", device="cpu", impl="transformers"),
                            status=lambda msg: print(f"[cbgen] {msg}"))
        return dataclasses.replace(loaded, impl="auto")   # the reference is transformers'; the engine runs native
    except ModelError as e:
        pytest.skip(f"embedded model unavailable: {e}")


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(model, tokenizer, path) -> None:
    """Write ``model`` + ``tokenizer`` as a float32 llama GGUF, laid out as llama.cpp's converter does.

    q/k rows are permuted the llama.cpp way, which transformers' loader undoes, so
    a GGUF round trip must give back the exact same weights.
    """
    import json

    import gguf
    import numpy as np

    c = model.config

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokenizer))
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([tok for tok, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3 = control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_chat_template(tokenizer.chat_template)
    for key, tensor in model.state_dict().items():
        a = tensor.detach().float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            continue  # tied to the embedding
        else:
            layer, rest = key.split(".")[2], key.split(".", 3)[3].removesuffix(".weight")
            name = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = permute(a, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = permute(a, c.num_key_value_heads)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny llama of ``tiny_model_dir`` as a float32 GGUF file (~0.5 MB, converts in ~0.1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf"
    write_tiny_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), path)
    return path


@pytest.fixture(scope="session")
def sharp(tiny_loaded):
    """``tiny_loaded`` with larger random weights: its output depends on the whole context."""
    import dataclasses

    from helpers import sharpen

    return dataclasses.replace(tiny_loaded, model=sharpen(tiny_loaded.model))
