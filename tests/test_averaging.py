"""The two running averages of an update: the target critics' soft update and the actor's EMA."""

from __future__ import annotations

import torch

from llmdpd_pl.averaging import ema_update, soft_update


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]


def test_soft_update_moves_the_target_tau_of_the_way() -> None:
    target, online = _params(0), _params(1)
    expected = [(1 - 0.005) * t + 0.005 * o for t, o in zip(target, online, strict=True)]
    soft_update(target, online, 0.005)
    assert all(torch.allclose(t, e, atol=1e-7) for t, e in zip(target, expected, strict=True))
    assert all(torch.equal(o, p) for o, p in zip(online, _params(1), strict=True))  # the source is untouched


def test_ema_update_keeps_decay_of_the_average() -> None:
    ema, online = _params(0), _params(1)
    expected = [0.995 * e + (1 - 0.995) * o for e, o in zip(ema, online, strict=True)]
    ema_update(ema, online, 0.995)
    assert all(torch.allclose(e, x, atol=1e-7) for e, x in zip(ema, expected, strict=True))
    same = _params(2)
    ema_update(same, _params(2), 0.5)  # the average of equal values is that value, exactly
    assert all(torch.equal(s, p) for s, p in zip(same, _params(2), strict=True))
