"""Safetensors shards written tensor by tensor, so no whole-model dict ever exists.

Format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}`` padded with spaces so the data starts 8-byte aligned, then the
tensors' bytes back to back in header order. ``safe_open`` memory-maps it on load.

Invariant: a tensor's bytes are produced only while its shard is written (``OutTensor.blocks``
is called once, then dropped), so what a shard holds in memory is what its producers hold:
nothing for a streamed tensor, the finished tensor for a small one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

# The shard size transformers' save_pretrained defaulted to for years; a shard's small tensors are
# held in memory until it is written, so this also bounds that.
SHARD_BYTES = 512 * 2**20

INDEX = "model.safetensors.index.json"

_DTYPE_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class OutTensor:
    """One tensor of the output: its name, final shape and dtype, and how to produce its bytes.

    ``blocks()`` yields contiguous tensors of ``dtype`` whose concatenation along dim 0 is the
    whole tensor (one block for a small tensor, row blocks for a streamed one).
    """

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    blocks: Callable[[], Iterator["torch.Tensor"]]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_shards(out: Path, tensors: Iterable[OutTensor], shard_bytes: int | None = None) -> int:
    """Write ``tensors`` (in order) into ``out/model.safetensors``, or into
    ``model-0000i-of-0000n.safetensors`` shards of at most ``shard_bytes`` (default
    ``SHARD_BYTES``; a bigger tensor
    gets a shard of its own) plus ``model.safetensors.index.json``. Returns the total bytes.

    Raises ``ValueError`` on a repeated name or a block of the wrong dtype/size; ``OSError``
    from the file system.
    """
    shard_bytes = shard_bytes or SHARD_BYTES
    files: list[tuple[Path, list[str]]] = []
    pending: list[OutTensor] = []
    pending_bytes = total = 0
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"tensor {t.name} appears twice")
        seen.add(t.name)
        if pending and pending_bytes + t.nbytes > shard_bytes:
            files.append(_flush(out, len(files), pending))
            pending, pending_bytes = [], 0
        pending.append(t)
        pending_bytes += t.nbytes
        total += t.nbytes
    if pending or not files:
        files.append(_flush(out, len(files), pending))
    if len(files) == 1:
        files[0][0].replace(out / "model.safetensors")
        return total
    weight_map = {}
    for i, (path, names) in enumerate(files):
        final = out / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.replace(final)
        weight_map.update(dict.fromkeys(names, final.name))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2))
    return total


def _flush(out: Path, index: int, tensors: list[OutTensor]) -> tuple[Path, list[str]]:
    """One shard file (a provisional name: the count of shards is known only at the end)."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        code = _DTYPE_CODE.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise ValueError(f"tensor {t.name}: dtype {t.dtype} is not one cbgen writes")
        header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # data 8-byte aligned, as safetensors itself writes it
    path = out / f".shard-{index:05d}.safetensors"
    same_width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for block in t.blocks():
                if block.dtype != t.dtype or not block.is_contiguous():
                    raise ValueError(f"tensor {t.name}: a block of {block.dtype} "
                                     f"(contiguous={block.is_contiguous()}), expected contiguous {t.dtype}")
                # bf16 has no numpy type: write its bytes through a same-width integer view.
                f.write(memoryview(block.view(same_width[block.element_size()]).numpy()))
                written += block.numel() * block.element_size()
            if written != t.nbytes:
                raise ValueError(f"tensor {t.name}: wrote {written} bytes, its shape {t.shape} needs {t.nbytes}")
    return path, [t.name for t in tensors]
