"""Load a resolved model: device and dtype, the native forward or transformers' modules, the tokenizer.

torch and transformers are imported lazily so that importing this stays cheap.
Every ``from_pretrained`` passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbgen.config import ModelConfig, cache_root
from cbgen.config import cpu_flags as machine_cpu_flags

from .errors import ModelError, _one_line
from .gguf import Status, _quiet_progress_bars, ensure_converted
from .resolve import resolve_model
from cbgen.engine.model_spec import eos_ids

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    """A ready model: eval mode, on ``device``, in ``dtype``; ``path`` is the dir actually read."""

    model: Any  # a native forward (a cbgen/engine/model.py Model), or transformers' PreTrainedModel
    tokenizer: Any  # fast tokenizer (transformers TokenizersBackend)
    path: Path
    source: str
    name: str
    dtype: "torch.dtype"
    dtype_reason: str
    device: "torch.device"
    max_model_len: int
    has_chat_template: bool
    converted: bool  # this call de-quantised a GGUF into the cache
    load_seconds: float
    origin: Path  # what the user named: the .gguf file, or the model dir
    spec: Any = None  # ModelSpec (cbgen/engine/model_spec.py): architecture, per-layer attention, eos ids
    impl: str = "auto"  # the knob it was loaded with (ModelConfig.impl); the engine honours it
    serving: str = "native"  # how it will run: native | transformers | fallback (engine/architectures.py)
    quantize: str = "none"   # ModelConfig.quantize as applied at load ("auto" resolved; engine/quantize.py)
    quantize_reason: str = "the default"   # why: the option, or --quantize auto's reason

    @property
    def native(self) -> bool:
        """Loaded without transformers' modelling code (a native forward from the checkpoint's tensors)."""
        return hasattr(self.model, "spec")


def pick_device(requested: str) -> "torch.device":
    """``auto`` is cuda when available, else cpu; an unavailable cuda is a ``ModelError``."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={requested} but CUDA is not available in torch {torch.__version__}")
    return torch.device(requested)


def pick_dtype(requested: str, device: "torch.device",
               cpu_flags: frozenset[str] | None = None) -> tuple["torch.dtype", str]:
    """``(dtype, reason)``. ``auto`` is bfloat16 where the hardware computes it natively, else float32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested), "requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA device supports bf16"
        return torch.float32, "auto: CUDA device lacks bf16"
    flags = machine_cpu_flags() if cpu_flags is None else cpu_flags
    native = sorted({"avx512_bf16", "amx_bf16"} & set(flags))
    if native:
        return torch.bfloat16, f"auto: CPU has native bf16 ({', '.join(native)})"
    return torch.float32, "auto: CPU lacks native bf16 (no avx512_bf16/amx_bf16)"


def eos_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """Union of ``model.generation_config.eos_token_id`` (int or list) and the tokenizer's eos, in that order."""
    from cbgen.engine.model_spec import eos_ids
    return eos_ids(tokenizer, getattr(model, "generation_config", None))


