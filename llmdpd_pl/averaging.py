"""The two running averages of an LLMDPD update, each one in-place function of parameter lists.

* :func:`soft_update`: the target critics follow the critics (Polyak averaging, rate τ).
* :func:`ema_update`: the EMA actor follows the actor (decay β), every ``every`` updates once it averages.

Both are ``lerp`` over whole parameter lists (``torch._foreach_lerp_``, as ``torch.optim.swa_utils``'
``get_ema_multi_avg_fn`` does), so a call costs a few fused kernels, not one per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def soft_update(target: Iterable[Tensor], online: Iterable[Tensor], tau: float) -> None:
    """Target networks (Diffusion-QL, Algorithm 1): ``φ' ← (1 − τ) φ' + τ φ``, in place on ``target``."""
    torch._foreach_lerp_(list(target), list(online), tau)


@torch.no_grad()
def ema_update(ema: Iterable[Tensor], online: Iterable[Tensor], decay: float) -> None:
    """Exponential moving average: ``θ_EMA ← β θ_EMA + (1 − β) θ``, β = ``decay``, in place on ``ema``."""
    torch._foreach_lerp_(list(ema), list(online), 1 - decay)


__all__ = ["ema_update", "soft_update"]
