"""Tests for llmdpd_pl.networks: the denoiser and the batched twin critic, their split first layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmdpd_pl.layers import Mish
from llmdpd_pl.networks import Denoiser, TwinCritic
from tests.network_checks import KERNEL_TOL, assert_all_params_get_grad

B, S, A, C = 5, 4, 3, 6


def test_denoiser_shapes_and_grads() -> None:
    torch.manual_seed(0)
    net = Denoiser(S, A, C, hidden_dim=32)
    term = net.state_term(torch.randn(B, S), torch.randn(B, C))
    assert term.shape == (B, 32)
    eps = net(torch.randn(B, A), torch.randint(0, 5, (B,)), term)
    assert eps.shape == (B, A)
    (eps * torch.randn_like(eps)).sum().backward()
    assert_all_params_get_grad(net)


def test_denoiser_split_first_layer_equals_one_linear_on_the_concatenation() -> None:
    """W_at [a_k, t] + (W_sz [s, z] + b) is the single Linear of Diffusion-QL on concat(a_k, t, s, z)."""
    torch.manual_seed(0)
    net = Denoiser(S, A, C, hidden_dim=32)
    a, k, s, z = torch.randn(B, A), torch.randint(0, 5, (B,)), torch.randn(B, S), torch.randn(B, C)
    reference = net.net(torch.cat([a, net.time_mlp(k), s, z], dim=-1))
    torch.testing.assert_close(net(a, k, net.state_term(s, z)), reference, atol=KERNEL_TOL, rtol=KERNEL_TOL)


def test_denoiser_matches_diffusion_ql_layout() -> None:
    net = Denoiser(S, A, C)
    linears = [m for m in net.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (A + 16 + S + C, 256),
        (256, 256),
        (256, 256),
        (256, A),
    ]
    assert sum(isinstance(m, Mish) for m in net.net) == 3
    t_lin = [m for m in net.time_mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in t_lin] == [(16, 32), (32, 16)]


def test_denoiser_without_conditioning() -> None:
    net = Denoiser(S, A, 0, hidden_dim=32)
    a, k, s = torch.randn(B, A), torch.randint(0, 5, (B,)), torch.randn(B, S)
    out_empty = net(a, k, net.state_term(s, torch.zeros(B, 0)))
    out_none = net(a, k, net.state_term(s))
    assert out_empty.shape == (B, A)
    assert torch.equal(out_empty, out_none)
    with pytest.raises(ValueError, match="cond"):
        Denoiser(S, A, C, hidden_dim=32).state_term(s)
    with pytest.raises(ValueError, match="obs"):
        net.state_term(torch.randn(B, S + 1))
    with pytest.raises(ValueError, match="state_term"):
        net(a, k, torch.randn(B, 31))


def test_twin_critic_shapes_and_independent_heads() -> None:
    torch.manual_seed(0)
    critic = TwinCritic(S, A, C, hidden_dim=32)
    obs, act, cond = torch.randn(B, S), torch.randn(B, A), torch.randn(B, C)
    q1, q2 = critic(obs, act, cond)
    assert q1.shape == (B,) and q2.shape == (B,)
    assert not torch.allclose(q1, q2)  # independently initialised heads


def test_twin_critic_matches_per_head_reference() -> None:
    """Each head equals a plain Linear/Mish stack built from that head's slice of the stacked weights."""
    torch.manual_seed(1)
    critic = TwinCritic(S, A, C, hidden_dim=32, n_layers=3)
    obs, act, cond = torch.randn(B, S), torch.randn(B, A), torch.randn(B, C)
    q = critic(obs, act, cond)
    x = torch.cat([obs, act, cond], dim=-1)
    for head in range(2):
        h = x
        for i, layer in enumerate(critic.layers):
            h = nn.functional.linear(h, layer.weight[head], layer.bias[head, 0])
            if i < len(critic.layers) - 1:
                h = nn.functional.mish(h)
        torch.testing.assert_close(q[head], h.squeeze(-1), atol=KERNEL_TOL, rtol=KERNEL_TOL)


def test_twin_critic_without_conditioning_and_grads() -> None:
    torch.manual_seed(0)
    critic = TwinCritic(S, A, 0, hidden_dim=32)
    obs, act = torch.randn(B, S), torch.randn(B, A)
    q1, q2 = critic(obs, act, torch.zeros(B, 0))
    assert torch.equal(q1, critic(obs, act)[0])
    (q1 * torch.randn(B) + q2 * torch.randn(B)).sum().backward()
    assert_all_params_get_grad(critic)
