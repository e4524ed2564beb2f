"""The two objectives of one LLMDPD update (paper Algorithm 1), and the scoring of candidate actions that
the critic objective's targets and ``q_softmax`` acting share, as pure functions of networks and tensors.

Every random draw is an argument: the module draws them up front with the update's generator. Each
objective is therefore one function that ``torch.compile`` can capture whole, forward and backward
(``LLMDPDModule(compile=True)``): its ~6 denoiser passes, the critics and the losses then run as a
few generated kernels instead of about a thousand small eager ops.

Shapes: B batch rows, S state dim, A action dim, C conditioning dim, H hidden width, K diffusion steps,
n candidate actions per state (the max-Q backup's, 1 without it), T tasks, E LLM width, L prompt length.

``prompts`` is one prompt per seen task, ``(text (T, E), traj_obs (T, L, S) normalised, traj_act (T, L, A))``,
and ``task_id`` (B,) maps each row to its task: each task's prompts are encoded once, then gathered. The
online policy encodes them once per update, ``z = policy.encode_prompts(*prompts)`` (T, C), and both
objectives share that z: the critics read it detached, the actor backpropagates through it to ψ and φ.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.policy import PromptedPolicy

Prompts = tuple[Tensor, Tensor, Tensor]
"""(text embeddings (T, E), normalised trajectory states (T, L, S), trajectory actions (T, L, A))."""


def scored_candidates(
    policy: PromptedPolicy, critic: TwinCritic, obs: Tensor, cond: Tensor, critic_cond: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """n actions per state from the policy's reverse chain, and both critic heads' values of each.

    (N, S), (N, C), (N, C), chain noise (K + 1, N·n, A) → candidates (N·n, A), Q1 and Q2 (N, n) each;
    row i·n + j is candidate j of state i. The denoiser's and the critics' state-and-prompt parts
    (``PromptedPolicy.context``, ``TwinCritic.context``) are computed once per state and shared by its
    n candidates. Used by acting (``q_softmax``) and by the max-Q backup.
    """
    n = noise.shape[1] // obs.shape[0]
    if n < 1 or noise.shape[1] != n * obs.shape[0]:
        raise ValueError(
            f"noise must have n >= 1 rows per state, N·n rows for N = {obs.shape[0]} states; "
            f"got shape {tuple(noise.shape)}"
        )
    context = policy.context(obs, cond).repeat_interleave(n, 0)  # (N·n, H)
    cand = policy.sample_from_context(context, noise)  # (N·n, A)
    q1, q2 = critic.from_context(cand, critic.context(obs, critic_cond).repeat_interleave(n, 1))  # (N·n,)
    return cand, q1.view(-1, n), q2.view(-1, n)


def critic_objective(
    critic: TwinCritic,
    critic_target: TwinCritic,
    ema: PromptedPolicy,
    z: Tensor,
    ema_z: Tensor,
    task_id: Tensor,
    obs: Tensor,
    action: Tensor,
    reward: Tensor,
    not_done: Tensor,
    next_obs: Tensor,
    target_noise: Tensor,
    gamma: float,
) -> CriticLosses:
    """Eq. 6 with a' ~ π_EMA(· | s', z_EMA) from the EMA actor's full reverse chain (Diffusion-QL).

    The critics' task context is the online policy's z, without gradient: the prompt encoders are
    trained by the actor loss only (Algorithm 1). The EMA actor draws a' conditioned on its own
    embedding of the same prompts, ema_z.

    Args:
        critic: Q_φ1, Q_φ2.
        critic_target: Q_φ1', Q_φ2'.
        ema: the EMA actor, which draws a'.
        z: the online policy's embedding of the update's prompts, (T, C): the critics' context
            (detached here).
        ema_z: the EMA actor's embedding of the same prompts, (T, C).
        task_id: task of each row, (B,).
        obs: normalised s, (B, S).
        action: dataset a, (B, A).
        reward: r, (B,).
        not_done: 1 − terminal, (B,).
        next_obs: normalised s', (B, S).
        target_noise: chain noise of the n next actions per row, (K + 1, B·n, A): n > 1 is the max-Q
            backup (``max_q_backup``), n = 1 takes the single a'.
        gamma: discount γ.

    Returns:
        The critic loss (to backpropagate) and its statistics.
    """
    with torch.no_grad():
        cond = z.detach()[task_id]  # (B, C)
        ema_cond = ema_z[task_id]  # (B, C)
        _, q1n, q2n = scored_candidates(ema, critic_target, next_obs, ema_cond, cond, target_noise)  # (B, n)
        target = td_target(reward, not_done, max_q_backup(q1n), max_q_backup(q2n), gamma)  # (B,)
    q1, q2 = critic(obs, action, cond)
    return CriticLosses(critic_loss(q1, q2, target), q1.detach().mean(), q2.detach().mean(), target.mean())


def actor_objective(
    policy: PromptedPolicy,
    critic: TwinCritic,
    z: Tensor,
    task_id: Tensor,
    obs: Tensor,
    a_k: Tensor,
    k: Tensor,
    eps: Tensor,
    chain_noise: Tensor,
    eta: float,
    pick_first: Tensor,
) -> tuple[ActorLosses, Tensor]:
    """Eq. 5 + η · normalised Eq. 7 = Eq. 8, differentiable in θ and, through z, in ψ and φ.

    The caller freezes the critic (``requires_grad_(False)``): the Q term's gradient reaches the actions
    and, through the reverse chain, the policy, but no critic parameter.

    Args:
        policy: the online actor π_θ.
        critic: Q_φ1, Q_φ2, frozen.
        z: the online policy's prompt embeddings, (T, C), with their graph: the loss's gradient
            reaches ψ and φ through them.
        task_id: task of each row, (B,).
        obs: normalised s, (B, S).
        a_k: noised dataset actions of Eq. 5, (B, A) (``GaussianDiffusion.loss_inputs``).
        k: their diffusion steps, (B,).
        eps: the noise Eq. 5 regresses on, (B, A).
        chain_noise: noise of the reverse chain that samples a⁰, (K + 1, B, A).
        eta: λ of Eq. 8 (weight of the normalised Q term).
        pick_first: bool, (): the Q term uses Q_φ1 (normalised by |Q_φ2|) if True, else the reverse
            (Algorithm 1). A tensor, so that both draws run the same compiled graph.

    Returns:
        The losses, and the sampled a⁰ detached, (B, A).
    """
    cond = z[task_id]  # (B, C)
    context = policy.context(obs, cond)  # (B, H), shared by Eq. 5's pass and the chain's K steps
    bc = diffusion_loss(policy.eps(a_k, k, context), eps)
    a_new = policy.sample_from_context(context, chain_noise)  # (B, A), differentiable through the chain
    q1, q2 = critic(obs, a_new, cond.detach())
    q_term = torch.where(pick_first, actor_q_term(q1, q2), actor_q_term(q2, q1))
    return ActorLosses(actor_loss(bc, q_term, eta), bc, q_term), a_new.detach()


__all__ = ["Prompts", "actor_objective", "critic_objective", "scored_candidates"]
