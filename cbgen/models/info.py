"""Plain facts about a loaded model, for ``cbgen info``."""

from __future__ import annotations

from typing import Any

from .load import LoadedModel

IMPLEMENTATIONS = {
    "native": "cbgen native forward (no transformers modules)",
    "transformers": "transformers modules with cbgen's paged attention",
    "fallback": "transformers fallback (one sequence at a time, transformers' own cache; slower)",
}


def _kernel_status(loaded: LoadedModel) -> str:
    """Which decode attention an engine on this model would use (the runner's own choice)."""
    from cbgen.config import EngineConfig
    from cbgen.engine.runner import choose_kernel
    try:
        kernel, why = choose_kernel(loaded.spec, loaded.device, EngineConfig())
    except ValueError as e:   # an architecture the paged engine does not serve
        return f"none: {e}"
    return f"native C kernel ({kernel.path})" if kernel is not None else f"torch (gather + SDPA): {why}"


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """Plain, JSON-serialisable facts about ``loaded`` for ``cbgen info``."""
    import torch
    import transformers

    spec = loaded.spec
    hf_config = None if loaded.native else loaded.model.config
    return {
        "name": loaded.name,
        "source": loaded.source,
        "path": str(loaded.path),
        "origin": str(loaded.origin),
        "architecture": (getattr(hf_config, "architectures", None) or [type(loaded.model).__name__])[0],
        "model_type": spec.architecture,
        "layers": spec.num_layers,
        "heads": f"{spec.num_heads} query / {spec.num_kv_heads} KV, head_dim {spec.head_dim}",
        "attention": spec.attention_summary,
        "rope_theta": sorted({layer.rope_theta for layer in spec.layers}),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "dtype_reason": loaded.dtype_reason,
        "quantize": loaded.quantize,
        "quantize_reason": loaded.quantize_reason,
        "device": str(loaded.device),
        "context_length": loaded.max_model_len,
        "vocab_size": len(loaded.tokenizer),
        "eos_token_ids": list(spec.eos_token_ids),
        "chat_template": loaded.has_chat_template,
        "implementation": IMPLEMENTATIONS.get(loaded.serving, loaded.serving),
        "attention_kernel": _kernel_status(loaded),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_seconds": round(loaded.load_seconds, 3),
        "converted": loaded.converted,
    }
