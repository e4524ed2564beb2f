"""Tests for llmdpd_pl.layers: Mish, the step embedding, MLPs and stacked Linear heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmdpd_pl.layers import Mish, SinusoidalPosEmb, StackedLinear, mish, mlp
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


def test_mish_matches_torch_mish_and_its_gradient() -> None:
    x = torch.linspace(-100.0, 100.0, 20_001, requires_grad=True)  # both tails
    ours, ref = mish(x), F.mish(x)
    # One sigmoid and a division vs PyTorch's tanh(log1p(exp)): float32 rounding of O(|x|) values.
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-6)
    g_ours, g_ref = (torch.autograd.grad(y.sum(), x)[0] for y in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref, atol=5e-6, rtol=1e-5)
    big = torch.tensor([1e4, 3.0e38, -1e4])  # no intermediate overflows
    assert torch.equal(mish(big), torch.tensor([1e4, 3.0e38, -0.0]))


def test_mish_gradcheck_float64() -> None:
    x = (torch.randn(64, dtype=torch.float64) * 5).requires_grad_()
    assert torch.autograd.gradcheck(mish, (x,))
    assert torch.equal(Mish()(x.detach()), mish(x.detach()))


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


@pytest.mark.parametrize("out_dim", [1, 16])
def test_stacked_linear_weight_grad_has_the_weight_layout(out_dim: int) -> None:
    """DDP compares each gradient's strides with its bucket's (the weight's), size-1 dimensions included;
    ``bmm`` through ``weight.transpose(1, 2)`` gives a transposed gradient without the layout hook."""
    layer = StackedLinear(2, 8, out_dim)
    layer(torch.randn(2, 5, 8)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.stride() == layer.weight.stride()
