"""Tests for llmdpd_pl.layers: the step embedding, MLPs and stacked Linear heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmdpd_pl.layers import SinusoidalPosEmb, StackedLinear, mlp
from tests.network_checks import KERNEL_TOL


def test_sinusoidal_pos_emb() -> None:
    emb = SinusoidalPosEmb(16)
    out = emb(torch.tensor([0, 3]))
    assert out.shape == (2, 16)
    # k = 0: sin(0) = 0 for the first half, cos(0) = 1 for the second (exact in float32).
    assert torch.equal(out[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    # Highest frequency is 1, so the first entry at k = 3 is sin(3).
    assert out[1, 0].item() == pytest.approx(torch.tensor(3.0).sin().item(), abs=KERNEL_TOL)
    with pytest.raises(ValueError, match="dim"):
        SinusoidalPosEmb(7)


def test_mlp_structure() -> None:
    net = mlp(3, [8, 8], 2, nn.Mish)
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.Mish, nn.Linear, nn.Mish, nn.Linear]
    assert mlp(3, [], 2, nn.ReLU)(torch.zeros(1, 3)).shape == (1, 2)


def test_stacked_linear_init_matches_nn_linear_range() -> None:
    torch.manual_seed(0)
    layer = StackedLinear(2, 64, 128)
    bound = 64**-0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    # 8192 uniform draws per head: the std is bound / sqrt(3) to within about 2%.
    assert layer.weight[0].std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert not torch.equal(layer.weight[0], layer.weight[1])
