"""The native paged decode-attention kernel (csrc/paged_decode.c), built once and loaded with ctypes.

Contract: ``load()`` returns a ``PagedDecodeKernel`` or None. None means no C
compiler or a failed build; the caller then keeps the pure-torch path, which
computes the same attention. The shared object is cached under
``<cbgen cache>/kernels/`` keyed by the source, the compiler command and the
CPU flags (it is built with ``-march=native``), so a rebuild only happens when
one of them changes. It is written to a temp name and renamed, so concurrent
first runs never load a half-written file.

The kernel links libgomp by its soname; inside a torch process that resolves
to the OpenMP runtime torch already loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..config import cpu_flags

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]

_lock = threading.Lock()
_loaded: dict[str, "PagedDecodeKernel | None"] = {}


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns = {torch.bfloat16: lib.paged_decode_bf16, torch.float32: lib.paged_decode_f32}
        for fn in self._fns.values():
            fn.argtypes = _ARGTYPES
            fn.restype = ctypes.c_int

    def supports(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> bool:
        """The shapes csrc/paged_decode.c accepts (it returns -1 for any other)."""
        return (dtype in self._fns and head_dim % 16 == 0 and head_dim <= 256 and block_size % 16 == 0
                and block_size > 0 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, block_size: int, scale: float) -> None:
        """out[i] = softmax(q[i] . K_i^T * scale) V_i for each decode sequence i.

        q, out: [nd, H, D] contiguous; k_cache [num_blocks, KVH, D, block_size] and
        v_cache [num_blocks * block_size, KVH, D], same dtype as q; tables: int32
        [nd, W] block ids; lens: int32 [nd] context lengths (>= 1, <= W * block_size).
        """
        nd, H, D = q.shape
        assert q.is_contiguous() and out.is_contiguous() and tables.is_contiguous()
        assert tables.dtype == torch.int32 and lens.dtype == torch.int32
        rc = self._fns[q.dtype](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                                tables.data_ptr(), tables.shape[1], lens.data_ptr(),
                                nd, H, k_cache.shape[1], D, block_size, float(scale), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"paged decode kernel failed (code {rc})")


def _build(cc: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def disabled() -> bool:
    """CBGEN_NATIVE_KERNEL=0 switches the kernel off (the torch path runs instead)."""
    return os.environ.get("CBGEN_NATIVE_KERNEL", "1") == "0"


def load(cache_dir: Path) -> PagedDecodeKernel | None:
    """The kernel, built into ``cache_dir`` on first use; None if it cannot be built here."""
    if disabled():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SOURCE.exists():
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *CFLAGS, *sorted(cpu_flags())]).encode())
    dest = cache_dir / f"paged_decode-{key.hexdigest()[:16]}.so"
    with _lock:
        if str(dest) in _loaded:
            return _loaded[str(dest)]
        kernel = None
        try:
            if not dest.exists():
                _build(cc, dest)
            kernel = PagedDecodeKernel(ctypes.CDLL(str(dest)), dest)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            print(f"cbgen: native attention kernel unavailable ({e}); using the torch path. "
                  f"{detail.decode(errors='replace').strip()[:200]}", file=sys.stderr)
        _loaded[str(dest)] = kernel
        return kernel
