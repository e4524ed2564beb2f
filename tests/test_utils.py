"""Tests for llmdpd_pl.utils: seed derivation, atomic writes, cached compilation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmdpd_pl.utils import atomic_write, derive_seed, maybe_compiled


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a" / "b.gif", b"first")
    assert path.read_bytes() == b"first"
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["b.gif"]  # no temporary file left


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "c.bin", b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_derive_seed_is_pinned() -> None:
    # Stable across processes (unlike hash()), so the same spec always builds the same data.
    assert derive_seed(0, "reach", "train") == 118402700
    assert derive_seed(0, "reach", "prompts") != derive_seed(0, "reach", "train")
    assert derive_seed(1, "reach", "train") != derive_seed(0, "reach", "train")
    assert 0 <= derive_seed("anything", 3.5) < 2**31


def test_maybe_compiled_compiles_once_per_function() -> None:
    def double(x: int) -> int:
        return 2 * x

    assert maybe_compiled(double, False) is double
    compiled = maybe_compiled(double, True)
    assert compiled is not double and maybe_compiled(double, True) is compiled


def test_git_commit_of_this_checkout_and_none_elsewhere(tmp_path: Path) -> None:
    from llmdpd_pl.utils import git_commit

    commit = git_commit()
    assert commit is None or len(commit.removesuffix("+dirty")) == 40
    assert git_commit(tmp_path) is None  # not a git checkout's top level
