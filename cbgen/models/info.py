"""Plain facts about a loaded model, for ``cbgen info``."""

from __future__ import annotations

from typing import Any

from .load import LoadedModel, eos_token_ids


def _kernel_status(loaded: LoadedModel) -> str:
    """Which decode attention an engine on this model would use (the runner's own choice)."""
    from cbgen.config import EngineConfig
    from cbgen.engine.runner import choose_kernel
    try:
        kernel, why = choose_kernel(loaded.model, loaded.device, EngineConfig())
    except ValueError as e:   # an architecture the paged engine does not serve
        return f"none: {e}"
    return f"native C kernel ({kernel.path})" if kernel is not None else f"torch (gather + SDPA): {why}"


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """Plain, JSON-serialisable facts about ``loaded`` for ``cbgen info``."""
    import torch
    import transformers

    config = loaded.model.config
    return {
        "name": loaded.name,
        "source": loaded.source,
        "path": str(loaded.path),
        "origin": str(loaded.origin),
        "architecture": (getattr(config, "architectures", None) or [type(loaded.model).__name__])[0],
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "dtype_reason": loaded.dtype_reason,
        "device": str(loaded.device),
        "context_length": loaded.max_model_len,
        "vocab_size": len(loaded.tokenizer),
        "eos_token_ids": list(eos_token_ids(loaded.tokenizer, loaded.model)),
        "chat_template": loaded.has_chat_template,
        "implementation": ("cbgen native forward (no transformers modules)" if loaded.native else
                           f"transformers, attention {config._attn_implementation}"),
        "attention_kernel": _kernel_status(loaded),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_seconds": round(loaded.load_seconds, 3),
        "converted": loaded.converted,
    }
