"""Tests for llmdpd_pl.networks: shapes, the batched twin critic, masking, and gradient coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmdpd_pl.networks import (
    Denoiser,
    Mish,
    SinusoidalPosEmb,
    StackedLinear,
    TextHead,
    TrajectoryEncoder,
    TwinCritic,
    mish,
    mlp,
)

# Same float32 computation routed through different kernels (baddbmm vs addmm, masked vs cropped
# attention): agreement to a few ulps of O(1) activations.
KERNEL_TOL = 1e-5

B, S, A, C = 5, 4, 3, 6


def _assert_all_params_get_grad(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


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
    x = torch.linspace(-100.0, 100.0, 20_001, requires_grad=True)  # both tails and the cap at 20
    ours, ref = mish(x), F.mish(x)
    # One exp and a division vs PyTorch's tanh(log1p(exp)): float32 rounding of O(|x|) values.
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-6)
    g_ours, g_ref = (torch.autograd.grad(y.sum(), x)[0] for y in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref, atol=5e-6, rtol=1e-5)
    big = torch.tensor([1e4, 3.0e38, -1e4])  # exp would overflow without the cap
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


def test_denoiser_shapes_and_grads() -> None:
    torch.manual_seed(0)
    net = Denoiser(S, A, C, hidden_dim=32)
    context = net.context(torch.randn(B, S), torch.randn(B, C))
    assert context.shape == (B, 32)
    eps = net(torch.randn(B, A), torch.randint(0, 5, (B,)), context)
    assert eps.shape == (B, A)
    (eps * torch.randn_like(eps)).sum().backward()
    _assert_all_params_get_grad(net)


def test_denoiser_split_first_layer_equals_one_linear_on_the_concatenation() -> None:
    """W_at [a_k, t] + (W_sz [s, z] + b) is the single Linear of Diffusion-QL on concat(a_k, t, s, z)."""
    torch.manual_seed(0)
    net = Denoiser(S, A, C, hidden_dim=32)
    a, k, s, z = torch.randn(B, A), torch.randint(0, 5, (B,)), torch.randn(B, S), torch.randn(B, C)
    reference = net.net(torch.cat([a, net.time_mlp(k), s, z], dim=-1))
    torch.testing.assert_close(net(a, k, net.context(s, z)), reference, atol=KERNEL_TOL, rtol=KERNEL_TOL)


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
    out_empty = net(a, k, net.context(s, torch.zeros(B, 0)))
    out_none = net(a, k, net.context(s))
    assert out_empty.shape == (B, A)
    assert torch.equal(out_empty, out_none)
    with pytest.raises(ValueError, match="cond"):
        Denoiser(S, A, C, hidden_dim=32).context(s)
    with pytest.raises(ValueError, match="obs"):
        net.context(torch.randn(B, S + 1))
    with pytest.raises(ValueError, match="context"):
        net(a, k, torch.randn(B, 31))


def test_twin_critic_shapes_and_independent_heads() -> None:
    torch.manual_seed(0)
    critic = TwinCritic(S, A, C, hidden_dim=32)
    obs, act, cond = torch.randn(B, S), torch.randn(B, A), torch.randn(B, C)
    q1, q2 = critic(obs, act, cond)
    assert q1.shape == (B,) and q2.shape == (B,)
    assert not torch.allclose(q1, q2)  # independently initialised heads


@pytest.mark.parametrize("cond_dim", [C, 0])
def test_twin_critic_split_first_layer_equals_forward(cond_dim: int) -> None:
    """W_a a + (W_sz [s, z] + b) is each head's single Linear on concat(s, a, z), with its gradients."""
    torch.manual_seed(0)
    critic = TwinCritic(S, A, cond_dim, hidden_dim=32)
    obs, act, cond = torch.randn(B, S), torch.randn(B, A), torch.randn(B, cond_dim)
    context = critic.context(obs, cond)
    assert context.shape == (2, B, 32)
    split, whole = critic.from_context(act, context), critic(obs, act, cond)
    for q_split, q_whole in zip(split, whole, strict=True):
        torch.testing.assert_close(q_split, q_whole, atol=KERNEL_TOL, rtol=KERNEL_TOL)
    w = torch.randn(2, B)
    grads = [
        torch.autograd.grad((w[0] * q1 + w[1] * q2).sum(), critic.parameters()) for q1, q2 in (split, whole)
    ]
    for g_split, g_whole in zip(*grads, strict=True):
        torch.testing.assert_close(g_split, g_whole, atol=KERNEL_TOL, rtol=KERNEL_TOL)
    with pytest.raises(ValueError, match="context"):
        critic.from_context(act, torch.randn(2, B, 31))
    with pytest.raises(ValueError, match="act"):
        critic.from_context(torch.randn(B, A + 1), context)


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


