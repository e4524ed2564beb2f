"""Tests for llmdpd_pl.prompt_encoders: shapes, masking, ragged rows and gradient coverage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmdpd_pl.prompt_encoders import TextHead, TrajectoryEncoder
from tests.network_checks import KERNEL_TOL, assert_all_params_get_grad

S, A = 4, 3


def test_text_head() -> None:
    torch.manual_seed(0)
    head = TextHead(in_dim=24, out_dim=8)
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 512), (512, 512), (512, 8)]
    assert sum(isinstance(m, nn.ReLU) for m in head.net) == 2
    out = head(torch.randn(3, 24))
    assert out.shape == (3, 8)
    (out * torch.randn_like(out)).sum().backward()
    assert_all_params_get_grad(head)


def _small_encoder(max_len: int = 8) -> TrajectoryEncoder:
    return TrajectoryEncoder(S, A, out_dim=7, max_len=max_len, d_model=16, n_layers=2, n_heads=2)


def test_trajectory_encoder_shapes_and_grads() -> None:
    torch.manual_seed(0)
    enc = _small_encoder(max_len=8)
    z = enc(torch.randn(3, 8, S), torch.randn(3, 8, A))  # full length: every positional row is used
    assert z.shape == (3, 7)
    (z * torch.randn_like(z)).sum().backward()
    assert_all_params_get_grad(enc)


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
