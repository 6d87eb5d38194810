"""A flat-batch forward for llama-family weights (llama, mistral, qwen2), used instead
of transformers' module tree when the model allows it, and ``NativeLlama``, the
model object for checkpoints loaded without transformers' modelling code at all
(cbgen/models/load.py does that for plain-RoPE llama-family dirs: it saves ~1.6 s of
imports at start-up).

Same math as transformers' LlamaModel, op for op where rounding matters (RMSNorm
in float32 then cast, then the weight; RoPE as q*cos + rotate_half(q)*sin, with
cos/sin from the model's own rotary module for transformers models, so every
rope-scaling variant is honoured; natively loaded checkpoints are limited to the
default RoPE, reproduced op for op by ``DefaultRope``), but:
- one GEMM for q/k/v and one for gate/up: the weights are concatenated once and
  the original Linear weights become views into them (no extra memory, and the
  transformers path, e.g. HF ``generate`` on the same model, keeps working);
- no nn.Module calls, masks or [1, H, T, D] transposes: ~15 tensor ops per layer
  instead of ~40, which is a tenth of a decode step at batch 64 on CPU;
- bf16 weights on CPU are pre-packed once into oneDNN's blocked layout
  (``mkldnn._reorder_linear_weight``): 15-25% faster GEMMs at batch 64 and ~2x
  at batch 1, because the unpacked path re-lays the weight out on every call.
  A projection is packed only if a probe shows the packed GEMM bit-identical to
  ``F.linear`` on this machine, so packing never changes results. It costs a
  second copy of those weights (~0.25 GB for a 135M model) and ~0.3 s (packing
  plus oneDNN's first-call JIT), so it happens at the first decode step, not at
  load: a one-prompt, one-token run (the cold-start case) never pays for it.

Contract: ``LlamaForward.supports(model)`` says whether it applies to a
transformers model; ``forward`` takes the flat token ids / positions of one step
and returns logits at ``keep`` (or None when ``keep`` is empty: a prefill-only step).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .attention import PagedBatch, attend
from .model_spec import ModelSpec

NATIVE_MODEL_TYPES = {"llama", "mistral", "qwen2"}


class _Proj:
    """y = x W^T + b, through a pre-packed oneDNN weight where that is exact (see above)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.w, self.b, self.packed = w, b, None

    def pack(self) -> None:
        if not _reorder_works():
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.w)
        probe = torch.randn(3, self.w.shape[1], generator=torch.Generator().manual_seed(0)).to(self.w.dtype)
        if torch.equal(self._packed(probe, packed), F.linear(probe, self.w, self.b)):
            self.packed = packed

    def _packed(self, x: torch.Tensor, packed) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.b, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b) if self.packed is None else self._packed(x, self.packed)


def _can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and _reorder_works())


@functools.cache
def _reorder_works() -> bool:
    """oneDNN's bf16 packing needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on other CPUs
    (e.g. AMD Zen 3, AVX2 only) ``_reorder_linear_weight`` raises RuntimeError."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: _Proj
    o: _Proj
    post_norm: torch.Tensor
    gate_up: _Proj
    down: _Proj


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along the output dim and
    make each Linear's parameters views into the result."""
    w = torch.cat([m.weight.detach() for m in linears])
    has_bias = [m.bias is not None for m in linears]
    b = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
    if any(has_bias) and b is None:
        raise ValueError("mixed biases")
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[row:row + n], requires_grad=False)
        if b is not None:
            m.bias = torch.nn.Parameter(b[row:row + n], requires_grad=False)
        row += n
    return w, b


def head_dim_of(c) -> int:
    """A config's head_dim, or hidden_size / heads where it does not say."""
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