def test_stacked_linear_init_matches_nn_linear_range() -> None:
    torch.manual_seed(0)
    layer = StackedLinear(2, 64, 128)
    bound = 64**-0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    # 8192 uniform draws per head: the std is bound / sqrt(3) to within about 2%.
    assert layer.weight[0].std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_twin_critic_without_conditioning_and_grads() -> None:
    torch.manual_seed(0)
    critic = TwinCritic(S, A, 0, hidden_dim=32)
    obs, act = torch.randn(B, S), torch.randn(B, A)
    q1, q2 = critic(obs, act, torch.zeros(B, 0))
    assert torch.equal(q1, critic(obs, act)[0])
    (q1 * torch.randn(B) + q2 * torch.randn(B)).sum().backward()
    _assert_all_params_get_grad(critic)


def test_text_head() -> None:
    torch.manual_seed(0)
    head = TextHead(in_dim=24, out_dim=8)
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 512), (512, 512), (512, 8)]
    assert sum(isinstance(m, nn.ReLU) for m in head.net) == 2
    out = head(torch.randn(3, 24))
    assert out.shape == (3, 8)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_params_get_grad(head)


def _small_encoder(max_len: int = 8) -> TrajectoryEncoder:
    return TrajectoryEncoder(S, A, out_dim=7, max_len=max_len, d_model=16, n_layers=2, n_heads=2)


def test_trajectory_encoder_shapes_and_grads() -> None:
    torch.manual_seed(0)
    enc = _small_encoder(max_len=8)
    z = enc(torch.randn(3, 8, S), torch.randn(3, 8, A))  # full length: every positional row is used
    assert z.shape == (3, 7)
    (z * torch.randn_like(z)).sum().backward()
    _assert_all_params_get_grad(enc)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_trajectory_encoder_padding_is_ignored(train: bool) -> None:
    torch.manual_seed(0)
    enc = _small_encoder(max_len=8).train(train)
    obs, act = torch.randn(2, 5, S), torch.randn(2, 5, A)
    with torch.no_grad():  # eval + no_grad also exercises the transformer's fast path
        reference = enc(obs, act)  # unpadded, length 5
        # Pad to length 8 with large garbage; the mask marks those steps invalid.
        obs_pad = torch.cat([obs, 100 * torch.randn(2, 3, S)], dim=1)
        act_pad = torch.cat([act, 100 * torch.randn(2, 3, A)], dim=1)
        mask = torch.zeros(2, 8, dtype=torch.bool)
        mask[:, :5] = True
        padded = enc(obs_pad, act_pad, mask)
        unmasked = enc(obs_pad, act_pad)
    torch.testing.assert_close(padded, reference, atol=KERNEL_TOL, rtol=KERNEL_TOL)
    assert not torch.allclose(unmasked, reference, atol=1e-3)  # the garbage would matter without the mask


def test_trajectory_encoder_ragged_rows() -> None:
    """Rows of different valid lengths in one call equal encoding each row alone."""
    torch.manual_seed(0)
    enc = _small_encoder(max_len=8)
    obs, act = torch.randn(2, 6, S), torch.randn(2, 6, A)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        both = enc(obs, act, mask)
        row1 = enc(obs[1:, :3], act[1:, :3])
    torch.testing.assert_close(both[1:], row1, atol=KERNEL_TOL, rtol=KERNEL_TOL)


def test_trajectory_encoder_validation() -> None:
    enc = _small_encoder(max_len=8)
    with pytest.raises(ValueError, match="L=9"):
        enc(torch.randn(1, 9, S), torch.randn(1, 9, A))
    with pytest.raises(ValueError, match="mask"):
        enc(torch.randn(1, 4, S), torch.randn(1, 4, A), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_heads"):
        TrajectoryEncoder(S, A, out_dim=7, max_len=8, d_model=15, n_heads=2)
