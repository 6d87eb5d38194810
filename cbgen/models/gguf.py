"""GGUF files into the cache: de-quantised once, tensor by tensor, into safetensors that later loads mmap.

Invariants:

- A cache dir appears only via ``os.rename`` of a complete temp dir in the same parent, so a
  crash or a corrupt file never leaves a half cache.
- Memory: peak RSS stays under the final weights + 1 GB. No whole-model dict exists
  (``shards.write_shards`` writes each shard as its tensors are produced); a tensor whose float32
  form is over ``BLOCK_BYTES`` is de-quantised ``BLOCK_BYTES`` of rows at a time straight into the
  target dtype, so no float32 copy of a 1 GB embedding exists; and the GGUF's mapped pages are
  dropped once read (left mapped, they would count as resident).
- Values: every tensor equals what transformers' whole-model GGUF loader gives for the same
  name (``gguf.quants.dequantize``, then its per-architecture ``TensorProcessor``, then a cast
  to the dtype): tests/test_gguf_convert.py checks it on the embedded model and Gemma 3.

Names and per-architecture fixes (llama's Q/K row permutation, Gemma's norms stored as w+1,
tied embeddings, MoE experts) are transformers' own, from its legacy GGUF loader
(``transformers/modeling_gguf_pytorch_utils.py``: ``TENSOR_PROCESSORS``,
``get_gguf_hf_weights_map``, ``load_gguf_checkpoint``), so every architecture it reads, we read.
The architectures transformers 5 reads through its newer ``integrations.gguf`` conversion ops
instead (``is_gguf_arch_supported``: qwen35, qwen35moe, lfm2) are converted the old way, the
whole model de-quantised at once, because those ops are written for its loader's internals.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ModelError, _one_line
from .resolve import CACHE_FORMAT, _gguf_name, dtype_name, gguf_cache_path
from .shards import OutTensor, write_shards

if TYPE_CHECKING:
    import numpy as np
    import torch


TMP_PREFIX = ".tmp-"


PROVENANCE = "cbgen-gguf.json"


# float32 bytes above which a tensor is de-quantised in row blocks of this size; at or below it
# the whole tensor goes through transformers' processor at once (Q/K permutation needs whole heads).
BLOCK_BYTES = 64 * 2**20


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


def _clean_stale_temps(parent: Path) -> list[Path]:
    """Remove temp dirs left by conversions whose process is gone (a kill -9 mid-conversion); returns them."""
    removed = []
    for tmp in parent.glob(TMP_PREFIX + "*"):
        if not temp_is_stale(tmp):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def temp_is_stale(tmp: Path) -> bool:
    """A ``.tmp-PID-...`` dir whose PID names no live process (a live or foreign one is left alone)."""
    try:
        pid = int(tmp.name[len(TMP_PREFIX):].split("-", 1)[0])
        os.kill(pid, 0)
        return False  # still converting (or pid reused): leave it
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False  # alive, another user's


def ensure_converted(gguf: Path, dtype: "torch.dtype", cache_dir: str | None,
                     status: Status) -> tuple[Path, bool]:
    """``(dir, converted)``: the conversion of ``gguf`` into ``dtype``, made now if it is not cached.

    Raises ``ModelError`` (one line) for an unreadable GGUF or an unwritable cache.
    """
    dest = gguf_cache_path(gguf, cache_dir, dtype)
    if dest.is_dir():  # only ever published complete (atomic rename)
        return dest, False
    _convert_gguf(gguf, dest, status, dtype)
    return dest, True


def _convert_gguf(gguf: Path, dest: Path, status: Status, dtype: "torch.dtype | None" = None) -> None:
    """De-quantise ``gguf`` into ``dest`` (safetensors in ``dtype``, default float32, + tokenizer), atomically."""
    import torch

    dtype = dtype or torch.float32
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf} is not a GGUF file (bad magic bytes)")
    # On 2 idle cores: ~4 s of metadata and tokenizer, then ~3 s per 98 MB of tensors (the embedded
    # Q4_1); about 3x that under a full load (1.3 GB Q8_0: 104-122 s at load average 7).
    eta = round(4 + gguf.stat().st_size / 98e6 * 3)
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
            _dequantise_into(gguf, tmp, dtype)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the published dir is an ordinary cache dir
        os.rename(tmp, dest)
    except OSError as e:
        if not dest.is_dir():
            raise ModelError(f"cannot write the converted model to {dest}: {_one_line(e)}") from e
        # else: a concurrent conversion of the same file won the rename; use its result.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status(f"converted {gguf.name} in {time.perf_counter() - t0:.1f} s → {dest}")


def _unreadable(gguf: Path, e: BaseException) -> ModelError:
    return ModelError(f"cannot read GGUF {gguf} (corrupt, truncated or unsupported): {_one_line(e)}")


def _dequantise_into(gguf: Path, out: Path, dtype: "torch.dtype") -> None:
    """Write the weights (safetensors), config, generation config, tokenizer and provenance into ``out``."""
    import transformers
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    try:
        source = _open(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as e:  # truncated, random bytes, unsupported architecture, ...
        raise _unreadable(gguf, e) from e
    if source is None:
        _dequantise_whole(gguf, out, dtype)
    else:
        try:
            write_shards(out, _out_tensors(source, dtype))
        except OSError:
            raise
        except Exception as e:  # a tensor's data does not de-quantise to its stated shape
            raise _unreadable(gguf, e) from e
        _save_config(source.config, out, dtype)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    tokenizer.save_pretrained(out)
    st = gguf.stat()
    (out / PROVENANCE).write_text(json.dumps({
        "gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": CACHE_FORMAT,
        "name": _gguf_name(gguf), "dtype": dtype_name(dtype),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": "whole-model" if source is None else "tensor-by-tensor",
        "convert_seconds": round(time.perf_counter() - t0, 2),
        "transformers": transformers.__version__}, indent=1))


@dataclass
class _Source:
    """An open GGUF and what transformers' loader would do with each of its tensors."""

    reader: Any  # gguf.GGUFReader (memory-mapped)
    processor: Any  # transformers TensorProcessor for this architecture
    names: dict[str, str]  # GGUF tensor name -> transformers parameter name
    config: Any  # transformers PretrainedConfig, as AutoConfig reads it from the file