class DefaultRope:
    """transformers' default RoPE (rope_type "default"), op for op: same cos/sin bits."""

    def __init__(self, theta: float, head_dim: int) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class LlamaForward:
    @staticmethod
    def supports(model) -> bool:
        """Whether a transformers model can run through this forward."""
        if isinstance(model, NativeLlama):
            return True
        c = model.config
        if c.model_type not in NATIVE_MODEL_TYPES or getattr(c, "hidden_act", "silu") != "silu":
            return False
        layer = model.model.layers[0]
        return all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            not hasattr(layer.self_attn, "q_norm")

    @classmethod
    def for_model(cls, model) -> "LlamaForward":
        """One instance per model object (fusing is done once, however many engines are built).

        Rebuilt when the model's weights moved since (``model.to(dtype)`` or a deepcopy
        replaces the tensors the fused views point into)."""
        if isinstance(model, NativeLlama):
            return model.impl
        inst = getattr(model, "_cbgen_llama_forward", None)
        if inst is None or not inst._current(model):
            inst = cls.from_hf(model)
            model._cbgen_llama_forward = inst
        return inst

    def _current(self, model) -> bool:
        q = model.model.layers[0].self_attn.q_proj.weight
        return (self.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
                and q.data_ptr() == self.layers[0].qkv.w.data_ptr() and q.dtype == self.layers[0].qkv.w.dtype)

    @classmethod
    def from_hf(cls, model) -> "LlamaForward":
        """Over a transformers model's own weights; q/k/v and gate/up become views of fused tensors."""
        c, base = model.config, model.model
        layers = []
        with torch.no_grad():
            for layer in base.layers[:c.num_hidden_layers]:
                a, m = layer.self_attn, layer.mlp
                layers.append(_Layer(
                    layer.input_layernorm.weight, _Proj(*_fuse([a.q_proj, a.k_proj, a.v_proj])),
                    _Proj(a.o_proj.weight.detach(), a.o_proj.bias), layer.post_attention_layernorm.weight,
                    _Proj(*_fuse([m.gate_proj, m.up_proj])), _Proj(m.down_proj.weight.detach(), m.down_proj.bias)))
            lm_head = _Proj(model.lm_head.weight.detach(), None)
        spec = SimpleNamespace(**{**c.to_dict(), "head_dim": head_dim_of(c)})
        embed = base.embed_tokens.weight
        return cls(spec, embed, base.rotary_emb, layers, base.norm.weight, base.norm.variance_epsilon, lm_head,
                   base.layers[0].self_attn.scaling, _can_pack(embed.dtype, embed.device))

    @classmethod
    def from_tensors(cls, c: SimpleNamespace, get: Callable[[str], torch.Tensor | None]) -> "LlamaForward":
        """From checkpoint tensors by their transformers names (``get`` returns None if absent),
        already in the target dtype and device."""
        def proj(*names: str) -> _Proj:
            ws = [get(f"{n}.weight") for n in names]
            bs = [get(f"{n}.bias") for n in names]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            b = None if bs[0] is None else bs[0] if len(bs) == 1 else torch.cat(bs)
            return _Proj(w, b)
        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            layers.append(_Layer(get(p + "input_layernorm.weight"),
                                 proj(*(p + f"self_attn.{x}_proj" for x in "qkv")), proj(p + "self_attn.o_proj"),
                                 get(p + "post_attention_layernorm.weight"),
                                 proj(p + "mlp.gate_proj", p + "mlp.up_proj"), proj(p + "mlp.down_proj")))
        embed = get("model.embed_tokens.weight")
        head = embed if c.tie_word_embeddings else get("lm_head.weight")
        return cls(c, embed, DefaultRope(c.rope_theta, c.head_dim), layers, get("model.norm.weight"),
                   c.rms_norm_eps, _Proj(head, None), c.head_dim ** -0.5, _can_pack(embed.dtype, embed.device))

    def __init__(self, c, embed: torch.Tensor, rotary, layers: list[_Layer], norm: torch.Tensor, eps: float,
                 lm_head: _Proj, scale: float, pack: bool) -> None:
        self.embed, self.rotary, self.layers, self.norm, self.eps = embed, rotary, layers, norm, eps
        self.lm_head, self.scale, self.pack_pending = lm_head, scale, pack
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = c.head_dim
        self.intermediate = c.intermediate_size
        # Per layer: None (full) or the sliding window (Mistral's sliding_window, Qwen2's layer_types).
        self.windows = ModelSpec.from_config(c, dtype=str(embed.dtype).removeprefix("torch.")).sliding_windows

    def projections(self) -> list[_Proj]:
        return [self.lm_head] + [p for L in self.layers for p in (L.qkv, L.o, L.gate_up, L.down)]

    def pack(self) -> None:
        """Pre-pack every bf16 projection (see the module docstring); idempotent."""
        self.pack_pending = False
        with torch.no_grad():
            for p in self.projections():
                p.pack()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                keep: torch.Tensor) -> torch.Tensor | None:
        """ids, positions: [T]; keep: rows to return logits for. Returns [len(keep), V] or None."""
        if self.pack_pending and batch.num_decodes:
            self.pack()
        T = ids.shape[0]
        H, KVH, D, I = self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        qd, kd = H * D, KVH * D
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].contiguous(), sin[0].contiguous()                  # [T, D]
        cos3, sin3 = cos.unsqueeze(1), sin.unsqueeze(1)                      # [T, 1, D], per head
        eps, fused = self.eps, batch.fused
        last = len(self.layers) - 1

        def add_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
            """(h + delta, RMSNorm of that): the residual stream and the next block's input."""
            if fused is not None:
                return h, fused.add_rmsnorm(h, delta, weight, eps)   # h updated in place
            h = h if delta is None else h + delta
            return h, _rms(h, weight, eps)

        h, x = add_norm(h, None, self.layers[0].in_norm)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(x)
            if fused is not None:
                q, k = fused.rope_qk(qkv, cos, sin, H, KVH)
            else:
                q = _rope(qkv[:, :qd].view(T, H, D), cos3, sin3)
                k = _rope(qkv[:, qd:qd + kd].view(T, KVH, D), cos3, sin3)
            v = qkv[:, qd + kd:].view(T, KVH, D)
            o = attend(batch, i, q, k, v, self.scale, window=self.windows[i])
            h, x = add_norm(h, L.o(o.view(T, qd)), L.post_norm)
            gu = L.gate_up(x)
            mlp = L.down(F.silu(gu[:, :I]) * gu[:, I:])
            if i < last:
                h, x = add_norm(h, mlp, self.layers[i + 1].in_norm)
        if keep.numel() == 0:
            return None
        # After the last layer only the sampling rows matter (one per prefill chunk).
        _, x = add_norm(h[keep], mlp[keep], self.norm)
        return self.lm_head(x)


class NativeLlama:
    """A llama-family checkpoint loaded without transformers' modelling code.

    Offers what the engine and front-ends read from a model: ``config`` (the
    config.json fields as attributes), ``generation_config``, ``dtype``,
    ``parameters()``; the forward itself is ``impl`` (a LlamaForward). It
    cannot ``generate`` on its own: the engine is its only driver.
    """

    def __init__(self, config: SimpleNamespace, generation_config: SimpleNamespace, impl: LlamaForward) -> None:
        self.config, self.generation_config, self.impl = config, generation_config, impl

    @property
    def dtype(self) -> torch.dtype:
        return self.impl.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.impl.embed.device

    def parameters(self) -> Iterator[torch.Tensor]:
        """Each distinct weight once (a tied LM head is the embedding)."""
        yield self.impl.embed
        for L in self.impl.layers:
            yield from (L.in_norm, L.post_norm)
            for p in (L.qkv, L.o, L.gate_up, L.down):
                yield p.w
                if p.b is not None:
                    yield p.b
        yield self.impl.norm
        if self.impl.lm_head.w is not self.impl.embed:
            yield self.impl.lm_head.w
