"""What the cache holds: GGUF conversions (list, remove, prune) and the native-kernel build dir.

Invariant kept from ``gguf.py``: a conversion dir is complete or absent. Removal first renames
it to a ``.tmp-PID-rm-...`` name (one atomic step, after which no load finds it), then deletes
that; a removal killed half-way leaves a stale temp dir, which the next conversion or
``prune`` clears.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from cbgen.config import cache_root

from .gguf import PROVENANCE, TMP_PREFIX, temp_is_stale
from .resolve import CACHE_FORMAT, _gguf_name


@dataclass(frozen=True)
class Conversion:
    """One dir under ``<cache>/gguf``. ``source_state``: ``ok`` (the GGUF is there, same size and
    mtime as when converted), ``changed``, ``missing``, or ``unknown`` (no readable provenance)."""

    path: Path
    name: str  # the model name, as `cbgen info` shows it
    source: Path | None  # the GGUF it was converted from
    source_state: str
    dtype: str  # float32 | bfloat16 | ...; old (format 1) conversions were all float32
    size_bytes: int
    created: datetime
    format: int | None  # CACHE_FORMAT it was written with (None: unknown)

    @property
    def current(self) -> bool:
        return self.format == CACHE_FORMAT

    @property
    def stale_reason(self) -> str | None:
        """Why ``prune`` removes it, or None to keep it."""
        if self.source_state != "ok":
            return f"source {self.source_state}"
        if not self.current:
            return f"old format {self.format if self.format is not None else '?'} (now {CACHE_FORMAT})"
        return None

    def line(self) -> str:
        """``NAME  DTYPE  SIZE  CREATED  source STATE  SOURCE  (DIR)`` on one line."""
        fmt = "" if self.current else f"  format {self.format if self.format is not None else '?'}"
        return (f"{self.name}  {self.dtype}  {human_size(self.size_bytes)}  "
                f"{self.created.astimezone().strftime('%Y-%m-%d %H:%M')}  source {self.source_state}{fmt}  "
                f"{self.source or '?'}  ({self.path.name})")


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KB`` (powers of 1000, as ``ls -h --si`` and disk vendors count)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # removed while we walk
                pass
    return total


def gguf_dir(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "gguf"


def kernels_dir(cache_dir: str | None = None) -> Path:
    """Where ``engine/native_build.py`` puts the compiled kernels (``runner.py``: ``cache_root() / "kernels"``)."""
    return cache_root(cache_dir) / "kernels"


def list_conversions(cache_dir: str | None = None) -> list[Conversion]:
    """Every conversion dir (temp dirs excluded), sorted by name then dtype."""
    root = gguf_dir(cache_dir)
    if not root.is_dir():
        return []
    found = [_describe(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
    return sorted(found, key=lambda c: (c.name, c.dtype, c.path.name))


def temp_dirs(cache_dir: str | None = None) -> list[tuple[Path, bool]]:
    """``[(temp dir, stale)]``: conversions in progress, and ones whose process is gone."""
    root = gguf_dir(cache_dir)
    if not root.is_dir():
        return []
    return [(p, temp_is_stale(p)) for p in sorted(root.glob(TMP_PREFIX + "*"))]


def _describe(path: Path) -> Conversion:
    try:
        prov = json.loads((path / PROVENANCE).read_text())
        if not isinstance(prov, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        prov = {}
    source = Path(prov["gguf"]) if isinstance(prov.get("gguf"), str) else None
    state = "unknown"
    if source is not None:
        try:
            st = source.stat()
            state = "ok" if (st.st_size, st.st_mtime_ns) == (prov.get("size"), prov.get("mtime_ns")) else "changed"
        except OSError:
            state = "missing"
    try:
        created = datetime.fromisoformat(prov["created"])
    except (KeyError, TypeError, ValueError):  # format 1 wrote no date: the dir's own
        created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    fmt = prov.get("format")
    return Conversion(
        path=path, name=prov.get("name") or (_gguf_name(source) if source else path.name),
        source=source, source_state=state, dtype=prov.get("dtype") or ("float32" if prov else "?"),
        size_bytes=dir_size(path), created=created, format=fmt if isinstance(fmt, int) else None)


def select(conversions: list[Conversion], names: list[str]) -> tuple[list[Conversion], list[str]]:
    """``(chosen, unknown names)``. A name is a conversion's dir name (one) or a model name (all of its dtypes)."""
    chosen: dict[Path, Conversion] = {}
    unknown = []
    for name in names:
        hits = [c for c in conversions if name in (c.path.name, c.name)]
        if not hits:
            unknown.append(name)
        chosen.update((c.path, c) for c in hits)
    return list(chosen.values()), unknown


def remove(path: Path) -> None:
    """Delete a conversion (or temp) dir: first renamed out of sight, then removed. Raises ``OSError``."""
    if path.name.startswith(TMP_PREFIX):
        shutil.rmtree(path)
        return
    # mkdtemp gives a unique name this process owns; the rename replaces that empty dir.
    doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-rm-", dir=path.parent))
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def rm(names: list[str], everything: bool = False, cache_dir: str | None = None) -> Iterator[str]:
    """Remove the conversions ``names`` select (``select``), or all and the stale temp dirs with
    ``everything``; yields a ``removed ...`` line after each. Raises ``LookupError`` naming unknown
    names before anything is removed, ``OSError`` from a removal."""
    found = list_conversions(cache_dir)
    chosen, unknown = (found, []) if everything else select(found, names)
    if unknown:
        raise LookupError(f"no conversion named {', '.join(unknown)} in {gguf_dir(cache_dir)} "
                          "(see `cbgen cache ls`)")
    doomed = [(c.path, f"{c.name} {c.dtype} {human_size(c.size_bytes)}") for c in chosen]
    doomed += [(p, "stale temp dir") for p, stale in temp_dirs(cache_dir) if stale and everything]
    for path, what in doomed:
        remove(path)
        yield f"removed {what} ({path.name})"


def prune(cache_dir: str | None = None) -> list[tuple[Path, str]]:
    """Remove conversions whose source is gone or changed or whose format is old, and stale temp dirs.

    Returns ``[(removed dir, reason)]``. Raises ``OSError`` on a dir it cannot remove.
    """
    removed = []
    for c in list_conversions(cache_dir):
        reason = c.stale_reason
        if reason is not None:
            remove(c.path)
            removed.append((c.path, f"{c.name} {c.dtype}: {reason}"))
    for tmp, stale in temp_dirs(cache_dir):
        if stale:
            remove(tmp)
            removed.append((tmp, "stale temp dir of a conversion that did not finish"))
    return removed


def ls_lines(cache_dir: str | None = None) -> list[str]:
    """``cbgen cache ls``: a line per conversion, per temp dir, then the kernel build dir."""
    lines = [c.line() for c in list_conversions(cache_dir)]
    lines += [f"{'stale temp dir' if stale else 'converting now'}  {human_size(dir_size(p))}  ({p.name})"
              for p, stale in temp_dirs(cache_dir)]
    k = kernels_dir(cache_dir)
    lines.append(f"native kernels  {human_size(dir_size(k))}  {k}")
    return lines
