"""Tests for llmdpd_pl.losses: each equation on a tiny hand-computed case."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmdpd_pl.losses import (
    ActorLosses,
    CriticLosses,
    actor_loss,
    actor_q_term,
    critic_loss,
    diffusion_loss,
    max_q_backup,
    td_target,
)

# Hand-computed values are short decimals; float32 represents them to about 1e-7 relative.
TOL = 1e-6


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_diffusion_loss_eq5_hand_case() -> None:
    eps_pred = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    eps = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # Squared errors 1, 0, 4, 1 -> mean over all 4 elements = 6 / 4 = 1.5.
    assert diffusion_loss(eps_pred, eps).item() == pytest.approx(1.5, abs=TOL)


def test_diffusion_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes"):
        diffusion_loss(torch.zeros(4, 2), torch.zeros(4, 1))


def test_td_target_eq6_hand_case() -> None:
    reward = t(1.0, 0.0, -1.0)
    not_done = t(1.0, 1.0, 0.0)
    q1_next = t(10.0, 2.0, 100.0)
    q2_next = t(8.0, 3.0, 50.0)
    y = td_target(reward, not_done, q1_next, q2_next, gamma=0.5)
    # Row 0: 1 + 0.5 * min(10, 8) = 5.   Row 1: 0 + 0.5 * min(2, 3) = 1.
    # Row 2: terminal, so no bootstrap: -1 regardless of the (large) next values.
    torch.testing.assert_close(y, t(5.0, 1.0, -1.0), atol=TOL, rtol=0)


def test_td_target_is_detached() -> None:
    q1_next = t(1.0, 2.0).requires_grad_()
    q2_next = t(3.0, 0.0).requires_grad_()
    y = td_target(t(0.0, 0.0), t(1.0, 1.0), q1_next, q2_next, gamma=0.99)
    assert not y.requires_grad


def test_td_target_validation() -> None:
    ones = t(1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        td_target(ones, ones, ones, ones, gamma=1.5)
    with pytest.raises(ValueError, match="q1_next"):
        td_target(ones, ones, ones[:, None], ones, gamma=0.9)  # (B, 1) would broadcast to (B, B)


def test_max_q_backup() -> None:
    q_next = torch.tensor([[1.0, 5.0, -2.0], [-3.0, -1.0, -4.0]])
    torch.testing.assert_close(max_q_backup(q_next), t(5.0, -1.0), atol=0, rtol=0)  # exact: a selection
    with pytest.raises(ValueError, match="q_next"):
        max_q_backup(t(1.0, 2.0))


def test_max_q_backup_per_head_then_min() -> None:
    """Diffusion-QL order: max over candidates within each head, then the min of the two heads."""
    q1 = torch.tensor([[1.0, 4.0]])
    q2 = torch.tensor([[3.0, 2.0]])
    y = td_target(t(0.0), t(1.0), max_q_backup(q1), max_q_backup(q2), gamma=1.0)
    # max(q1) = 4, max(q2) = 3 -> min = 3 (min first would give max(1, 2) = 2).
    assert y.item() == pytest.approx(3.0, abs=TOL)


def test_critic_loss_eq6_hand_case() -> None:
    q1 = t(1.0, 2.0)
    q2 = t(0.0, 4.0)
    target = t(2.0, 2.0)
    # Head 1: ((1-2)^2 + 0^2) / 2 = 0.5.   Head 2: ((0-2)^2 + (4-2)^2) / 2 = 4.   Sum = 4.5.
    assert critic_loss(q1, q2, target).item() == pytest.approx(4.5, abs=TOL)


def test_critic_loss_gradient_only_into_q() -> None:
    q1 = t(1.0, 2.0).requires_grad_()
    q2 = t(0.0, 4.0).requires_grad_()
    target = t(2.0, 2.0).requires_grad_()
    critic_loss(q1, q2, target).backward()
    # d/dq1 mean((q1 - y)^2) = 2 (q1 - y) / B.
    torch.testing.assert_close(q1.grad, t(-1.0, 0.0), atol=TOL, rtol=0)
    torch.testing.assert_close(q2.grad, t(-2.0, 2.0), atol=TOL, rtol=0)
    assert target.grad is None  # the target is a stop-gradient


def test_actor_q_term_value_and_gradient() -> None:
    q_pi = t(1.0, 3.0).requires_grad_()
    q_other = t(-2.0, 6.0).requires_grad_()
    q = actor_q_term(q_pi, q_other)
    # -mean(q_pi) / mean(|q_other|) = -2 / 4 = -0.5.
    assert q.item() == pytest.approx(-0.5, abs=TOL)
    q.backward()
    # d/dq_pi_b = -1 / (B * mean|q_other|) = -1 / 8 for each row.
    torch.testing.assert_close(q_pi.grad, t(-0.125, -0.125), atol=TOL, rtol=0)
    assert q_other.grad is None  # the normaliser is detached


def test_actor_q_term_is_scale_invariant() -> None:
    q_pi, q_other = t(1.0, 3.0), t(-2.0, 6.0)
    # Rescaling rewards rescales both heads alike; the normalised term must not change.
    assert actor_q_term(100.0 * q_pi, 100.0 * q_other).item() == pytest.approx(
        actor_q_term(q_pi, q_other).item(), abs=TOL
    )


def test_actor_loss_eq8() -> None:
    bc = torch.tensor(0.25)
    q_term = torch.tensor(-0.5)
    assert actor_loss(bc, q_term, eta=2.0).item() == pytest.approx(0.25 - 1.0, abs=TOL)
    assert actor_loss(bc, q_term, eta=0.0).item() == pytest.approx(0.25, abs=TOL)  # pure BC
    with pytest.raises(ValueError, match="eta"):
        actor_loss(bc, q_term, eta=-1.0)


def test_loss_containers() -> None:
    q = t(1.0, 2.0).requires_grad_()
    critic = CriticLosses(
        loss=q.sum(), q1_mean=q.mean(), q2_mean=torch.tensor(0.0), target_mean=torch.tensor(1.0)
    )
    logged = critic.as_dict("train/critic")
    assert set(logged) == {
        "train/critic/loss",
        "train/critic/q1_mean",
        "train/critic/q2_mean",
        "train/critic/target_mean",
    }
    assert critic.as_dict("train/critic/").keys() == logged.keys()  # a trailing slash is not doubled
    assert all(not v.requires_grad for v in logged.values())
    assert critic.loss.requires_grad  # the container itself keeps the graph for backward
    actor = ActorLosses(loss=torch.tensor(1.0), bc_loss=torch.tensor(2.0), q_loss=torch.tensor(-1.0))
    assert actor.as_dict("") == {
        "loss": torch.tensor(1.0),
        "bc_loss": torch.tensor(2.0),
        "q_loss": torch.tensor(-1.0),
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        actor.loss = torch.tensor(0.0)  # type: ignore[misc]
