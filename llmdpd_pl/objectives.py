"""The two objectives of one LLMDPD update (paper Algorithm 1), as pure functions of networks and tensors.

Every random draw is made up front (:func:`draw`) with the update's generator. Each objective is therefore
one function that ``torch.compile`` can capture whole, forward and backward (``LLMDPDModule(compile=True)``):
its ~6 denoiser passes, the critics and the losses then run as a few generated kernels instead of about a
thousand small eager ops.

Shapes: B batch rows, S state dim, A action dim, C conditioning dim, H hidden width, K diffusion steps,
n candidate actions per state (the max-Q backup's, 1 without it), T seen tasks.

``z`` (T, C) is the online policy's encoding of one prompt per seen task, and ``batch.task_id`` (B,) maps
each row to its task: each task's prompts are encoded once per update, then gathered. Both objectives
share that z: the critics read it detached, the actor backpropagates through it to ψ and φ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from llmdpd_pl.data.batches import Batch
from llmdpd_pl.diffusion import GaussianDiffusion
from llmdpd_pl.losses import (
    ActorLosses,
    CriticLosses,
    actor_loss,
    actor_q_term,
    critic_loss,
    diffusion_loss,
    info_nce,
    max_q_backup,
    td_target,
)
from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.policy import PromptedPolicy, scored_candidates


@dataclass(frozen=True)
class Draws:
    """The random draws of one update.

    Attributes:
        target_noise: chain noise of the n next actions per row, (K + 1, B·n, A): n > 1 is the max-Q
            backup, n = 1 takes the single a'.
        a_k: noised dataset actions of Eq. 5, (B, A).
        k: their diffusion steps, (B,).
        eps: the noise Eq. 5 regresses on, (B, A).
        chain_noise: noise of the reverse chain that samples the actor's a⁰, (K + 1, B, A).
        pick_first: bool, (): the Q term uses Q_φ1 (normalised by |Q_φ2|) if True, else the reverse
            (Algorithm 1). A tensor, so that both draws run the same compiled graph.
        drop: bool, (B,): rows whose prompt Eq. 5 replaces by the "no prompt" embedding (prompt dropout);
            None without prompt dropout.
    """

    target_noise: Tensor
    a_k: Tensor
    k: Tensor
    eps: Tensor
    chain_noise: Tensor
    pick_first: Tensor
    drop: Tensor | None = None


class UpdateStats(NamedTuple):
    """What one update measured: its losses, the gradient norms before clipping and the sampled a⁰ (B, A)."""

    critic: CriticLosses
    actor: ActorLosses
    critic_norms: dict[str, Tensor]
    actor_norms: dict[str, Tensor]
    actions: Tensor


def draw(
    diffusion: GaussianDiffusion,
    action: Tensor,
    n_backup: int,
    generator: torch.Generator,
    prompt_dropout: float = 0.0,
) -> Draws:
    """Every draw of one update from ``generator``, in a fixed order: dataset actions (B, A) → ``Draws``.

    ``prompt_dropout`` p > 0 drops each row's prompt with probability p, drawn last.
    """
    device, shape = action.device, (action.shape[0], action.shape[1])
    target_noise = diffusion.chain_noise((shape[0] * n_backup, shape[1]), generator, device)
    a_k, k, eps = diffusion.loss_inputs(action, generator)
    chain_noise = diffusion.chain_noise(shape, generator, device)
    pick_first = torch.rand((), generator=generator, device=device) < 0.5
    drop = (
        (torch.rand(shape[0], generator=generator, device=device) < prompt_dropout)
        if prompt_dropout
        else None
    )
    return Draws(target_noise, a_k, k, eps, chain_noise, pick_first, drop)


def critic_objective(
    critic: TwinCritic,
    critic_target: TwinCritic,
    ema: PromptedPolicy,
    batch: Batch,
    z: Tensor,
    ema_z: Tensor,
    draws: Draws,
    gamma: float,
) -> CriticLosses:
    """Eq. 6 with a' ~ π_EMA(· | s', z_EMA) from the EMA actor's full reverse chain (Diffusion-QL).

    The critics' task conditioning is the online policy's z, without gradient: the prompt encoders are
    trained by the actor loss only (Algorithm 1). The EMA actor draws a' conditioned on its own
    embedding of the same prompts, ema_z.

    Args:
        critic: Q_φ1, Q_φ2.
        critic_target: Q_φ1', Q_φ2'.
        ema: the EMA actor, which draws a'.
        batch: transitions with normalised ``obs`` and ``next_obs``, (B, …).
        z: the online policy's embedding of the update's prompts, (T, C) (detached here).
        ema_z: the EMA actor's embedding of the same prompts, (T, C).
        draws: the update's :class:`Draws` (``target_noise``).
        gamma: discount γ.

    Returns:
        The critic loss (to backpropagate) and its statistics.
    """
    with torch.no_grad():
        cond = z.detach()[batch.task_id]  # (B, C)
        ema_cond = ema_z[batch.task_id]  # (B, C)
        noise = draws.target_noise
        _, q1n, q2n = scored_candidates(ema, critic_target, batch.next_obs, ema_cond, cond, noise)  # (B, n)
        target = td_target(batch.reward, batch.not_done, max_q_backup(q1n), max_q_backup(q2n), gamma)  # (B,)
    q1, q2 = critic(batch.obs, batch.action, cond)
    return CriticLosses(critic_loss(q1, q2, target), q1.detach().mean(), q2.detach().mean(), target.mean())


def actor_objective(
    policy: PromptedPolicy,
    critic: TwinCritic,
    batch: Batch,
    z: Tensor,
    draws: Draws,
    eta: float,
    pair: tuple[Tensor, Tensor] | None = None,
    align_weight: float = 0.0,
) -> tuple[ActorLosses, Tensor]:
    """Eq. 5 + η · normalised Eq. 7 = Eq. 8, differentiable in θ and, through z, in ψ and φ.

    The caller freezes the critic (``requires_grad_(False)``): the Q term's gradient reaches the actions
    and, through the reverse chain, the policy, but no critic parameter.

    Two levers, off by default: with ``draws.drop``, Eq. 5 reads the "no prompt" embedding on the dropped
    rows (prompt dropout, for classifier-free guidance; the Q term keeps every prompt); with ``pair``, the
    text and trajectory embeddings of the seen tasks (T, D) each, ``align_weight · info_nce(pair)`` is
    added (text–trajectory alignment).

    Args:
        policy: the online actor π_θ.
        critic: Q_φ1, Q_φ2, frozen.
        batch: transitions with normalised ``obs``, (B, …).
        z: the online policy's prompt embeddings, (T, C), with their graph: the loss's gradient
            reaches ψ and φ through them.
        draws: the update's :class:`Draws` (``a_k``, ``k``, ``eps``, ``chain_noise``, ``pick_first``).
        eta: λ of Eq. 8 (weight of the normalised Q term).
        pair: the alignment loss's inputs, or None.
        align_weight: weight of the alignment loss.

    Returns:
        The losses, and the sampled a⁰ detached, (B, A).
    """
    cond = z[batch.task_id]  # (B, C)
    bc_cond = cond if draws.drop is None else policy.drop_prompts(cond, draws.drop)
    bc = diffusion_loss(policy.eps(draws.a_k, draws.k, batch.obs, bc_cond), draws.eps)
    a_new = policy.sample(batch.obs, cond, draws.chain_noise)  # (B, A), differentiable through the chain
    q1, q2 = critic(batch.obs, a_new, cond.detach())
    q_term = torch.where(draws.pick_first, actor_q_term(q1, q2), actor_q_term(q2, q1))
    loss = actor_loss(bc, q_term, eta)
    if pair is None:
        return ActorLosses(loss, bc, q_term), a_new.detach()
    align = info_nce(*pair)
    return ActorLosses(loss + align_weight * align, bc, q_term, align), a_new.detach()


__all__ = ["Draws", "UpdateStats", "actor_objective", "critic_objective", "draw"]
