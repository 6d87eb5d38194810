"""A safetensors checkpoint, memory-mapped: its tensors are views of the mapped files.

``MappedCheckpoint(path, dtype, device)`` opens ``path/model.safetensors``, or the shards that
``path/model.safetensors.index.json`` names; ``get(name)`` and ``cat(names)`` serve the native
forwards' ``from_tensors`` (cbgen/engine/llama.py, gemma3.py). Format: shards.py's docstring.

Why not safetensors' ``safe_open``: it gives each tensor a storage of its own, so a fused q/k/v
or gate/up weight has to be a ``torch.cat`` into new memory, and first-touching fresh anonymous
memory is what made the second load slow (2.5 GB of new pages cost 3-6 s on a 2-core VM, whose
host backs guest memory lazily; about 10 of a 17 s float32 load of a 1B model). Here each file
is mapped once, so:
- a tensor stored in the wanted dtype, wanted on the CPU, is a view: no copy, no new memory
  (its pages are the page cache's, shared with other processes loading the same file);
- tensors stored back to back (cbgen's GGUF conversion writes q, k, v and gate, up in that
  order; safetensors' own writer sorts by name, which keeps gate, up adjacent) concatenate into
  one view of the file;
- anything else (a cast, another device, scattered pieces) is one allocation of the result and
  a copy of each piece into its rows, without intermediate tensors.

Invariants: a mapping is private (``MAP_PRIVATE``: a write to a weight copies that page, never
reaches the file) and lives as long as any view of it (``torch.frombuffer`` holds a reference to
the file's memoryview, and nothing closes a mapping explicitly: a close under a live view would
be refused with ``BufferError``). Pages are read on first use, i.e. during the first forward, as
with safetensors' own mmap. Populating them at open instead (``MADV_POPULATE_READ``) was measured
on a Llama-3.2-1B-shaped float32 checkpoint: load + first token 1.3-1.7 s against 1.3 s lazily
with the files in the page cache, 5.6 s against 5.4 s from disk; it only moved the time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype codes (https://github.com/huggingface/safetensors, "Format").
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: file ``file``, bytes [begin, end) of the whole file."""

    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: the index's shards (sorted), else ``model.safetensors``.
    Raises OSError (unreadable index, missing file) or ValueError (an index that is not JSON)."""
    index = path / INDEX
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / SINGLE]


class MappedCheckpoint:
    """Tensors of a safetensors checkpoint by their names, in ``dtype`` on ``device``.

    Raises OSError for a missing or unreadable file and ValueError for a malformed header
    (a length or offset past the end of the file, a shape that does not match its bytes).
    """

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._views: list[memoryview] = []
        self._entries: dict[str, _Entry] = {}
        for f in checkpoint_files(path):
            self._open(f)

    def _open(self, file: Path) -> None:
        fd = os.open(file, os.O_RDONLY)
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)   # the mapping keeps the file
        size = len(mapped)
        if size < 8 or 8 + (n := struct.unpack_from("<Q", mapped, 0)[0]) > size:
            raise ValueError(f"{file.name}: not a safetensors file (header length past the end)")
        index = len(self._views)
        self._views.append(memoryview(mapped))
        try:
            header = json.loads(mapped[8:8 + n])
            for name, info in header.items():
                if name != "__metadata__":
                    self._entries[name] = _entry(index, name, info, 8 + n, size)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{file.name}: malformed safetensors header ({e})") from e

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _view(self, e: _Entry, rows: int | None = None, end: int | None = None) -> torch.Tensor:
        """The file's bytes [e.begin, end) as e.dtype, shaped [rows, *e.shape[1:]] (default: e's own)."""
        end = e.end if end is None else end
        shape = e.shape if rows is None else (rows, *e.shape[1:])
        if end == e.begin:
            return torch.empty(shape, dtype=e.dtype)
        if e.begin % e.dtype.itemsize:   # not aligned to its element: copy (no writer cbgen knows does this)
            raw = torch.frombuffer(self._views[e.file], dtype=torch.uint8, count=end - e.begin, offset=e.begin)
            return raw.clone().view(e.dtype).view(shape)
        count = (end - e.begin) // e.dtype.itemsize
        return torch.frombuffer(self._views[e.file], dtype=e.dtype, count=count, offset=e.begin).view(shape)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor ``name``; None for an absent ``.bias``. Raises KeyError for any other absent name."""
        e = self._entries.get(name)
        if e is None:
            if name.endswith(".bias"):
                return None
            raise KeyError(f"weight {name} is missing from the safetensors")
        return self._view(e).to(device=self.device, dtype=self.dtype)

    def cat(self, names: Sequence[str]) -> torch.Tensor | None:
        """``torch.cat([get(n) for n in names])`` (along dim 0), without the intermediate tensors:
        a view of the file when the pieces are stored back to back in the wanted dtype on the CPU.
        None when every name is an absent ``.bias``; raises ValueError when only some are absent,
        or the pieces differ in trailing shape; KeyError as ``get``."""
        if len(names) == 1:
            return self.get(names[0])
        entries = [self._entries.get(n) for n in names]
        if any(e is None for e in entries):
            if all(n.endswith(".bias") for n in names):
                if all(e is None for e in entries):
                    return None
                raise ValueError(f"mixed biases: {', '.join(names)}")
            raise KeyError(f"weight {next(n for n, e in zip(names, entries) if e is None)} "
                           "is missing from the safetensors")
        if any(not e.shape or e.shape[1:] != entries[0].shape[1:] for e in entries):
            raise ValueError(f"cannot concatenate {', '.join(names)}: shapes "
                             f"{', '.join(str(list(e.shape)) for e in entries)}")
        rows = sum(e.shape[0] for e in entries)
        first = entries[0]
        if (self.device.type == "cpu" and all(e.dtype == self.dtype and e.file == first.file for e in entries)
                and all(a.end == b.begin for a, b in zip(entries, entries[1:]))):
            return self._view(first, rows, entries[-1].end)
        out = torch.empty((rows, *first.shape[1:]), dtype=self.dtype, device=self.device)
        row = 0
        for e in entries:
            out[row:row + e.shape[0]].copy_(self._view(e))
            row += e.shape[0]
        return out


def _entry(file: int, name: str, info: dict, data_start: int, size: int) -> _Entry:
    """One header entry, checked against the file's size; raises ValueError."""
    code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    if code not in DTYPES:
        raise ValueError(f"tensor {name} has dtype {code}, which cbgen cannot read")
    dtype = DTYPES[code]
    if not 0 <= begin <= end or data_start + end > size or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name}: offsets {begin}..{end} do not fit its shape {list(shape)} "
                         f"of {code} in a {size}-byte file")
    return _Entry(file, dtype, shape, data_start + begin, data_start + end)

