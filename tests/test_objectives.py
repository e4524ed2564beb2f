"""Tests for llmdpd_pl.objectives: the critic and actor objectives against row-by-row references.

The objectives are pure functions of networks and tensors, so these tests build small real networks
(``PromptedPolicy`` with both prompt encoders, ``TwinCritic``) and random inputs, and recompute each
objective's result with the networks called one row (or one row's candidates) at a time. One slow test
runs the objectives and acting compiled (``compile=True``) against eager on a tiny module with the real
task bank of ``model_fixtures``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from llmdpd_pl.acting import act
from llmdpd_pl.data.batches import Batch
from llmdpd_pl.losses import actor_q_term, diffusion_loss
from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.objectives import Draws, actor_objective, critic_objective, draw
from llmdpd_pl.policy import PolicySpec, PromptedPolicy, scored_candidates
from llmdpd_pl.utils import maybe_compiled
from tests.model_fixtures import ModelData, bank_module, model_data, normalized, one_thread

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

# The same float32 computation on batches of different sizes (row-wise references): a few ulps.
ROW_TOL = 1e-5

B, S, A, E, L, T, K = 6, 5, 3, 8, 4, 2, 3
GAMMA = 0.9


def _nets(seed: int = 0) -> tuple[PromptedPolicy, TwinCritic, TwinCritic]:
    torch.manual_seed(seed)
    policy = PromptedPolicy(PolicySpec(S, A, E, L, "both", 4, K, "vp", 32, 16, 1, 2))
    critic = TwinCritic(S, A, policy.cond_dim, 32)
    target = copy.deepcopy(critic).requires_grad_(False)
    for p in target.parameters():  # a target that differs from the online critic
        p.add_(0.1 * torch.randn_like(p))
    return policy, critic, target


def _z(policy: PromptedPolicy, gen: torch.Generator) -> Tensor:
    """(T, C) prompt embeddings of random prompts, with their graph."""
    return policy.encode_prompts(
        torch.randn(T, E, generator=gen),
        torch.randn(T, L, S, generator=gen),
        torch.randn(T, L, A, generator=gen),
    )


def _cond(policy: PromptedPolicy, gen: torch.Generator) -> Tensor:
    """(T, C) unit-scale embeddings: the encoders' outputs at initialisation are too small to matter."""
    return torch.randn(T, policy.cond_dim, generator=gen)


def _inputs(gen: torch.Generator) -> Batch:
    """A batch of normalised states."""
    task_id = torch.randint(T, (B,), generator=gen)
    obs = torch.randn(B, S, generator=gen)
    action = torch.rand(B, A, generator=gen) * 2 - 1
    reward = torch.randn(B, generator=gen)
    not_done = (torch.rand(B, generator=gen) > 0.3).float()
    next_obs = torch.randn(B, S, generator=gen)
    return Batch(obs, action, reward, next_obs, not_done, task_id)


def _critic_draws(target_noise: Tensor) -> Draws:
    """Draws with only the critic objective's part set."""
    unused = torch.zeros(())
    return Draws(target_noise, unused, unused, unused, unused, torch.tensor(True))


def _actor_draws(gen: torch.Generator, x: Batch, policy: PromptedPolicy, pick_first: bool) -> Draws:
    """Draws with only the actor objective's part set, in the update's order."""
    a_k, k, eps = policy.diffusion.loss_inputs(x.action, gen)
    chain = policy.diffusion.chain_noise((B, A), gen)
    return Draws(torch.zeros(()), a_k, k, eps, chain, torch.tensor(pick_first))