def _native_config(path: Path) -> tuple[dict, str | None]:
    """config.json and, if no native forward can run this checkpoint, why not."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return {}, f"config.json unreadable ({_one_line(e)})"
    from cbgen.engine.architectures import NATIVE
    from cbgen.engine.llama import STATIC_ROPE_TYPES
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    act = c.get("hidden_activation", c.get("hidden_act", "silu"))
    why = (f"model_type {c.get('model_type')!r}" if c.get("model_type") not in NATIVE else
           f"hidden_act {act!r}" if c.get("model_type") != "gemma3_text" and act != "silu" else
           "a quantized checkpoint" if c.get("quantization_config") else
           f"rope_type {rope_type!r}" if rope_type not in STATIC_ROPE_TYPES else
           "no model.safetensors" if not (path / "model.safetensors").is_file()
           and not (path / "model.safetensors.index.json").is_file() else None)
    return c, why


def _hf_config(c: dict) -> Any:
    """transformers' config class for ``c`` (its defaults: layer types, rope parameters). Importing
    one config class costs far less than the modelling code; plain llama dirs skip even this."""
    from transformers import AutoConfig
    fields = {k: v for k, v in c.items() if k != "model_type"}
    return AutoConfig.for_model(c["model_type"], **fields)


def _load_native(path: Path, c: dict, dtype: "torch.dtype", device: "torch.device",
                 eos: tuple[int, ...], max_model_len: int) -> Any:
    """The native forward (cbgen/engine/architectures.py: NATIVE) over ``path``'s safetensors,
    in ``dtype`` on ``device``: views of the memory-mapped files where the stored dtype is
    ``dtype`` on the CPU, fused q/k/v and gate/up included (checkpoint.py)."""
    from types import SimpleNamespace

    import torch

    from cbgen.engine.architectures import native_class
    from cbgen.engine.model_spec import ModelSpec

    from .checkpoint import MappedCheckpoint

    checkpoint = MappedCheckpoint(path, dtype, device)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    plain = c["model_type"] in ("llama", "mistral", "qwen2") and \
        rope.get("rope_type", rope.get("type", "default")) == "default"
    if plain:   # config.json as attributes, with transformers' defaults for what it leaves out
        config = SimpleNamespace(**{
            **c, "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),
            "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
            # transformers' defaults: qwen2 has use_sliding_window (False); mistral uses sliding_window as given.
            "use_sliding_window": c.get("use_sliding_window", c.get("model_type") != "qwen2")})
    else:
        config = _hf_config(c)
    spec = ModelSpec.from_config(config, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len,
                                 eos_token_ids=eos)
    with torch.no_grad():
        return native_class(c["model_type"]).from_tensors(spec, config, checkpoint.get, cat=checkpoint.cat)


def _max_len(max_position_embeddings: int | None, tokenizer: Any) -> int:
    """The context length: the config's, else the tokenizer's (when it sets one)."""
    return int(max_position_embeddings or 0) or int(min(tokenizer.model_max_length, 1 << 20))


def _generation_eos(path: Path, c: dict) -> Any:
    """generation_config.json's (or config.json's) eos ids, as an object with ``eos_token_id``."""
    from types import SimpleNamespace
    gen = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text())
    return SimpleNamespace(eos_token_id=gen.get("eos_token_id", c.get("eos_token_id")))


def _generic_tokenizer(path: Path, model_type: str | None) -> bool:
    """True where AutoTokenizer would resolve to transformers' generic ``TokenizersBackend``:
    a llama checkpoint whose tokenizer_config.json names the generic class (SmolLM2 does).
    AutoTokenizer first imports the model's config class to decide, ~0.7 s of start-up."""
    try:
        tc = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (model_type == "llama" and tc.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
            and "auto_map" not in tc and (path / "tokenizer.json").is_file())


def _load_tokenizer(path: Path, model_type: str | None = None) -> Any:
    try:
        if _generic_tokenizer(path, model_type):
            from transformers import TokenizersBackend
            tokenizer = TokenizersBackend.from_pretrained(path, local_files_only=True)
        else:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer from {path}: {_one_line(e)}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{path} has no fast tokenizer (tokenizer.json); cbgen needs one")
    return tokenizer


def _load_dir(path: Path, dtype: "torch.dtype", device: "torch.device") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from cbgen.engine.hf_fallback import checkpoint_refusal
    if (why := checkpoint_refusal(path)) is not None:   # cannot run at all: say why in one line
        raise ModelError(f"{path}: {why}")
    try:
        with _quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", local_files_only=True,
                device_map=str(device) if device.type != "cpu" else None)
    except Exception as e:
        raise ModelError(f"cannot load a causal LM from {path}: {_one_line(e)}") from e
    return model.eval(), _load_tokenizer(path)


