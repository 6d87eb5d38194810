"""Gemma 3 (text) as a flat-batch ``Model``: paged KV, the native decode kernel, a sliding
window on ``sliding_attention`` layers.

Same math as transformers' ``models/gemma3/modeling_gemma3.py`` (Gemma3TextModel,
Gemma3ForCausalLM), op for op where rounding matters:
- embeddings scaled by ``sqrt(hidden_size)``, that scale cast to the weight dtype
  first (``Gemma3TextScaledWordEmbedding``: in bf16, sqrt(640) = 25.298 becomes 25.25);
- Gemma RMSNorm: in float32, ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, then cast back
  (unlike llama, the weight is applied before the cast); four per layer (input,
  post-attention, pre-feedforward, post-feedforward) and QK-norm over head_dim;
- RoPE with the inverse frequencies and attention scaling of the layer's type
  (``rope_parameters[layer_type]``: local 10,000 / global 1,000,000 by default;
  other static rope types through transformers' ``ROPE_INIT_FUNCTIONS``);
- attention scale ``query_pre_attn_scalar ** -0.5``; MLP ``down(gelu_tanh(gate(x)) * up(x))``;
- final logit soft-capping when ``final_logit_softcapping`` is set (None for Gemma 3).
``attn_logit_softcapping`` is ignored, as transformers' Gemma3Attention does (it
never passes it to the attention function; Gemma 3 replaced it by QK-norm).

q/k/v and gate/up run as one GEMM each (concatenated weights; over a transformers
model the original Linear weights become views, as in llama.py), and bf16 projections
are pre-packed for oneDNN at the first decode step where that is bit-exact.

Raises ValueError at construction for what it cannot reproduce: bidirectional
attention, and RoPE types whose frequencies change with the sequence length
(dynamic, longrope).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .attention import PagedBatch, attend
from .llama import Cat, Get, _can_pack, _fuse, _Proj, _proj_from, _rope
from .model_spec import FULL, SLIDING, ModelSpec

MODEL_TYPES = {"gemma3_text"}


def _norm(x: torch.Tensor, w1: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm: ``w1`` is ``1 + weight`` in float32 (precomputed; the same bits)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * w1).type_as(x)


class _TypeRope:
    """Gemma3RotaryEmbedding for one layer type: cos/sin [T, D] in the model dtype."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        self.inv_freq, self.attention_scaling = inv_freq.float(), attention_scaling

    @classmethod
    def of_config(cls, config: Any, layer_type: str, head_dim: int) -> "_TypeRope":
        params = config.rope_parameters[layer_type]
        rope_type = params.get("rope_type", "default")
        _check_rope_type(rope_type)
        if rope_type == "default":   # Gemma3RotaryEmbedding.compute_default_rope_parameters
            theta = params["rope_theta"]
            return cls(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        return cls(inv_freq, scaling)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(device=positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _check_rope_type(rope_type: str) -> None:
    if "dynamic" in rope_type or rope_type == "longrope":
        raise ValueError(f"Gemma3Forward: rope_type {rope_type!r} changes its frequencies with the "
                         "sequence length; only static RoPE types are supported")


@dataclass
class _Layer:
    in_norm: torch.Tensor     # each norm: 1 + weight, float32 [hidden] (q/k norms: [head_dim])
    qkv: _Proj
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: _Proj
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    gate_up: _Proj
    down: _Proj
    post_ff_norm: torch.Tensor
    norm_weights: tuple[torch.Tensor, ...]   # the checkpoint's own norm weights (for parameters())


class Gemma3Forward:
    """A Gemma 3 causal LM over the paged KV cache (implements ``model.Model``)."""

    spec: ModelSpec
    batch_invariant = True   # honours PagedBatch.row_tile (batch_invariant.py)

    @staticmethod
    def supports(model) -> bool:
        """Whether a transformers model is a Gemma 3 text LM this forward can run."""
        c = getattr(model, "config", None)
        return getattr(c, "model_type", None) in MODEL_TYPES and not getattr(c, "use_bidirectional_attention", False)

    @classmethod
    def for_model(cls, model, spec: ModelSpec | None = None) -> "Gemma3Forward":
        """Over a transformers model; built once per model object (fusing happens once), and a
        shallow copy (every tensor shared) when an engine brings its own ``spec`` (eos ids,
        context length)."""
        import copy
        inst = getattr(model, "_cbgen_gemma3_forward", None)
        if inst is None or inst.embed.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            inst = cls.from_hf(model)
            model._cbgen_gemma3_forward = inst
        if spec is not None and spec != inst.spec:
            inst = copy.copy(inst)
            inst.spec = spec
        return inst

    @classmethod
    def from_hf(cls, model) -> "Gemma3Forward":
        """Over a transformers Gemma3ForCausalLM's own weights (q/k/v and gate/up become
        views of fused tensors; the model keeps working with transformers)."""
        c, base = model.config, model.model
        with torch.no_grad():
            layers = []
            for layer in base.layers[:c.num_hidden_layers]:
                a, m = layer.self_attn, layer.mlp
                norms = (layer.input_layernorm.weight, a.q_norm.weight, a.k_norm.weight,
                         layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
                         layer.post_feedforward_layernorm.weight)
                layers.append(cls._layer(norms, _Proj(*_fuse([a.q_proj, a.k_proj, a.v_proj])),
                                         _Proj(a.o_proj.weight.detach(), a.o_proj.bias),
                                         _Proj(*_fuse([m.gate_proj, m.up_proj])),
                                         _Proj(m.down_proj.weight.detach(), m.down_proj.bias)))
            embed = base.embed_tokens.weight.detach()
            embed_scale = base.embed_tokens.embed_scale.to(embed.dtype)
            ropes = {t: _TypeRope(getattr(base.rotary_emb, f"{t}_inv_freq"),
                                  getattr(base.rotary_emb, f"{t}_attention_scaling"))
                     for t in set(c.layer_types)}
            for t in ropes:
                _check_rope_type(base.rotary_emb.rope_type[t])
            head = model.lm_head.weight.detach()
        return cls(c, embed, embed_scale, ropes, layers, base.norm.weight.detach(), head)

    @classmethod
    def from_tensors(cls, spec: ModelSpec | None, config: Any, get: Get, cat: Cat | None = None) -> "Gemma3Forward":
        """From checkpoint tensors by their transformers names (``get`` returns None for an
        absent bias), already in the target dtype and device; ``cat`` fuses q/k/v and gate/up
        (llama.py's ``_proj_from``). ``config``: a transformers ``Gemma3TextConfig`` (its
        defaults fill layer_types and rope_parameters); ``spec`` (eos ids, context length)
        replaces the one derived from ``config`` when given."""
        inst = cls._from_tensors(config, get, cat)
        inst.owns_weights = True
        if spec is not None:
            assert spec.sliding_windows == inst.spec.sliding_windows, "spec and config disagree"
            inst.spec = spec
        return inst

    @classmethod
    def _from_tensors(cls, config: Any, get: Get, cat: Cat | None) -> "Gemma3Forward":
        proj = functools.partial(_proj_from, get, cat=cat)
        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            norms = tuple(get(p + n + ".weight") for n in (
                "input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                "pre_feedforward_layernorm", "post_feedforward_layernorm"))
            layers.append(cls._layer(norms, proj(*(p + f"self_attn.{x}_proj" for x in "qkv")),
                                     proj(p + "self_attn.o_proj"), proj(p + "mlp.gate_proj", p + "mlp.up_proj"),
                                     proj(p + "mlp.down_proj")))
        embed = get("model.embed_tokens.weight")
        # Gemma3TextScaledWordEmbedding: a float32 buffer, cast to the weight dtype at use.
        embed_scale = torch.tensor(config.hidden_size ** 0.5).to(embed.dtype)
        head_dim = config.head_dim
        ropes = {t: _TypeRope.of_config(config, t, head_dim) for t in set(config.layer_types)}
        head = embed if getattr(config, "tie_word_embeddings", True) else get("lm_head.weight")
        return cls(config, embed, embed_scale, ropes, layers, get("model.norm.weight"), head)

    @staticmethod
    def _layer(norms: tuple[torch.Tensor, ...], qkv: _Proj, o: _Proj, gate_up: _Proj, down: _Proj) -> _Layer:
        w1 = [1.0 + w.detach().float() for w in norms]   # Gemma3RMSNorm's (1.0 + weight.float())
        return _Layer(w1[0], qkv, w1[1], w1[2], o, w1[3], w1[4], gate_up, down, w1[5], tuple(norms))

    def __init__(self, config: Any, embed: torch.Tensor, embed_scale: torch.Tensor,
                 ropes: dict[str, _TypeRope], layers: list[_Layer], norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma3Forward: use_bidirectional_attention is not supported (causal LMs only)")
        dtype = str(embed.dtype).removeprefix("torch.")
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.spec = ModelSpec.from_config(config, dtype=dtype, eos_token_ids=eos)
        self.embed, self.embed_scale, self.layers = embed, embed_scale, layers
        self.norm_weight, self.norm = norm, 1.0 + norm.detach().float()
        self.lm_head = _Proj(lm_head, None)
        self.layer_types = [SLIDING if w else FULL for w in self.spec.sliding_windows]
        assert list(config.layer_types[:len(layers)]) == self.layer_types, "spec and config disagree on layer types"
        self.windows = self.spec.sliding_windows
        # Built from checkpoint tensors, not over a transformers model's parameters (hugepages.py).
        self.owns_weights = False
        self.ropes = ropes
        self.eps = config.rms_norm_eps
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.intermediate = config.intermediate_size
        if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma3Forward: hidden_activation {config.hidden_activation!r} is not supported "
                             "(only gelu_pytorch_tanh)")
        self.pack_pending = _can_pack(embed.dtype, embed.device)
        # Tied: the head is the embedding's storage (fixed at load; quantizing gives it a tensor of its own).
        self.tied = self.lm_head.w.data_ptr() == embed.data_ptr()

    def projections(self) -> list[_Proj]:
        return [self.lm_head] + [p for L in self.layers for p in (L.qkv, L.o, L.gate_up, L.down)]

    def pack(self) -> None:
        """Pre-pack every bf16 projection where that is bit-exact (llama.py's _Proj.pack); idempotent."""
        self.pack_pending = False
        with torch.no_grad():
            for p in self.projections():
                p.pack()

    def parameters(self) -> Iterator[torch.Tensor]:
        """Each distinct weight once (a tied LM head is the embedding)."""
        yield self.embed
        for L in self.layers:
            yield from L.norm_weights
            for p in (L.qkv, L.o, L.gate_up, L.down):
                yield p.w
                if p.b is not None:
                    yield p.b
        yield self.norm_weight
        if not self.tied:
            yield self.lm_head.w

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                keep: torch.Tensor) -> torch.Tensor | None:
        """ids, positions: int64 [T]; keep: int64 rows to return logits for.
        Returns [len(keep), vocab] in the model dtype, or None when ``keep`` is empty."""
        if self.pack_pending and batch.num_decodes:
            self.pack()
        T = ids.shape[0]
        H, KVH, D, I = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim, self.intermediate
        qd, kd = H * D, KVH * D
        eps, tile = self.eps, batch.row_tile
        h = F.embedding(ids, self.embed) * self.embed_scale
        rope = {t: tuple(x.unsqueeze(1) for x in r(positions, h.dtype)) for t, r in self.ropes.items()}  # [T, 1, D]
        for i, L in enumerate(self.layers):
            x = _norm(h, L.in_norm, eps)
            qkv = L.qkv(x, tile)
            q = _norm(qkv[:, :qd].view(T, H, D), L.q_norm, eps)
            k = _norm(qkv[:, qd:qd + kd].view(T, KVH, D), L.k_norm, eps)
            v = qkv[:, qd + kd:].view(T, KVH, D)
            cos, sin = rope[self.layer_types[i]]
            o = attend(batch, i, _rope(q, cos, sin), _rope(k, cos, sin), v, self.scale, window=self.windows[i])
            h = h + _norm(L.o(o.reshape(T, qd), tile), L.post_attn_norm, eps)
            gu = L.gate_up(_norm(h, L.pre_ff_norm, eps), tile)
            h = h + _norm(L.down(F.gelu(gu[:, :I], approximate="tanh") * gu[:, I:], tile), L.post_ff_norm, eps)
        if keep.numel() == 0:
            return None
        logits = self.lm_head(_norm(h[keep], self.norm, eps), tile)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