def test_scored_candidates_are_n_chains_per_state_and_both_heads_values() -> None:
    """Row i·n + j is candidate j of state i, drawn with chain noise column i·n + j; Q1, Q2 are its values."""
    policy, critic, _ = _nets()
    N, n = 4, 3
    gen = torch.Generator().manual_seed(1)
    obs, cond, critic_cond = (torch.randn(N, d, generator=gen) for d in (S, policy.cond_dim, policy.cond_dim))
    noise = policy.diffusion.chain_noise((N * n, A), gen)
    with torch.no_grad():
        cand, q1, q2 = scored_candidates(policy, critic, obs, cond, critic_cond, noise)
        for i in range(N):
            rows = slice(i * n, (i + 1) * n)
            s, c = obs[i].expand(n, S), cond[i].expand(n, -1)
            want = policy.sample(s, c, noise[:, rows])  # (n, A)
            torch.testing.assert_close(cand[rows], want, atol=ROW_TOL, rtol=ROW_TOL)
            want_q1, want_q2 = critic(s, want, critic_cond[i].expand(n, -1))
            torch.testing.assert_close(q1[i], want_q1, atol=ROW_TOL, rtol=ROW_TOL)
            torch.testing.assert_close(q2[i], want_q2, atol=ROW_TOL, rtol=ROW_TOL)
    assert cand.shape == (N * n, A) and q1.shape == q2.shape == (N, n)
    for rows in (N * n + 1, N - 1):  # not a whole number of candidates per state
        with pytest.raises(ValueError, match="noise must have n >= 1 rows per state"):
            scored_candidates(policy, critic, obs, cond, critic_cond, torch.zeros(K + 1, rows, A))


@pytest.mark.parametrize("n_backup", [1, 3])
def test_critic_objective_is_eq6_with_the_max_q_backup_per_row(n_backup: int) -> None:
    """Row i's target: a' from chain-noise candidates i·n .. i·n + n − 1, each head's best of them (Eq. 6)."""
    policy, critic, target = _nets()
    ema = copy.deepcopy(policy).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    z, ema_z, x = _cond(policy, gen), _cond(policy, gen), _inputs(gen)
    noise = policy.diffusion.chain_noise((B * n_backup, A), gen)  # (K + 1, B·n, A)

    losses = critic_objective(critic, target, ema, x, z, ema_z, _critic_draws(noise), GAMMA)

    with torch.no_grad():
        y = torch.empty(B)
        for i in range(B):
            t = x.task_id[i]
            rows = slice(i * n_backup, (i + 1) * n_backup)
            s_next = x.next_obs[i].expand(n_backup, S)
            a_next = ema.sample(s_next, ema_z[t].expand(n_backup, -1), noise[:, rows])  # (n, A)
            q1n, q2n = target(s_next, a_next, z[t].expand(n_backup, -1))
            y[i] = x.reward[i] + GAMMA * x.not_done[i] * torch.minimum(q1n.max(), q2n.max())
    q1, q2 = critic(x.obs, x.action, z.detach()[x.task_id])
    torch.testing.assert_close(losses.target_mean, y.mean(), atol=ROW_TOL, rtol=ROW_TOL)
    torch.testing.assert_close(losses.loss, F.mse_loss(q1, y) + F.mse_loss(q2, y), atol=ROW_TOL, rtol=ROW_TOL)
    torch.testing.assert_close(losses.q1_mean, q1.mean())
    torch.testing.assert_close(losses.q2_mean, q2.mean())


def test_critic_objective_trains_the_critic_only() -> None:
    """The loss reaches every critic weight and nothing else: not z, the EMA actor or the target critic."""
    policy, critic, target = _nets()
    ema = copy.deepcopy(policy)  # left trainable: the objective itself must not build a graph into it
    gen = torch.Generator().manual_seed(2)
    z, ema_z, x = _z(policy, gen), _z(ema, gen), _inputs(gen)
    noise = policy.diffusion.chain_noise((B, A), gen)
    losses = critic_objective(critic, target, ema, x, z, ema_z.detach(), _critic_draws(noise), GAMMA)
    losses.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    assert all(p.grad is None for p in (*policy.parameters(), *ema.parameters(), *target.parameters()))


