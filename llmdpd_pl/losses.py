"""The LLMDPD training objectives (paper Section 3.2, Eq. 5-8), one pure function per equation.

Notation: B is the batch size, A the action dimension, N the number of candidate next actions of
the max-Q backup. Q values are 1-D tensors of shape (B,); passing (B, 1) where (B,) is expected is
rejected with a ``ValueError`` rather than silently broadcast to (B, B).

The LightningModule only orchestrates these: the critic step is
``critic_loss(q1, q2, td_target(r, not_done, q1', q2', gamma))`` and the actor step is
``actor_loss(diffusion_loss(eps_pred, eps), actor_q_term(q_i, q_j), eta)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match, got {shapes}")


def _check_1d(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")


def diffusion_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Paper Eq. 5, the diffusion (behaviour-cloning) loss L_d.

    ``L_d = E_{i, (s, a), k, eps} || eps - eps_theta(sqrt(ab_k) a + sqrt(1 - ab_k) eps, s, z, k) ||^2``

    Reduction: the mean over **all** B x A elements (``F.mse_loss``), as in Diffusion-QL's official
    code, not the sum over the action dimension that the literal ``||.||^2`` implies. The two differ
    by the constant factor A; matching Diffusion-QL keeps its eta (the actor-loss trade-off of
    Eq. 8) meaningful across action dimensions and comparable to the published settings.

    Args:
        eps_pred: eps_theta(a_k, s, z, k), (B, A).
        eps: the noise that produced a_k, (B, A).

    Returns:
        Scalar loss.
    """
    _check_same_shape(eps_pred=eps_pred, eps=eps)
    return F.mse_loss(eps_pred, eps)


def max_q_backup(q_next: Tensor) -> Tensor:
    """Diffusion-QL's max-Q backup: the best of N candidate next actions, per critic head.

    ``Q'(s', .) = max_{n=1..N} Q'(s', a'_n)``, with a'_n ~ pi_EMA(. | s', z). Apply it to each
    target head separately, then take the min of the two in ``td_target`` (Diffusion-QL uses N = 10;
    it is an option, off by default for locomotion).

    Args:
        q_next: target-critic values of the N candidates, (B, N).

    Returns:
        (B,).
    """
    if q_next.dim() != 2:
        raise ValueError(f"q_next must have shape (B, N), got {tuple(q_next.shape)}")
    return q_next.max(dim=1).values


