"""The actor π_θ(a | s, z_text, z_traj) together with its prompt encoders h_ψ and g_φ, and how it acts.

These are exactly the parameters that the actor loss (Eq. 8) trains and that the EMA averages, so they
live in one ``nn.Module``. The frozen LLM is not part of it: the policy reads cached LLM embeddings.

Shapes: N states, B rows, S state dim, A action dim, C conditioning dim (z_text and z_traj concatenated;
0 without prompts), H hidden width, K diffusion steps, n candidate actions per state, T tasks, E LLM
width, L prompt length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from llmdpd_pl.diffusion import GaussianDiffusion
from llmdpd_pl.networks import Denoiser, TwinCritic
from llmdpd_pl.prompt_encoders import TextHead, TrajectoryEncoder
from llmdpd_pl.utils import maybe_compiled

PromptMode = Literal["both", "text", "trajectory", "none"]


@dataclass(frozen=True)
class PolicySpec:
    """The policy's architecture (the ``model.*`` keys of the same names; their defaults are the module's).

    Attributes:
        obs_dim: S.
        act_dim: A.
        text_embed_dim: E, width of the frozen LLM's pooled embedding.
        traj_prompt_len: L, time steps of a trajectory prompt.
        prompts: Which prompts condition the policy (paper Table 3 ablations).
        prompt_dim: Width of z_text and of z_traj each.
        n_diffusion_steps: K.
        beta_schedule: Noise schedule.
        hidden_dim: Width of the denoiser's hidden layers.
        traj_d_model: Width of the trajectory transformer.
        traj_layers: Layers of the trajectory transformer.
        traj_heads: Attention heads of the trajectory transformer.
    """

    obs_dim: int
    act_dim: int
    text_embed_dim: int
    traj_prompt_len: int
    prompts: PromptMode
    prompt_dim: int
    n_diffusion_steps: int
    beta_schedule: Literal["vp", "linear"]
    hidden_dim: int
    traj_d_model: int
    traj_layers: int
    traj_heads: int


class PromptedPolicy(nn.Module):
    """Context-aware conditional policy diffusion (paper §3.2) with its prompt encoders (§3.1).

    Args:
        spec: The architecture.
        compile: ``torch.compile`` the reverse chain and the candidates' scoring of :meth:`select_action`.
    """

    def __init__(self, spec: PolicySpec, compile: bool = False) -> None:
        super().__init__()
        self.spec, self.compile_acting = spec, compile
        self.uses_text = spec.prompts in ("both", "text")
        self.uses_traj = spec.prompts in ("both", "trajectory")
        self.text_head = TextHead(spec.text_embed_dim, spec.prompt_dim) if self.uses_text else None
        self.traj_encoder = (
            TrajectoryEncoder(
                spec.obs_dim,
                spec.act_dim,
                spec.prompt_dim,
                spec.traj_prompt_len,
                spec.traj_d_model,
                spec.traj_layers,
                spec.traj_heads,
            )
            if self.uses_traj
            else None
        )
        self.cond_dim = spec.prompt_dim * (int(self.uses_text) + int(self.uses_traj))
        self.act_dim = spec.act_dim
        self.denoiser = Denoiser(spec.obs_dim, spec.act_dim, self.cond_dim, spec.hidden_dim)
        self.diffusion = GaussianDiffusion(spec.n_diffusion_steps, spec.beta_schedule)

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """The parameters by network (denoiser, text_head, traj_encoder), e.g. for gradient norms."""
        groups: dict[str, Iterable[nn.Parameter]] = {"denoiser": self.denoiser.parameters()}
        if self.text_head is not None:
            groups["text_head"] = self.text_head.parameters()
        if self.traj_encoder is not None:
            groups["traj_encoder"] = self.traj_encoder.parameters()
        return groups

    def encode_prompts(self, text_embedding: Tensor, traj_obs: Tensor, traj_act: Tensor) -> Tensor:
        """z = [h_ψ(M(z_text)), g_φ(z_τ)] (Eq. 1 and 3), once per task.

        Args:
            text_embedding: (T, E) cached LLM embeddings.
            traj_obs: (T, L, S) normalised prompt-trajectory states.
            traj_act: (T, L, A) prompt-trajectory actions.

        Returns:
            (T, C) conditioning, C = ``cond_dim`` (0 when no prompt is used).
        """
        parts = []
        if self.text_head is not None:
            parts.append(self.text_head(text_embedding))  # (T, D)
        if self.traj_encoder is not None:
            parts.append(self.traj_encoder(traj_obs, traj_act))  # (T, D)
        if not parts:
            return text_embedding.new_zeros(text_embedding.shape[0], 0)
        return torch.cat(parts, dim=-1)  # (T, C)

    def state_term(self, obs: Tensor, z: Tensor) -> Tensor:
        """The denoiser's first-layer state-and-prompt term ``W_sz [s, z] + b``: (B, S), (B, C) → (B, H).

        It depends on neither a^k nor k, so a chain's K steps share it.
        """
        return self.denoiser.state_term(obs, z)

    def eps(self, a_k: Tensor, k: Tensor, obs: Tensor, z: Tensor) -> Tensor:
        """ε_θ(a^k, k, s, z): (B, A), (B,), (B, S), (B, C) → (B, A)."""
        return self.denoiser(a_k, k, self.state_term(obs, z))

    def sample(self, obs: Tensor, z: Tensor, noise: Tensor) -> Tensor:
        """a⁰ ~ π_θ(· | s, z) through the full reverse chain (Eq. 4): (B, S), (B, C) → (B, A).

        ``noise`` is the chain's randomness, ``self.diffusion.chain_noise((B, A), generator)``,
        (K + 1, B, A).
        """
        return self.sample_from_state_term(self.state_term(obs, z), noise)

    def sample_from_state_term(self, state_term: Tensor, noise: Tensor) -> Tensor:
        """:meth:`sample` given the states' and prompts' :meth:`state_term` (B, H), shared by the K steps."""
        return self.diffusion.sample(lambda a_k, k: self.denoiser(a_k, k, state_term), noise)

    @torch.no_grad()
    def select_action(
        self,
        obs: Tensor,
        z: Tensor,
        generator: torch.Generator | None = None,
        critic: TwinCritic | None = None,
        critic_z: Tensor | None = None,
        n_candidates: int = 1,
    ) -> Tensor:
        """Actions for normalised states: (N, S), (N, C) → (N, A) in [-1, 1].

        Without a critic, one reverse chain per state. With one (``q_softmax``, Diffusion-QL's evaluation),
        ``n_candidates`` chains per state, and candidate j is picked with probability
        ``softmax_j(min(Q1, Q2))``, the critics conditioned on ``critic_z`` (N, C).
        """
        if critic is None:
            noise = self.diffusion.chain_noise((len(obs), self.act_dim), generator, obs.device)
            return maybe_compiled(PromptedPolicy.sample, self.compile_acting)(self, obs, z, noise)
        if critic_z is None:
            raise ValueError("select_action: critic_z is required with a critic")
        noise = self.diffusion.chain_noise((len(obs) * n_candidates, self.act_dim), generator, obs.device)
        score = maybe_compiled(scored_candidates, self.compile_acting)
        cand, q1, q2 = score(self, critic, obs, z, critic_z, noise)  # (N·n, A), (N, n), (N, n)
        pick = torch.multinomial(torch.softmax(torch.minimum(q1, q2), dim=1), 1, generator=generator)
        return cand.view(len(obs), n_candidates, -1)[torch.arange(len(obs), device=obs.device), pick[:, 0]]


def scored_candidates(
    policy: PromptedPolicy, critic: TwinCritic, obs: Tensor, z: Tensor, critic_z: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """n actions per state from the policy's reverse chain, and both critic heads' values of each.

    (N, S), (N, C), (N, C), chain noise (K + 1, N·n, A) → candidates (N·n, A), Q1 and Q2 (N, n) each;
    row i·n + j is candidate j of state i. The denoiser's state-and-prompt term is computed once per state
    and shared by its n candidates. Used by ``q_softmax`` acting and by the critic objective's targets
    (n > 1: the max-Q backup).
    """
    n = noise.shape[1] // obs.shape[0]
    if n < 1 or noise.shape[1] != n * obs.shape[0]:
        raise ValueError(
            f"noise must have n >= 1 rows per state, N·n rows for N = {obs.shape[0]} states; "
            f"got shape {tuple(noise.shape)}"
        )
    state_term = policy.state_term(obs, z).repeat_interleave(n, 0)  # (N·n, H)
    cand = policy.sample_from_state_term(state_term, noise)  # (N·n, A)
    q1, q2 = critic(obs.repeat_interleave(n, 0), cand, critic_z.repeat_interleave(n, 0))  # (N·n,) each
    return cand, q1.view(-1, n), q2.view(-1, n)


__all__ = ["PolicySpec", "PromptMode", "PromptedPolicy", "scored_candidates"]
