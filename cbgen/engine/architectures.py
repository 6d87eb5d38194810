"""Which architectures the engine serves, and how: the one registry (vLLM's models/registry.py role).

Three ways to run a model, fastest first:

* ``native``: cbgen's own flat-batch forward over the checkpoint's tensors
  (``llama.LlamaForward``, ``gemma3.Gemma3Forward``); a native checkpoint
  loads without importing transformers' modelling code at all.
* ``transformers``: transformers' module tree with cbgen's paged attention
  plugged into its AttentionInterface (``hf_forward.TransformersForward``),
  for architectures whose attention goes through that interface with plain
  causal (or sliding-window) masks and one KV per layer.
* ``fallback``: anything else transformers can run as a causal LM, one
  sequence at a time with transformers' own cache (``hf_fallback``), slower,
  and announced with a notice.

``impl`` is the one knob (``ModelConfig.impl``, ``--impl``): ``auto`` takes
the fastest way that serves the architecture, ``native`` insists on the
first, ``transformers`` insists on transformers' modules (paged attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import Model
from .model_spec import ModelSpec

IMPLS = ("auto", "native", "transformers")

# model_type -> the native forward's module and class (imported on use).
NATIVE = {
    "llama": ("llama", "LlamaForward"),
    "mistral": ("llama", "LlamaForward"),
    "qwen2": ("llama", "LlamaForward"),
    "gemma3_text": ("gemma3", "Gemma3Forward"),
}
# Run through transformers' modules with the paged attention: their attention goes through
# AttentionInterface with causal or sliding masks and one KV cache per layer (no cross-layer
# sharing, no recurrent state), and positions come from position_ids.
PAGED_MODULES = set(NATIVE) | {"qwen3", "granite", "olmo2"}


class UnsupportedModelError(ValueError):
    """A model (or an ``impl`` for it) the engine cannot serve; ``str()`` is one line saying why."""


@dataclass(frozen=True)
class Serving:
    """How an architecture will run: ``impl`` is native | transformers | fallback."""
    impl: str
    reason: str


def native_class(model_type: str):
    """The native forward class for ``model_type``, or None."""
    entry = NATIVE.get(model_type)
    if entry is None:
        return None
    import importlib
    return getattr(importlib.import_module(f".{entry[0]}", __package__), entry[1])


def serving(model_type: str, impl: str = "auto", *, native_ok: bool = True, why_not_native: str = "") -> Serving:
    """Decide how ``model_type`` runs under ``impl``; raises UnsupportedModelError when ``impl`` cannot.

    ``native_ok`` False (with ``why_not_native``) when this checkpoint cannot take the
    native forward although its architecture can (e.g. a rope type it does not implement).
    """
    if impl not in IMPLS:
        raise UnsupportedModelError(f"impl: {impl!r} is not one of {', '.join(IMPLS)}")
    has_native = model_type in NATIVE and native_ok
    if impl == "native":
        if not has_native:
            why = why_not_native or f"model type {model_type!r} has no native forward (native: {', '.join(sorted(NATIVE))})"
            raise UnsupportedModelError(f"impl='native' is unavailable: {why}; use impl='auto' or 'transformers'")
        return Serving("native", "requested")
    if impl == "auto" and has_native:
        return Serving("native", "fastest for this architecture")
    if model_type in PAGED_MODULES:
        return Serving("transformers", "requested" if impl == "transformers" else
                       why_not_native or "no native forward for this architecture")
    if impl == "transformers":
        raise UnsupportedModelError(f"impl='transformers' is unavailable: model type {model_type!r} does not run "
                                    f"on the paged engine (paged: {', '.join(sorted(PAGED_MODULES))}); use impl='auto'")
    return Serving("fallback", f"model type {model_type!r} does not run on the paged engine")


def spec_of(hf_model: Any, max_model_len: int | None = None, eos_token_ids: tuple[int, ...] = ()) -> ModelSpec:
    """The ModelSpec of a transformers model (its text config, its dtype)."""
    c = hf_model.config
    c = c.get_text_config(decoder=True) if hasattr(c, "get_text_config") else c
    return ModelSpec.from_config(c, dtype=str(hf_model.dtype).removeprefix("torch."),
                                 max_model_len=max_model_len, eos_token_ids=eos_token_ids)


def as_model(obj: Any, impl: str = "auto", *, max_model_len: int | None = None,
             eos_token_ids: tuple[int, ...] = ()) -> Model:
    """``obj`` if it already is a Model, else a transformers causal LM wrapped the way ``serving`` says.

    The native forward over a transformers model shares its weights (no copy);
    HF ``generate`` on the same object keeps working. Raises UnsupportedModelError.
    """
    if isinstance(obj, Model):
        return obj
    spec = spec_of(obj, max_model_len, eos_token_ids)
    cls = native_class(spec.architecture)
    native_ok = cls is not None and cls.supports(obj)
    how = serving(spec.architecture, impl, native_ok=native_ok,
                  why_not_native="" if native_ok or cls is None else "this checkpoint's layout differs from the native forward's")
    if how.impl == "native":
        return cls.for_model(obj, spec)
    if how.impl == "transformers":
        from .hf_forward import TransformersForward
        return TransformersForward(obj, spec)
    from .hf_fallback import make_fallback
    return make_fallback(obj, spec)
