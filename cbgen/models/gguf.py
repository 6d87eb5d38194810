"""GGUF files into the cache: de-quantised once into a safetensors dir that later loads read.

Invariant: a cache dir appears only via ``os.rename`` of a complete temp dir in
the same parent, so a crash or a corrupt file never leaves a half cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ModelError, _one_line
from .resolve import CACHE_FORMAT


TMP_PREFIX = ".tmp-"


PROVENANCE = "cbgen-gguf.json"


Status = Callable[[str], None]


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
