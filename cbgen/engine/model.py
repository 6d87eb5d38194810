"""The one interface the runner calls: ``Model.forward`` over a flat, unpadded batch.

Every way of running a model implements it: the native llama-family forward
(``llama.LlamaForward``), the native Gemma 3 forward, and transformers' own
module tree with cbgen's paged attention plugged in (``hf_forward.TransformersForward``).
The runner has one execute path; which implementation serves which
architecture is decided in one place at load time (``cbgen/models/architectures.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from .model_spec import ModelSpec

if TYPE_CHECKING:
    import torch

    from .attention import PagedBatch


@runtime_checkable
class Model(Protocol):
    """A causal LM the engine can step.

    ``spec``: architecture, geometry, per-layer attention, dtype, vocab, eos ids.

    ``forward(ids, positions, batch, keep)``: ``ids`` and ``positions`` are int64
    ``[T]``, the flattened new tokens of every scheduled sequence (decodes first,
    then prefill chunks; no padding). ``batch`` (``attention.PagedBatch``) holds
    the paged KV pool and where each token's K/V goes and what it attends to;
    the forward writes this step's K/V into it. ``keep`` is int64 ``[R]``, the
    rows whose logits are wanted. Returns float logits ``[R, vocab_size]`` in
    the model dtype, or None when ``keep`` is empty (a prefill-only step).

    ``parameters()``: every distinct weight tensor once (for counts and memory).

    ``release(key)``, optional: a model that keeps its own KV cache (``spec.kv_pool``
    False: the transformers fallback, hf_fallback.py) forgets sequence ``key``'s
    cache; the engine calls it when the sequence finishes, is aborted or preempted.
    """

    spec: ModelSpec

    def forward(self, ids: "torch.Tensor", positions: "torch.Tensor", batch: "PagedBatch",
                keep: "torch.Tensor") -> "torch.Tensor | None": ...

    def parameters(self) -> Iterator["torch.Tensor"]: ...
