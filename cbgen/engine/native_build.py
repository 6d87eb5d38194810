"""Build a C source of ``csrc/`` once into the cache and load it with ctypes.

Contract: ``load_library(name, cache_dir, what)`` returns the ``ctypes.CDLL`` of
``csrc/<name>.c`` or None (switched off, no C compiler, or a failed build:
then one line on stderr naming ``what`` and the caller keeps its torch path).
The shared object is keyed by the source, the headers of ``csrc/``, the
compiler command and the CPU flags (it is built with ``-march=native``), so a rebuild only happens when one
of them changes. It is written to a temp name and renamed, so concurrent
first runs never load a half-written file. It links libgomp by its soname;
inside a torch process that is the OpenMP runtime torch already loaded, so
both share one thread pool.
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

from ..config import cpu_flags

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def disabled() -> bool:
    """CBGEN_NATIVE_KERNEL=0 switches every native part off (the torch paths run instead)."""
    return os.environ.get("CBGEN_NATIVE_KERNEL", "1") == "0"


def _build(cc: str, source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(source)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(name: str, cache_dir: Path, what: str) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` built into ``cache_dir`` on first use; None if it cannot be here."""
    if disabled():
        return None
    source = CSRC / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not source.exists():
        return None
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([cc, *CFLAGS, *sorted(cpu_flags())]).encode())
    dest = cache_dir / f"{name}-{key.hexdigest()[:16]}.so"
    with _lock:
        if str(dest) in _loaded:
            return _loaded[str(dest)]
        lib = None
        try:
            if not dest.exists():
                _build(cc, source, dest)
            lib = ctypes.CDLL(str(dest))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            print(f"cbgen: {what} unavailable ({e}); using the torch path. "
                  f"{detail.decode(errors='replace').strip()[:200]}", file=sys.stderr)
        _loaded[str(dest)] = lib
        return lib