def td_target(reward: Tensor, not_done: Tensor, q1_next: Tensor, q2_next: Tensor, gamma: float) -> Tensor:
    """Paper Eq. 6's regression target (clipped double-Q), with terminal masking.

    ``y = r + gamma * not_done * min(Q_bar1(s', a'), Q_bar2(s', a'))``,  a' ~ pi_EMA(. | s', z)

    The paper's Eq. 6 has no ``not_done``; it is the standard bootstrap mask of Diffusion-QL's
    code (Meta-World episodes only truncate, so ``not_done`` is 1 there). The target is detached:
    Eq. 6 regresses onto a stop-gradient target.

    Args:
        reward: r_t, (B,).
        not_done: 1 - terminal, (B,) float.
        q1_next: target critic 1 at (s', a'), (B,) (after ``max_q_backup`` if used).
        q2_next: target critic 2 at (s', a'), (B,).
        gamma: discount factor in [0, 1].

    Returns:
        y, (B,), without grad.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    _check_1d(reward=reward, not_done=not_done, q1_next=q1_next, q2_next=q2_next)
    _check_same_shape(reward=reward, not_done=not_done, q1_next=q1_next, q2_next=q2_next)
    return (reward + gamma * not_done * torch.minimum(q1_next, q2_next)).detach()


def critic_loss(q1: Tensor, q2: Tensor, target: Tensor) -> Tensor:
    """Paper Eq. 6 summed over the two heads: ``L_q = MSE(Q1(s, a), y) + MSE(Q2(s, a), y)``.

    Each term is the batch mean of the squared TD error; summing rather than averaging the heads
    matches Diffusion-QL (the heads share one optimiser, so this is L_q(phi_1) + L_q(phi_2)).

    Args:
        q1: Q_phi1(s_t, a_t), (B,).
        q2: Q_phi2(s_t, a_t), (B,).
        target: y from ``td_target``, (B,); detached again here in case it was not.

    Returns:
        Scalar loss.
    """
    _check_1d(q1=q1, q2=q2, target=target)
    _check_same_shape(q1=q1, q2=q2, target=target)
    target = target.detach()
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def actor_q_term(q_pi: Tensor, q_other: Tensor, eps: float = 1e-8) -> Tensor:
    """Paper Eq. 7 (the reward objective L_r), negated and normalised as in Diffusion-QL.

    ``q_term = -mean_B Q_i(s, a^0) / stopgrad(mean_B |Q_j(s, a^0)|)``, a^0 ~ pi_theta(. | s, z),
    with i in {1, 2} drawn at random by the caller (Algorithm 1, line 9) and j the other head.

    **Departure from the paper.** The literal Eq. 8 uses the raw ``-lambda * L_r = -lambda * E[Q]``.
    We follow Diffusion-QL's official code and divide by the (detached) mean magnitude of the other
    head's Q: Q scales with the reward scale and with 1 / (1 - gamma), which differ by orders of
    magnitude across tasks (Meta-World's dense rewards vs. sparse success), so a raw lambda would
    need retuning per task and drift as the critic learns. After normalisation the gradient
    direction is unchanged while its scale is O(1), so one eta works across tasks; because the
    denominator is detached, the gradient is ``-grad(mean Q_i) / mean|Q_j|``. ``eps`` only guards
    against a denominator of exactly zero.

    Args:
        q_pi: Q_i(s, a^0) for actions from the differentiable reverse chain, (B,).
        q_other: Q_j(s, a^0) of the other head on the same actions, (B,); used only for scale.
        eps: lower bound on the denominator.

    Returns:
        Scalar; minimising it maximises Q.
    """
    _check_1d(q_pi=q_pi, q_other=q_other)
    _check_same_shape(q_pi=q_pi, q_other=q_other)
    return -q_pi.mean() / q_other.abs().mean().detach().clamp_min(eps)


def actor_loss(bc_loss: Tensor, q_term: Tensor, eta: float) -> Tensor:
    """Paper Eq. 8: ``L = L_d - lambda * L_r``, written as ``L_d + eta * q_term``.

    ``q_term`` is the normalised negative Q of ``actor_q_term``, so ``eta`` plays the role of the
    paper's lambda up to the normalisation (Diffusion-QL: eta = 1 for locomotion medium-replay).

    Args:
        bc_loss: L_d from ``diffusion_loss``, scalar.
        q_term: from ``actor_q_term``, scalar.
        eta: trade-off weight (>= 0); 0 gives pure diffusion behaviour cloning.

    Returns:
        Scalar loss.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    return bc_loss + eta * q_term


def info_nce(u: Tensor, v: Tensor, temperature: float = 0.1) -> Tensor:
    """The symmetric InfoNCE loss (CLIP; T2DA's text–trajectory alignment) between paired rows.

    ``L = -1/(2T) sum_i [log softmax_j(S_ij)_i + log softmax_j(S_ji)_i]``, ``S_ij = cos(u_i, v_j) / tau``:
    row i of ``u`` (a task's text embedding) is pulled towards row i of ``v`` (the same task's trajectory
    embedding) and pushed from the other tasks' rows.

    Args:
        u: (T, D), T >= 2.
        v: (T, D).
        temperature: tau.

    Returns:
        Scalar loss; ``log T`` when the similarities carry no information.
    """
    _check_same_shape(u=u, v=v)
    if u.dim() != 2 or u.shape[0] < 2:
        raise ValueError(f"info_nce needs (T >= 2, D) rows, got {tuple(u.shape)}")
    logits = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T / temperature  # (T, T)
    labels = torch.arange(u.shape[0], device=u.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@dataclass(frozen=True)
class _Losses:
    """Common ``as_dict`` for the loss containers."""

    def as_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Detached values keyed ``"{prefix}/{field}"`` for logging.

        A prefix that already ends in ``/`` is used as is, and an empty prefix gives ``"{field}"``:
        ``as_dict("train/critic")`` and ``as_dict("train/critic/")`` both give ``"train/critic/loss"``.
        """
        sep = "/" if prefix and not prefix.endswith("/") else ""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {f"{prefix}{sep}{name}": v.detach() for name, v in values.items() if v is not None}


@dataclass(frozen=True)
class CriticLosses(_Losses):
    """Outputs of the critic step (Eq. 6).

    Attributes:
        loss: ``critic_loss``, scalar, the tensor to backpropagate.
        q1_mean: mean Q_phi1(s, a) over the batch.
        q2_mean: mean Q_phi2(s, a) over the batch.
        target_mean: mean TD target y over the batch.
    """

    loss: Tensor
    q1_mean: Tensor
    q2_mean: Tensor
    target_mean: Tensor


@dataclass(frozen=True)
class ActorLosses(_Losses):
    """Outputs of the actor step (Eq. 8).

    Attributes:
        loss: ``actor_loss``, scalar, the tensor to backpropagate.
        bc_loss: L_d (Eq. 5).
        q_loss: ``actor_q_term`` (normalised -L_r, Eq. 7).
        align_loss: ``info_nce`` of the text and trajectory embeddings; None unless ``model.align_weight``.
    """

    loss: Tensor
    bc_loss: Tensor
    q_loss: Tensor
    align_loss: Tensor | None = None


__all__ = [
    "ActorLosses",
    "CriticLosses",
    "actor_loss",
    "actor_q_term",
    "critic_loss",
    "diffusion_loss",
    "info_nce",
    "max_q_backup",
    "td_target",
]
