"""LlamaForward: the Model protocol (model.py) for llama-family weights (llama, mistral,
qwen2), used instead of transformers' module tree when the model allows it. It runs
over a transformers model's own weights (``for_model``) or straight from checkpoint
tensors (``from_tensors``: cbgen/models/load.py does that, without importing
transformers' modelling code at all, which saves ~1.6 s of start-up).

Same math as transformers' LlamaModel, op for op where rounding matters (RMSNorm
in float32 then cast, then the weight; RoPE as q*cos + rotate_half(q)*sin, with
cos/sin from the model's own rotary module for transformers models, so every
rope-scaling variant is honoured; natively loaded checkpoints are limited to the
static RoPE types, reproduced op for op by ``Rope``), but:
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
  plus oneDNN's first-call JIT), so it happens at the first decode step that
  reaches oneDNN, not at load: a one-prompt, one-token run (the cold-start case)
  never pays for it, nor does a run whose decode steps all take the one-call
  native step (decode_forward.py; ~150 ms, 0.6 ms a token of a 256-token run).

Contract: ``LlamaForward.supports(model)`` says whether it applies to a
transformers model; ``forward`` takes the flat token ids / positions of one step
and returns logits at ``keep`` (or None when ``keep`` is empty: a prefill-only step).
"""

from __future__ import annotations

import copy
import functools

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .attention import PagedBatch, attend
from .batch_invariant import tiled
from .model_spec import ModelSpec

NATIVE_MODEL_TYPES = {"llama", "mistral", "qwen2"}


class _Proj:
    """y = x W^T + b, through a pre-packed oneDNN weight where that is exact (see above), or
    through the native few-row GEMM (linear_rows.py) for calls of at most ``rows_max`` rows."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.w, self.b, self.packed = w, b, None
        # Weight-only int8 (quantize.py): q [N, K] int8 and scale [N] float32; w is then
        # q * scale in the model dtype, for the calls the native kernel does not take.
        self.q: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        # The native few-row GEMM bound to these weights, and the most rows it takes per call (0: none).
        self.rows, self.rows_max = None, 0
        self.huge_pages = False   # the weight the GEMMs read was moved onto huge pages (hugepages.py)

    def use_rows(self, kernel, rows_max: int) -> None:
        """Calls of at most ``rows_max`` rows go through ``kernel`` (a linear_rows.LinearRows;
        None or 0: never)."""
        self.rows_max = rows_max if kernel is not None else 0
        b32 = None if self.b is None else self.b.float().contiguous()
        self.rows = None if kernel is None else kernel.bind(self.w if self.q is None else self.q, self.scale, b32)

    def pack(self) -> None:
        if not _reorder_works() or self.rows_max >= ALL_ROWS:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.w)
        probe = torch.randn(3, self.w.shape[1], generator=torch.Generator().manual_seed(0)).to(self.w.dtype)
        if torch.equal(self._packed(probe, packed), F.linear(probe, self.w, self.b)):
            self.packed = packed

    def _packed(self, x: torch.Tensor, packed) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.b, "none", [], "")

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b) if self.packed is None else self._packed(x, self.packed)

    def __call__(self, x: torch.Tensor, row_tile: int | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out]. With ``row_tile`` (deterministic), batch-invariant: through the
        native kernel if every call of this projection goes there (it is invariant by
        construction), else through torch on fixed row tiles (batch_invariant.py)."""
        if kernel_takes(x.shape[0], self.rows_max, row_tile):
            return self.rows(x, x.dtype)
        if row_tile is not None:
            return tiled(self._torch, x, row_tile, self.w if self.packed is None else None, self.b)
        return self._torch(x)


ALL_ROWS = 1 << 30   # rows_max for "every call"


def kernel_takes(rows: int, rows_max: int, row_tile: int | None) -> bool:
    """Whether a call of ``rows`` rows goes to the few-row kernel of a projection bound with
    ``rows_max`` (_Proj, and decode_forward.NativeDecode for a whole step). In deterministic mode
    (``row_tile`` set) only where the kernel takes every row count: it is batch-invariant by
    itself, but a row threshold would send one token through two GEMMs depending on its batch."""
    return rows <= rows_max and (row_tile is None or rows_max >= ALL_ROWS)


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


Get = Callable[[str], torch.Tensor | None]
Cat = Callable[[Sequence[str]], torch.Tensor | None]


