"""Build a C source of ``csrc/`` once into the cache and load it with ctypes.

Contract: ``load_library(name, cache_dir, what)`` returns the ``ctypes.CDLL`` of
``csrc/<name>.c`` or None (switched off, no C compiler, or a failed build:
then one line on stderr naming ``what`` and the caller keeps its torch path).
A library may link other sources of ``csrc/`` too (``DEPS``: decode_forward
calls the others' functions). The shared object is keyed by its sources, the headers of ``csrc/``, the
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
# A build takes seconds on an idle machine; one took 140 s beside a full test run on 2 cores.
BUILD_TIMEOUT_S = 600

# Other sources linked into a library, by name: the same functions, one definition each.
DEPS = {"decode_forward": ("linear_rows", "fused_ops", "paged_decode", "greedy_head"),
        "greedy_head": ("linear_rows", "fused_ops")}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def disabled() -> bool:
    """CBGEN_NATIVE_KERNEL=0 switches every native part off (the torch paths run instead)."""
    return os.environ.get("CBGEN_NATIVE_KERNEL", "1") == "0"


def _build(cc: str, sources: list[Path], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, sources)], check=True, capture_output=True,
                       timeout=BUILD_TIMEOUT_S)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _why(e: Exception) -> str:
    """What went wrong, in words: a timeout says so and names the limit."""
    if isinstance(e, subprocess.TimeoutExpired):
        return f"the C build timed out after {e.timeout:.0f} s; the next run tries again"
    if isinstance(e, subprocess.CalledProcessError):
        return f"the C build failed with exit status {e.returncode}"
    return str(e)


def _compiler_message(e: Exception) -> str:
    """The compiler's first error line (else its first line), or empty if it printed nothing."""
    lines = [ln.strip() for ln in (getattr(e, "stderr", b"") or b"").decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return next((ln for ln in lines if "error" in ln), lines[0] if lines else "")


def load_library(name: str, cache_dir: Path, what: str) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` built into ``cache_dir`` on first use; None if it cannot be here."""
    if disabled():
        return None
    sources = [CSRC / f"{n}.c" for n in (name, *DEPS.get(name, ()))]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not all(s.exists() for s in sources):
        return None
    code = b"".join(s.read_bytes() for s in sources) + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(code + " ".join([cc, *CFLAGS, *sorted(cpu_flags())]).encode())
    dest = cache_dir / f"{name}-{key.hexdigest()[:16]}.so"
    with _lock:
        if str(dest) in _loaded:
            return _loaded[str(dest)]
        lib = None
        try:
            if not dest.exists():
                _build(cc, sources, dest)
            lib = ctypes.CDLL(str(dest))
        except (OSError, subprocess.SubprocessError) as e:
            print(f"cbgen: {what} unavailable ({_why(e)}); using the torch path. "
                  f"{_compiler_message(e)[:300]}", file=sys.stderr)
        _loaded[str(dest)] = lib
        return lib
