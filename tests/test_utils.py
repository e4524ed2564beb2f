"""Tests for llmdpd_pl.utils: seed derivation, atomic writes, cached compilation, gradient-norm clipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from llmdpd_pl.utils import atomic_write, clip_grad_norms, derive_seed, maybe_compiled


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


# ---------------------------------------------------------------------------------------- gradient clipping
def _with_grads(*shapes: tuple[int, ...], scale: float, seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


def _flat_grads(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def test_clip_grad_norms_clips_the_groups_jointly() -> None:
    a, b = _with_grads((3, 4), (5,), scale=10.0, seed=0), _with_grads((2, 2), scale=10.0, seed=1)
    before_a, before_b = _flat_grads(a).clone(), _flat_grads(b).clone()
    norms = clip_grad_norms({"a": a, "b": b}, 1.0)
    assert norms["a"].item() == pytest.approx(before_a.norm().item(), rel=1e-6)
    assert norms["b"].item() == pytest.approx(before_b.norm().item(), rel=1e-6)
    assert norms["total"].item() == pytest.approx(torch.cat([before_a, before_b]).norm().item(), rel=1e-6)
    assert _flat_grads(a + b).norm().item() == pytest.approx(1.0, rel=1e-5)
    factor = 1.0 / (norms["total"].item() + 1e-6)  # one factor for both groups
    torch.testing.assert_close(_flat_grads(a), before_a * factor)
    torch.testing.assert_close(_flat_grads(b), before_b * factor)


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_clip_grad_norms_keeps_gradients_within_the_limit_or_without_one(max_norm: float) -> None:
    scale = 1e-3 if max_norm > 0 else 1e3  # under the limit, or large with clipping off
    params = _with_grads((3, 4), (5,), scale=scale, seed=2)
    before = _flat_grads(params).clone()
    norms = clip_grad_norms({"a": params}, max_norm)
    assert torch.equal(_flat_grads(params), before)
    assert norms["total"].item() == pytest.approx(before.norm().item(), rel=1e-6)


def test_clip_grad_norms_spreads_a_nan_instead_of_hiding_it() -> None:
    params = _with_grads((3,), (4,), scale=1.0, seed=3)
    params[0].grad[1] = float("nan")  # type: ignore[index]
    assert clip_grad_norms({"a": params}, 1.0)["total"].isnan()
    assert _flat_grads(params).isnan().all()