def _cat(get: Get, names: Sequence[str]) -> torch.Tensor | None:
    """``torch.cat`` of ``get``'s tensors along dim 0; None when all are absent (None), ValueError when some are."""
    ts = [get(n) for n in names]
    if all(t is None for t in ts):
        return None
    if any(t is None for t in ts):
        raise ValueError(f"mixed biases: {', '.join(names)}")
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _proj_from(get: Get, *names: str, cat: Cat | None = None) -> _Proj:
    """The projection of the checkpoint modules ``names`` (e.g. a layer's q, k and v) as one GEMM:
    their ``.weight`` tensors concatenated along the output dim, their ``.bias`` tensors likewise
    (None when none has one). ``get`` returns a tensor by name (None for an absent bias);
    ``cat`` concatenates named tensors the same way, faster where the loader can (e.g. a view of
    pieces stored back to back: cbgen/models/checkpoint.py); default: ``torch.cat`` of ``get``'s.
    Raises ValueError when some of them have a bias and others do not."""
    cat = cat or functools.partial(_cat, get)
    return _Proj(cat([f"{n}.weight" for n in names]), cat([f"{n}.bias" for n in names]))


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


# Rope types whose frequencies do not depend on the sequence length ("dynamic" and
# "longrope" re-scale as a sequence grows: those checkpoints take transformers' modules).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class Rope:
    """transformers' rotary embedding (``LlamaRotaryEmbedding``), op for op: same cos/sin bits.

    ``inv_freq``: float32 [head_dim / 2]; ``attention_scaling`` multiplies cos and sin
    (1.0 except for yarn-style types).
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq, self.attention_scaling = inv_freq, attention_scaling

    @classmethod
    def default(cls, theta: float, head_dim: int) -> "Rope":
        return cls(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)))

    @classmethod
    def from_config(cls, config, rope_type: str) -> "Rope":
        """A static scaled RoPE (``STATIC_ROPE_TYPES``) from a transformers config, through
        ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (imported only here)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        return cls(inv_freq.float(), float(scaling))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_scaling == 1.0:
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class LlamaForward:
    """The Model protocol (model.py) for llama-family weights; see the module docstring."""

    batch_invariant = True   # honours PagedBatch.row_tile (batch_invariant.py)

    @staticmethod
    def supports(model) -> bool:
        """Whether a transformers model's module layout fits this forward."""
        c = model.config
        if c.model_type not in NATIVE_MODEL_TYPES or getattr(c, "hidden_act", "silu") != "silu":
            return False
        layer = model.model.layers[0]
        return all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            not hasattr(layer.self_attn, "q_norm")

    @classmethod
    def for_model(cls, model, spec: ModelSpec | None = None) -> "LlamaForward":
        """Over a transformers model; one instance per model object (fusing is done once,
        however many engines are built). ``spec`` defaults to the model's own.

        Rebuilt when the model's weights moved since (``model.to(dtype)`` or a deepcopy
        replaces the tensors the fused views point into)."""
        inst = getattr(model, "_cbgen_llama_forward", None)
        if inst is None or not inst._current(model):
            from .architectures import spec_of
            inst = cls.from_hf(model, spec or spec_of(model))
            model._cbgen_llama_forward = inst
        if spec is not None and spec != inst.spec:
            # Another engine on the same weights with its own eos ids or context length:
            # a shallow copy shares every tensor (and the packing) but not the spec.
            inst = copy.copy(inst)
            inst.spec = spec
        return inst

    def _current(self, model) -> bool:
        q = model.model.layers[0].self_attn.q_proj.weight
        return (self.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
                and q.data_ptr() == self.layers[0].qkv.w.data_ptr() and q.dtype == self.layers[0].qkv.w.dtype)

    @classmethod
    def from_hf(cls, model, spec: ModelSpec) -> "LlamaForward":
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
        embed = base.embed_tokens.weight
        return cls(spec, c.intermediate_size, embed, base.rotary_emb, layers, base.norm.weight,
                   base.norm.variance_epsilon, lm_head, base.layers[0].self_attn.scaling,
                   _can_pack(embed.dtype, embed.device))

    @classmethod
    def from_tensors(cls, spec: ModelSpec, c, get: Get, cat: Cat | None = None) -> "LlamaForward":
        """From checkpoint tensors by their transformers names (``get`` returns None for a missing
        bias), already in the target dtype and device; ``cat`` fuses q/k/v and gate/up (see
        ``_proj_from``); ``c``: config.json's fields as attributes (``intermediate_size``,
        ``rms_norm_eps``, ``tie_word_embeddings``); a transformers config object when the rope
        type is not "default" (its frequencies come from transformers)."""
        proj = functools.partial(_proj_from, get, cat=cat)
        layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            layers.append(_Layer(get(p + "input_layernorm.weight"),
                                 proj(*(p + f"self_attn.{x}_proj" for x in "qkv")), proj(p + "self_attn.o_proj"),
                                 get(p + "post_attention_layernorm.weight"),
                                 proj(p + "mlp.gate_proj", p + "mlp.up_proj"), proj(p + "mlp.down_proj")))
        embed = get("model.embed_tokens.weight")
        head = embed if c.tie_word_embeddings else get("lm_head.weight")
        rope_type = spec.layers[0].rope_type
        rope = (Rope.default(spec.layers[0].rope_theta, spec.head_dim) if rope_type == "default"
                else Rope.from_config(c, rope_type))
        inst = cls(spec, c.intermediate_size, embed, rope, layers, get("model.norm.weight"), c.rms_norm_eps,
                   _Proj(head, None), spec.head_dim ** -0.5, _can_pack(embed.dtype, embed.device))
        inst.owns_weights = True
        return inst

    def __init__(self, spec: ModelSpec, intermediate_size: int, embed: torch.Tensor, rotary, layers: list[_Layer],
                 norm: torch.Tensor, eps: float, lm_head: _Proj, scale: float, pack: bool) -> None:
        self.spec = spec
        self.embed, self.rotary, self.layers, self.norm, self.eps = embed, rotary, layers, norm, eps
        self.lm_head, self.scale, self.pack_pending = lm_head, scale, pack
        self.tied = lm_head.w is embed   # fixed at load: quantizing gives the head a tensor of its own
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.intermediate = intermediate_size
        # Built from checkpoint tensors, not over a transformers model's parameters (hugepages.py).
        self.owns_weights = False
        # Per layer: None (full) or the sliding window (Mistral's sliding_window, Qwen2's layer_types).
        self.windows = spec.sliding_windows

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def parameters(self) -> Iterator[torch.Tensor]:
        """Each distinct weight once (a tied LM head is the embedding)."""
        yield self.embed
        for L in self.layers:
            yield from (L.in_norm, L.post_norm)
            for p in (L.qkv, L.o, L.gate_up, L.down):
                yield p.w
                if p.b is not None:
                    yield p.b
        yield self.norm
        if not self.tied:
            yield self.lm_head.w

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
        T = ids.shape[0]
        H, KVH, D, I = self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        qd, kd = H * D, KVH * D
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].contiguous(), sin[0].contiguous()                  # [T, D]
        cos3, sin3 = cos.unsqueeze(1), sin.unsqueeze(1)                      # [T, 1, D], per head
        eps, fused, tile = self.eps, batch.fused, batch.row_tile
        native = batch.native_decode
        if native is not None and native.takes(batch, T):
            return native(h, cos, sin, batch, keep)   # the same ops as below, in one native call
        # Packed at the first decode step that reaches oneDNN: a one-call step never does (its rows
        # all take the few-row kernel), so a run of such steps never pays the packing or its memory.
        if self.pack_pending and batch.num_decodes:
            self.pack()
        last = len(self.layers) - 1

        def add_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
            """(h + delta, RMSNorm of that): the residual stream and the next block's input."""
            if fused is not None:
                return h, fused.add_rmsnorm(h, delta, weight, eps)   # h updated in place
            h = h if delta is None else h + delta
            return h, _rms(h, weight, eps)

        h, x = add_norm(h, None, self.layers[0].in_norm)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(x, tile)
            if fused is not None:
                q, k = fused.rope_qk(qkv, cos, sin, H, KVH)
            else:
                q = _rope(qkv[:, :qd].view(T, H, D), cos3, sin3)
                k = _rope(qkv[:, qd:qd + kd].view(T, KVH, D), cos3, sin3)
            v = qkv[:, qd + kd:].view(T, KVH, D)
            o = attend(batch, i, q, k, v, self.scale, window=self.windows[i])
            h, x = add_norm(h, L.o(o.view(T, qd), tile), L.post_norm)
            gu = L.gate_up(x, tile)
            act = fused.silu_mul(gu, I) if fused is not None else F.silu(gu[:, :I]) * gu[:, I:]
            mlp = L.down(act, tile)
            if i < last:
                h, x = add_norm(h, mlp, self.layers[i + 1].in_norm)
        if keep.numel() == 0:
            return None
        # After the last layer only the sampling rows matter (one per prefill chunk).
        _, x = add_norm(h[keep], mlp[keep], self.norm)
        return self.lm_head(x, tile)

    @torch.inference_mode()
    def greedy_steps(self, native, ids: torch.Tensor, positions: torch.Tensor, write_blocks: torch.Tensor,
                     write_offsets: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """S greedy decode steps of T sequences in one native call (decode_forward.NativeDecode.steps,
        whose argument shapes these are): ids [T] the last tokens, positions [S, T] int64 each
        step's. The embedding and RoPE are ``forward``'s, so the tokens [S, T] are those of S
        ``forward`` steps each followed by the sampler's argmax."""
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h.unsqueeze(0), positions.reshape(1, -1))
        return native.steps(h, cos[0].contiguous(), sin[0].contiguous(), write_blocks, write_offsets, tables, lens)
