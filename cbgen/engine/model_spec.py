"""ModelSpec: what the engine needs to know about a model, as plain data (no torch).

The runner sizes the KV pool from it, the attention reads each layer's window
from it, the scheduler and ``cbgen info`` read it too. Built once, at load, from
a transformers-style config (``from_config``), so per-architecture defaults
(e.g. Gemma 3's ``layer_types`` and per-layer-type ``rope_parameters``) come
from transformers' own config classes where the caller used them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerAttention:
    """How one decoder layer attends.

    ``sliding_window``: None for full causal attention; else W, and a query at
    position q sees keys at positions k with ``q - W < k <= q`` (W keys, itself
    included: transformers' ``masking_utils.sliding_window_overlay``).
    ``rope_theta``: this layer's RoPE base (Gemma 3: 10,000 local, 1,000,000 global).
    """
    sliding_window: int | None
    rope_theta: float
    rope_type: str = "default"

    @property
    def kind(self) -> str:
        return SLIDING if self.sliding_window else FULL


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and geometry of a causal LM, per layer where layers differ.

    ``dtype`` is the compute dtype's name ("float32", "bfloat16", "float16").
    ``eos_token_ids``: every id that ends a sequence (generation config and
    tokenizer, in that order).
    ``kv_pool``: False for a model that keeps its own KV cache (the transformers
    fallback, hf_fallback.py): the runner allocates no pool, while the block
    manager still counts blocks of ``kv_bytes_per_token``, which bounds that cache.
    """
    architecture: str              # transformers model_type, e.g. "llama", "gemma3_text"
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: str
    layers: tuple[LayerAttention, ...]
    eos_token_ids: tuple[int, ...] = ()
    kv_pool: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def sliding_windows(self) -> tuple[int | None, ...]:
        return tuple(layer.sliding_window for layer in self.layers)

    @property
    def attention_summary(self) -> str:
        """E.g. ``"30 full"`` or ``"15 sliding (512), 3 full; pattern 5 sliding (512) : 1 full"``."""
        def name(w: int | None) -> str:
            return f"sliding ({w})" if w else "full"
        counts: dict[int | None, int] = {}
        for w in self.sliding_windows:
            counts[w] = counts.get(w, 0) + 1
        text = ", ".join(f"{n} {name(w)}" for w, n in counts.items())
        if len(counts) < 2:
            return text
        # The shortest period that repeats through the layers (the last period may be cut short).
        ws = self.sliding_windows
        period = next(p for p in range(1, len(ws) + 1) if all(ws[i] == ws[i % p] for i in range(len(ws))))
        if period == len(ws):
            return text
        runs: list[list] = []
        for w in ws[:period]:
            if runs and runs[-1][0] == w:
                runs[-1][1] += 1
            else:
                runs.append([w, 1])
        return text + "; pattern " + " : ".join(f"{n} {name(w)}" for w, n in runs)

    @classmethod
    def from_config(cls, c: Any, *, dtype: str, max_model_len: int | None = None,
                    eos_token_ids: tuple[int, ...] = ()) -> "ModelSpec":
        """From a transformers config object (or a SimpleNamespace of config.json's fields).

        Per-layer kinds come from ``layer_types`` when the config has them; else
        every layer slides when ``sliding_window`` is set (and ``use_sliding_window``
        is not False: Qwen2), as transformers' Mistral does. RoPE parameters may be
        flat or keyed by layer type (Gemma 3). Raises ValueError for a config
        without the basic geometry fields.
        """
        try:
            heads = int(c.num_attention_heads)
            layers = int(c.num_hidden_layers)
            hidden = int(c.hidden_size)
        except (AttributeError, TypeError) as e:
            raise ValueError(f"config: missing geometry ({e})") from e
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
        window = getattr(c, "sliding_window", None)
        if getattr(c, "use_sliding_window", True) is False:
            window = None
        types = getattr(c, "layer_types", None) or [SLIDING if window else FULL] * layers
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        per_layer = []
        for t in list(types)[:layers]:
            params = rope.get(t, rope) if isinstance(rope, dict) else {}
            params = params or {}
            theta = float(params.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0))
            rope_type = params.get("rope_type", params.get("type", "default"))
            per_layer.append(LayerAttention(int(window) if t == SLIDING and window else None, theta, rope_type))
        max_len = max_model_len or int(getattr(c, "max_position_embeddings", 0) or 2048)
        return cls(str(getattr(c, "model_type", "unknown")), hidden, heads, kv_heads, head_dim,
                   int(c.vocab_size), max_len, dtype, tuple(per_layer), tuple(eos_token_ids))


def eos_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """Every id that ends a sequence: ``generation_config.eos_token_id`` (int or list), then the
    tokenizer's eos, deduplicated in that order."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
