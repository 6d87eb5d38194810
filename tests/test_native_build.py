"""native_build.load_library: a failed or timed-out C build is one line on stderr, and the caller
gets None (its torch path)."""

from __future__ import annotations

import shutil

import pytest

from cbgen.engine import native_build

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler")


def _csrc(tmp_path, source: str):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "probe.c").write_text(source)
    return csrc


@needs_cc
def test_timed_out_build_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native_build, "CSRC", _csrc(tmp_path, "int probe(void) { return 1; }\n"))
    monkeypatch.setattr(native_build, "BUILD_TIMEOUT_S", 0.001)
    monkeypatch.delenv("CBGEN_NATIVE_KERNEL", raising=False)
    assert native_build.load_library("probe", tmp_path / "cache", "the probe kernel") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "the probe kernel unavailable (the C build timed out after 0 s; the next run tries again)" in err
    assert not list((tmp_path / "cache").glob("*.so*")), "a timed-out build leaves no file behind"


@needs_cc
def test_failed_build_shows_the_compiler_message_on_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native_build, "CSRC", _csrc(tmp_path, "int probe(void) { return undeclared_name; }\n"))
    monkeypatch.delenv("CBGEN_NATIVE_KERNEL", raising=False)
    assert native_build.load_library("probe", tmp_path / "cache", "the probe kernel") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "the probe kernel unavailable (" in err and "undeclared_name" in err


@needs_cc
def test_build_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "CSRC", _csrc(tmp_path, "int probe(void) { return 41 + 1; }\n"))
    monkeypatch.delenv("CBGEN_NATIVE_KERNEL", raising=False)
    lib = native_build.load_library("probe", tmp_path / "cache", "the probe kernel")
    assert lib is not None and lib.probe() == 42