@pytest.mark.parametrize("pick_first", [True, False])
def test_actor_objective_is_eq8_with_the_drawn_head(pick_first: bool) -> None:
    """BC term = Eq. 5 on the given a_k, k, ε; Q term = Eq. 7 of head 1 (pick_first) or head 2 on a⁰."""
    policy, critic, _ = _nets()
    critic.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    z, x = _cond(policy, gen), _inputs(gen)
    d = _actor_draws(gen, x, policy, pick_first)
    eta = 0.7

    losses, a_new = actor_objective(policy, critic, x, z, d, eta)

    with torch.no_grad():
        cond = z[x.task_id]
        bc = diffusion_loss(policy.denoiser(d.a_k, d.k, policy.denoiser.state_term(x.obs, cond)), d.eps)
        a0 = torch.cat(
            [policy.sample(x.obs[i : i + 1], cond[i : i + 1], d.chain_noise[:, i : i + 1]) for i in range(B)]
        )
        q1, q2 = critic(x.obs, a0, cond)
        q_term = actor_q_term(q1, q2) if pick_first else actor_q_term(q2, q1)
    torch.testing.assert_close(a_new, a0, atol=ROW_TOL, rtol=ROW_TOL)
    torch.testing.assert_close(losses.bc_loss, bc, atol=ROW_TOL, rtol=ROW_TOL)
    torch.testing.assert_close(losses.q_loss, q_term, atol=ROW_TOL, rtol=ROW_TOL)
    torch.testing.assert_close(losses.loss, bc + eta * q_term, atol=ROW_TOL, rtol=ROW_TOL)
    assert not a_new.requires_grad


def test_actor_objective_trains_the_policy_and_prompt_encoders_not_the_critic() -> None:
    """Both terms reach θ, and through z ψ and φ; the frozen critic gets no gradient."""
    policy, critic, _ = _nets()
    critic.requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    x = _inputs(gen)
    d = _actor_draws(gen, x, policy, True)
    for eta, bc_weight in ((0.0, 1.0), (1.0, 0.0)):  # each term on its own
        policy.zero_grad(set_to_none=True)
        losses, _ = actor_objective(policy, critic, x, _z(policy, gen), d, eta)
        (bc_weight * losses.bc_loss + eta * losses.q_loss).backward()
        missing = [n for n, p in policy.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert missing == [], f"eta={eta}: no gradient in {missing}"
        assert all(p.grad is None for p in critic.parameters())


# ----------------------------------------------------------------------------- compiled against eager
@pytest.mark.slow
def test_compiled_objectives_match_eager(model_data: ModelData) -> None:
    """compile=True runs the same objectives and acting: same losses, gradients, actions, up to rounding."""
    module, dm = bank_module(model_data)
    assert dm.stream is not None
    raw = dm.stream.sample(0)
    batch = normalized(module, raw)
    seen = torch.arange(module.task_bank.n_seen)
    index = torch.zeros_like(seen)

    def losses_and_grads() -> tuple[list[Tensor], list[Tensor]]:
        module.zero_grad(set_to_none=True)
        compile_ = module.hparams["compile"]
        critic = maybe_compiled(critic_objective, compile_)
        actor = maybe_compiled(actor_objective, compile_)
        z, ema_z = module.encode_prompts(module.policy, seen, index), module.ema_prompt_embeddings(index)
        draws = draw(module.policy.diffusion, batch.action, 1, torch.Generator().manual_seed(0))
        c = critic(module.critic, module.critic_target, module.ema_policy, batch, z, ema_z, draws, 0.99)
        c.loss.backward()
        module.critic.requires_grad_(False)
        a, a_new = actor(module.policy, module.critic, batch, z, draws, module.hparams["eta"])
        a.loss.backward()
        module.critic.requires_grad_(True)
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        actions = []
        for selection in ("sample", "q_softmax"):
            module.hparams["action_selection"] = selection
            actions.append(act(module, raw.obs, raw.task_id, generator=torch.Generator().manual_seed(2)))
        return [z, ema_z, c.loss, c.target_mean, a.bc_loss, a.q_loss, a_new, *actions], grads

    eager_values, eager_grads = losses_and_grads()
    module.hparams["compile"] = module.ema_policy.compile_acting = True
    module.ema_updated()  # re-encode the EMA table through the compiled encoder too
    values, grads = losses_and_grads()
    assert len(grads) == len(eager_grads) > 0
    # Fused generated kernels vs eager ATen ops: float32 rounding of O(1) values through ~6 layers.
    for got, want in zip([*values, *grads], [*eager_values, *eager_grads], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
