"""The model wing: resolve what ``--model`` names, convert GGUF files, load, describe.

One noun a module: ``resolve`` (what a spec names, no loading), ``gguf``
(conversion into the cache), ``shards`` (safetensors written tensor by tensor),
``cache`` (``cbgen cache``: list, remove, prune), ``load`` (device, dtype,
weights, tokenizer), ``info`` (``cbgen info``), ``errors``. The engine never imports from here:
what it needs travels in the loaded model.

cbgen never downloads: ``HF_HUB_OFFLINE=1`` is defaulted before
huggingface_hub or transformers can be imported through this package.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cbgen.config import cache_root  # noqa: E402

from .errors import ModelError  # noqa: E402
from .info import model_info  # noqa: E402
from .load import LoadedModel, eos_token_ids, load_model, pick_device, pick_dtype  # noqa: E402
from .resolve import ResolvedModel, gguf_cache_path, resolve_model  # noqa: E402

__all__ = ["ModelError", "ResolvedModel", "LoadedModel", "resolve_model", "load_model",
           "model_info", "eos_token_ids", "pick_dtype", "pick_device", "cache_root",
           "gguf_cache_path"]