def _open(gguf: Path) -> _Source | None:
    """The file's reader, processor, name map and config; ``None`` where transformers reads the
    architecture through its newer conversion ops (then the whole-model path converts it)."""
    import gguf as gguf_py
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    reader = gguf_py.GGUFReader(str(gguf))
    architecture = reader.fields["general.architecture"].contents()
    if is_gguf_arch_supported(architecture):
        return None
    with _lend_to_transformers(gguf_py, reader):
        # What AutoConfig.from_pretrained(gguf_file=...) does for these architectures, without
        # parsing the metadata once more. The processor gets the raw dict, the model the config,
        # as in transformers' loader.
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
        config = CONFIG_MAPPING[parsed["model_type"]].from_dict(dict(parsed))
        with torch.device("meta"):  # names only: no memory
            model = AutoModelForCausalLM.from_config(config)
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
        names = get_gguf_hf_weights_map(model, processor)
    config.architectures = [type(model).__name__]
    return _Source(reader, processor, names, config)


@contextmanager
def _lend_to_transformers(gguf_py: Any, reader: Any) -> Iterator[None]:
    """Within: ``gguf.GGUFReader(...)`` returns ``reader``, and ``gguf.get_tensor_name_map`` is cached.

    transformers' legacy loader imports both from gguf at call time. Parsing a GGUF's metadata
    (a vocabulary of strings) takes seconds, and ``get_gguf_hf_weights_map`` rebuilds the name
    table for every submodule (hundreds of times, ~10 s for SmolLM2) though it depends only on
    (arch, layers). Not thread-safe: conversions run on cbgen's one compute thread.
    """
    saved = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    gguf_py.GGUFReader = lambda *_args, **_kwargs: reader
    gguf_py.get_tensor_name_map = functools.cache(saved[1])
    try:
        yield
    finally:
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = saved