def load_model(cfg: ModelConfig, *, status: Status | None = None, deterministic: bool = False) -> LoadedModel:
    """Resolve ``cfg.model`` and load it; raises ``ModelError`` (one line) on any user-facing failure.
    ``deterministic``: the engine will run batch-invariant steps (``--quantize auto`` weighs it).

    A GGUF source is converted into the cache on first use (reported through
    ``status``); ``load_seconds`` covers the whole call, conversion included.
    """
    import torch

    t0 = time.perf_counter()
    status = status or (lambda _msg: None)
    res = resolve_model(cfg.model, cache_dir=cfg.cache_dir)
    device = pick_device(cfg.device)
    dtype, reason = pick_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    converted, quantize = False, cfg.quantize   # "auto" resolves to int8 or none below
    quantize_reason = "--quantize int8" if quantize == "int8" else "the default" if quantize == "none" else ""
    path = res.path
    if res.is_gguf:
        path, converted = ensure_converted(res.path, dtype, cfg.cache_dir, status)
    conf, why_not = _native_config(path)
    from cbgen.engine.architectures import NATIVE, UnsupportedModelError, serving, spec_of
    try:
        model_type = conf.get("model_type", "unknown")
        how = serving(model_type, cfg.impl, native_ok=why_not is None,
                      why_not_native=f"this checkpoint has {why_not}" if why_not and model_type in NATIVE else "")
    except UnsupportedModelError as e:
        raise ModelError(f"{path}: {e}") from e
    if how.impl == "native":
        tokenizer = _load_tokenizer(path, conf.get("model_type"))
        eos = eos_ids(tokenizer, _generation_eos(path, conf))
        max_len = _max_len(conf.get("max_position_embeddings"), tokenizer)
        try:
            model = _load_native(path, conf, dtype, device, eos, max_len)
            spec = model.spec
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot load {path}: {_one_line(e)}") from e
        if quantize == "auto":
            from cbgen.engine.quantize import choose_auto
            quantize, why = choose_auto(model, device, cache_root() / "kernels", deterministic)
            quantize_reason = f"--quantize auto: {why}"
            status(f"--quantize auto: {quantize} ({why})")
        if quantize != "none":
            from cbgen.engine.quantize import apply
            status(f"quantizing the projections to {quantize}")
            apply(model, quantize, kernel=None, packable=False)
    else:
        if quantize == "auto":
            quantize = "none"   # int8 needs the native forward; auto never refuses a model
            quantize_reason = "--quantize auto: int8 needs cbgen's native forward"
            status("--quantize auto: none (int8 needs cbgen's native forward)")
        if quantize != "none":
            how_runs = "transformers' modules" if how.impl == "transformers" else "the transformers fallback"
            fix = ("use --impl auto" if cfg.impl == "transformers" and model_type in NATIVE
                   else "use --quantize none")
            raise ModelError(f"{res.name}: --quantize {cfg.quantize} needs cbgen's native forward (llama, mistral, "
                             f"qwen2, gemma3_text), and this model runs through {how_runs}; {fix}")
        model, tokenizer = _load_dir(path, dtype, device)
        eos = eos_token_ids(tokenizer, model)
        gen = model.generation_config
        if eos:  # stop on every eos either side knows about (HF generate baselines read this)
            gen.eos_token_id = list(eos) if len(eos) > 1 else eos[0]
        if gen.pad_token_id is None and eos:
            gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        text_config = model.config.get_text_config(decoder=True)
        max_len = _max_len(getattr(text_config, "max_position_embeddings", None), tokenizer)
        try:
            spec = spec_of(model, max_len, eos)
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from e
    if tokenizer.model_max_length > max_len:  # the "unset" sentinel is 1e30
        tokenizer.model_max_length = max_len
    return LoadedModel(
        model=model, tokenizer=tokenizer, path=path, source=res.source, name=res.name,
        dtype=dtype, dtype_reason=reason, device=device, max_model_len=max_len,
        has_chat_template=bool(tokenizer.chat_template), converted=converted,
        load_seconds=time.perf_counter() - t0, origin=res.path, spec=spec, impl=cfg.impl,
        serving=how.impl, quantize=quantize, quantize_reason=quantize_reason)
