"""Tests for llmdpd_pl.files: atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmdpd_pl.files import atomic_write


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
