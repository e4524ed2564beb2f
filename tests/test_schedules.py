"""Tests for llmdpd_pl.schedules: the VP and linear schedules, pinned."""

from __future__ import annotations

import math

import pytest
import torch

from llmdpd_pl.schedules import linear_beta_schedule, vp_beta_schedule


def vp_betas_by_hand(n_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> list[float]:
    return [
        1.0 - math.exp(-beta_min / n_steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / n_steps**2)
        for t in range(1, n_steps + 1)
    ]


def test_vp_schedule_pinned_k5() -> None:
    betas = vp_beta_schedule(5)
    assert betas.dtype == torch.float64 and betas.shape == (5,)
    expected = vp_betas_by_hand(5)
    # float64 on both sides, same formula: agreement to rounding.
    for got, want in zip(betas.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    # The literal values, so a change of formula on both sides is caught too (rounded to 6 places).
    assert [round(b, 6) for b in betas.tolist()] == [0.195875, 0.458818, 0.635781, 0.754878, 0.835031]


def test_vp_schedule_custom_endpoints() -> None:
    betas = vp_beta_schedule(7, beta_min=0.5, beta_max=3.0)
    for got, want in zip(betas.tolist(), vp_betas_by_hand(7, 0.5, 3.0), strict=True):
        assert got == pytest.approx(want, abs=1e-12)  # float64, same formula


def test_linear_schedule_endpoints() -> None:
    betas = linear_beta_schedule(100)
    assert betas.dtype == torch.float64 and betas.shape == (100,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)  # float64 linspace endpoint is exact
    assert betas[-1].item() == pytest.approx(2e-2, abs=1e-15)  # float64 linspace endpoint is exact
    assert torch.all(betas.diff() > 0)


@pytest.mark.parametrize("fn", [vp_beta_schedule, linear_beta_schedule])
@pytest.mark.parametrize("n_steps", [0, -3])
def test_schedule_rejects_bad_n_steps(fn, n_steps: int) -> None:
    with pytest.raises(ValueError, match="n_steps"):
        fn(n_steps)