def _out_tensors(src: _Source, dtype: "torch.dtype") -> Iterator[OutTensor]:
    """Every output tensor in file order, then any a processor assembled from several (MoE experts)."""
    import numpy as np
    import torch
    from gguf import dequantize

    # Where a processor puts tensors it builds itself (transformers' ``parsed_parameters``); they
    # are complete only after the last tensor, so they are written last.
    assembled: dict[str, dict] = {"tensors": {}}
    for t in src.reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml order is fastest-first
        if t.n_elements * 4 > BLOCK_BYTES and len(shape) >= 2 and _left_as_is(src, t.name, shape):
            if t.name in src.names:
                yield OutTensor(src.names[t.name], shape, dtype,
                                lambda t=t, shape=shape: _row_blocks(src.reader, t, shape, dtype))
            continue
        weights = dequantize(t.data, t.tensor_type)
        result = src.processor.process(weights=weights, name=t.name, tensor_key_mapping=src.names,
                                       parsed_parameters=assembled)
        # None: the processor kept it (``assembled``); a name not in the map: unused, as in transformers.
        name = result.name
        keep = name in src.names
        tensor = torch.from_numpy(np.copy(result.weights)).to(dtype).contiguous() if keep else None
        del weights, result
        _drop_pages(src.reader, t.data)
        if tensor is None:
            continue
        yield OutTensor(src.names[name], tuple(tensor.shape), dtype, lambda tensor=tensor: iter([tensor]))
    for name, tensor in assembled["tensors"].items():
        tensor = tensor.to(dtype).contiguous()
        yield OutTensor(name, tuple(tensor.shape), dtype, lambda tensor=tensor: iter([tensor]))


def _left_as_is(src: _Source, name: str, shape: tuple[int, ...]) -> bool:
    """Whether transformers' processor passes this tensor through untouched, so row blocks are safe.

    Asked with a one-row stand-in: the processors choose what to do by the tensor's name
    (``attn_q``, ``norm.weight``, ``_exps``...), and one that reshapes whole heads fails on it.
    """
    import numpy as np

    stand_in = np.zeros((1, *shape[1:]), np.float32)
    try:
        result = src.processor.process(weights=stand_in, name=name, tensor_key_mapping=src.names,
                                       parsed_parameters={"tensors": {}})
    except Exception:
        return False
    return result.weights is stand_in and result.name == name


def _row_blocks(reader: Any, t: Any, shape: tuple[int, ...], dtype: "torch.dtype") -> Iterator["torch.Tensor"]:
    """``t`` de-quantised ``BLOCK_BYTES`` of float32 rows at a time, each block cast to ``dtype``.

    Exact: a GGUF quant block never spans two rows, so each row de-quantises on its own.
    """
    import torch
    from gguf import dequantize

    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    step = max(1, BLOCK_BYTES // (4 * row_elems))
    for start in range(0, shape[0], step):
        raw = t.data[start:start + step]
        block = dequantize(raw, t.tensor_type)
        if block.shape[1:] != shape[1:]:
            raise ValueError(f"tensor {t.name} de-quantises to rows of {block.shape[1:]}, not {shape[1:]}")
        if not block.flags.writeable:  # an F32 tensor is a view of the read-only map
            block = block.copy()
        yield torch.from_numpy(block).to(dtype).contiguous()
        del block
        _drop_pages(reader, raw)


def _drop_pages(reader: Any, view: "np.ndarray") -> None:
    """Unmap the pages of ``view`` (a slice of the reader's map) from this process: read once, they
    would otherwise stay resident. They stay in the page cache, and a later read maps them again."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is None or view.nbytes == 0:
        return
    begin = view.ctypes.data - reader.data.ctypes.data
    start = begin - begin % mmap.PAGESIZE
    try:
        mapping.madvise(mmap.MADV_DONTNEED, start, begin + view.nbytes - start)
    except (OSError, ValueError, AttributeError):  # not Linux, or not a plain map: only memory is at stake
        pass


def _save_config(config: Any, out: Path, dtype: "torch.dtype") -> None:
    """config.json and generation_config.json, as ``save_pretrained`` of the loaded model writes them."""
    from transformers import GenerationConfig

    config.dtype = dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def _dequantise_whole(gguf: Path, out: Path, dtype: "torch.dtype") -> None:
    """The whole model de-quantised at once by transformers, saved into ``out`` (weights + config).

    Needs the whole model in memory: only for the architectures ``_open`` cannot stream.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        # dequantize=True: a dense model, and transformers then drops its quantizer
        # marker (model.hf_quantizer, config.quantization_config). With the default
        # GgufConfig the marker stays: save_pretrained refuses, and if forced it
        # writes quantization_config into config.json, poisoning every reload.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True,
            quantization_config=GgufConfig(dequantize=True))
    except Exception as e:
        raise _unreadable(gguf, e) from e
    model.hf_quantizer = None  # defensive: already None after dequantize=True
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)


def _gguf_chat_template(gguf: Path) -> str | None:
    """The ``tokenizer.chat_template`` metadata key, for when the converted tokenizer lost it."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(gguf))[0].get("tokenizer.chat_template")
    except Exception:  # private transformers API; a missing template is not fatal
        return None
