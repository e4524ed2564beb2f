"""Noise schedules β_1..β_K of the diffusion over actions (Diffusion-QL's VP schedule, and DDPM's linear one).

Each is computed in float64; :class:`~llmdpd_pl.diffusion.GaussianDiffusion` stores it as float32 buffers.
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["vp", "linear"]


def check_n_steps(n_steps: int) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")


def vp_beta_schedule(n_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> Tensor:
    """Variance-preserving (VP-SDE) schedule discretised to K steps, as in Diffusion-QL.

    For t = 1..K::

        alpha_t = exp(-beta_min / K - 0.5 * (beta_max - beta_min) * (2t - 1) / K^2)
        beta_t  = 1 - alpha_t

    This is the discretisation of the VP SDE (Song et al. 2021) with beta(tau) linear in
    tau in [0, 1]; it stays a sensible schedule at very small K (Diffusion-QL uses K = 5).

    Args:
        n_steps: number of diffusion steps K (>= 1).
        beta_min: beta(tau) at tau = 0 (>= 0).
        beta_max: beta(tau) at tau = 1 (>= beta_min).

    Returns:
        betas, float64 tensor of shape (K,).

    Raises:
        ValueError: if ``n_steps < 1``, ``beta_min < 0`` or ``beta_max < beta_min``.
    """
    check_n_steps(n_steps)
    if beta_min < 0:
        raise ValueError(f"beta_min must be >= 0, got {beta_min!r}")
    if beta_max < beta_min:
        raise ValueError(f"beta_max must be >= beta_min ({beta_min!r}), got {beta_max!r}")
    t = torch.arange(1, n_steps + 1, dtype=torch.float64)  # (K,)
    big_k = float(n_steps)
    alphas = torch.exp(-beta_min / big_k - 0.5 * (beta_max - beta_min) * (2.0 * t - 1.0) / big_k**2)
    return 1.0 - alphas


def linear_beta_schedule(n_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Linear schedule of DDPM (Ho et al. 2020): beta_t evenly spaced from beta_start to beta_end.

    With the default endpoints this only reaches (near) pure noise for large K (DDPM uses
    K = 1000); at K = 5 alpha_bar_K is still about 0.95. Prefer ``vp_beta_schedule`` for small K.

    Args:
        n_steps: number of diffusion steps K (>= 1).
        beta_start: beta of the first (least noisy) step, in (0, 1).
        beta_end: beta of the last step, in (0, 1).

    Returns:
        betas, float64 tensor of shape (K,).

    Raises:
        ValueError: if ``n_steps < 1`` or an endpoint lies outside (0, 1).
    """
    check_n_steps(n_steps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
