"""TransformersForward: a transformers module tree run on the paged engine.

The model's own modules compute everything but attention, which transformers
routes through its AttentionInterface to ``attention.paged_attention`` (it reads
and writes the paged KV pool through the ``cbgen_batch`` keyword). transformers
builds no mask for that interface name, so the flat ``[1, T]`` batch of many
sequences costs nothing extra. Slower than the native forwards (module calls,
[1, H, T, D] transposes) but exact for every architecture listed in
``architectures.PAGED_MODULES``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from . import attention
from .attention import PagedBatch
from .model_spec import ModelSpec


class TransformersForward:
    """The Model protocol over a transformers causal LM (``model`` keeps working on its own)."""

    def __init__(self, model: Any, spec: ModelSpec) -> None:
        self.hf_model, self.spec = model, spec
        model.set_attn_implementation(attention.register())

    def parameters(self) -> Iterator[torch.Tensor]:
        return self.hf_model.parameters()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                keep: torch.Tensor) -> torch.Tensor | None:
        """ids, positions: int64 [T]; keep: int64 [R]. Returns logits [R, V] or None when R == 0."""
        if keep.numel() == 0:
            self.hf_model.base_model(input_ids=ids[None], position_ids=positions[None], use_cache=False,
                                     cbgen_batch=batch)
            return None
        return self.hf_model(input_ids=ids[None], position_ids=positions[None], use_cache=False,
                             logits_to_keep=keep, cbgen_batch=batch).logits[0]
