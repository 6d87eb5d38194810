"""`cbgen cache ls / rm / prune` through Typer's CliRunner, on real conversions of the tiny GGUF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.models import gguf as gguf_mod
from cbgen.models import resolve as resolve_mod


def cache(args, root):
    return CliRunner().invoke(app, ["cache", *args], env={"CBGEN_CACHE": str(root)}, catch_exceptions=False)


@pytest.fixture
def cached(tiny_gguf, tmp_path):
    """A private copy of the tiny GGUF converted in float32 and bfloat16 into ``tmp_path/cache``."""
    src = tmp_path / "src" / tiny_gguf.name
    src.parent.mkdir()
    shutil.copy2(tiny_gguf, src)
    root = tmp_path / "cache"
    dirs = {dt: gguf_mod.ensure_converted(src, dt, str(root), status=lambda _m: None)[0]
            for dt in (torch.float32, torch.bfloat16)}
    return src, root, dirs


def test_ls_lists_each_conversion_and_the_kernel_dir(cached):
    src, root, dirs = cached
    (root / "kernels").mkdir()
    (root / "kernels" / "paged_decode-x.so").write_bytes(b"\0" * 2500)
    r = cache(["ls"], root)
    assert r.exit_code == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for line, dt in zip(lines, ("bfloat16", "float32")):  # sorted by name, then dtype
        assert line.startswith(f"tiny-llama  {dt}  ") and "source ok" in line and str(src) in line
        assert f"({dirs[getattr(torch, dt)].name})" in line and (" MB  " in line or " KB  " in line)
    assert lines[2] == f"native kernels  2.5 KB  {root / 'kernels'}"


def test_ls_empty_cache(tmp_path):
    r = cache(["ls"], tmp_path)
    assert r.exit_code == 0 and r.stdout.splitlines() == [f"native kernels  0 B  {tmp_path / 'kernels'}"]


def test_rm_by_dir_name_then_by_model_name(cached):
    src, root, dirs = cached
    r = cache(["rm", dirs[torch.float32].name], root)
    assert r.exit_code == 0 and r.stdout.startswith("removed tiny-llama float32 ")
    assert not dirs[torch.float32].exists() and dirs[torch.bfloat16].is_dir()
    r = cache(["rm", "tiny-llama"], root)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1 and not dirs[torch.bfloat16].exists()
    assert os.listdir(root / "gguf") == []  # no temp dir left behind


def test_rm_unknown_name_is_one_line_error_and_removes_nothing(cached):
    src, root, dirs = cached
    r = cache(["rm", "tiny-llama", "no-such-model"], root)
    assert r.exit_code == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no conversion named no-such-model" in r.stderr
    assert all(d.is_dir() for d in dirs.values())


def test_rm_needs_names_or_all(cached):
    _src, root, _dirs = cached
    for args in (["rm"], ["rm", "--all", "tiny-llama"]):
        r = cache(args, root)
        assert r.exit_code == 2 and "give NAME... or --all" in r.stderr


def test_rm_all(cached):
    _src, root, dirs = cached
    r = cache(["rm", "--all"], root)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    assert os.listdir(root / "gguf") == []


def test_prune_removes_changed_old_and_stale_only(cached, tiny_gguf):
    src, root, dirs = cached
    # an old-format conversion (as CACHE_FORMAT 1 wrote them) of a file that is still there
    old = root / "gguf" / "tiny-llama.F32-0123456789abcdef"
    shutil.copytree(dirs[torch.float32], old)
    prov = json.loads((old / gguf_mod.PROVENANCE).read_text())
    for key in ("dtype", "name", "created", "method"):
        del prov[key]
    (old / gguf_mod.PROVENANCE).write_text(json.dumps({**prov, "format": 1}))
    # a temp dir of a killed conversion, and one of a conversion in progress (this process)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / "gguf" / f"{gguf_mod.TMP_PREFIX}{dead.pid}-abc"
    live = root / "gguf" / f"{gguf_mod.TMP_PREFIX}{os.getpid()}-busy"
    stale.mkdir()
    live.mkdir()
    ls = cache(["ls"], root).stdout
    assert "format 1" in ls and "stale temp dir" in ls and "converting now" in ls

    r = cache(["prune"], root)
    assert r.exit_code == 0
    assert sorted(r.stdout.splitlines()) == sorted([
        f"removed tiny-llama float32: old format 1 (now {resolve_mod.CACHE_FORMAT}) ({old.name})",
        f"removed stale temp dir of a conversion that did not finish ({stale.name})"])
    assert all(d.is_dir() for d in dirs.values()) and live.is_dir()

    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # the source changed: both go
    r = cache(["prune"], root)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2 and "source changed" in r.stdout
    assert not any(d.exists() for d in dirs.values())
    assert cache(["prune"], root).stdout == ""


def test_prune_source_gone(cached):
    src, root, dirs = cached
    src.unlink()
    assert "source missing" in cache(["ls"], root).stdout
    r = cache(["prune"], root)
    assert r.exit_code == 0 and r.stdout.count("source missing") == 2
