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

from llmdpd_pl.diffusion import GaussianDiffusion, guided_eps
from llmdpd_pl.errors import ConfigError, at_least, within
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
        conditioning: ``concat``: z enters the denoiser's first layer (the paper); ``film``: z also
            modulates every hidden layer (a lever, ``docs/decisions.md``).
        null_prompt: A learned "no prompt" embedding, for prompt dropout and classifier-free guidance.
        align_encoder: Keep a trajectory encoder even when only text conditions the policy: the
            text–trajectory alignment loss needs both encoders.
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
    conditioning: Literal["concat", "film"] = "concat"
    null_prompt: bool = False
    align_encoder: bool = False


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
            if self.uses_traj or (spec.align_encoder and self.uses_text)
            else None
        )
        self.cond_dim = spec.prompt_dim * (int(self.uses_text) + int(self.uses_traj))
        self.act_dim = spec.act_dim
        film = spec.conditioning == "film"
        self.denoiser = Denoiser(spec.obs_dim, spec.act_dim, self.cond_dim, spec.hidden_dim, film=film)
        self.diffusion = GaussianDiffusion(spec.n_diffusion_steps, spec.beta_schedule)
        self.null_z = nn.Parameter(torch.zeros(self.cond_dim)) if spec.null_prompt else None  # (C,)

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """The parameters by network (denoiser, text_head, traj_encoder), e.g. for gradient norms."""
        groups: dict[str, Iterable[nn.Parameter]] = {"denoiser": self.denoiser.parameters()}
        if self.null_z is not None:
            groups["null_prompt"] = [self.null_z]
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
        if self.traj_encoder is not None and self.uses_traj:
            parts.append(self.traj_encoder(traj_obs, traj_act))  # (T, D)
        if not parts:
            return text_embedding.new_zeros(text_embedding.shape[0], 0)
        return torch.cat(parts, dim=-1)  # (T, C)

    def prompt_pair(
        self, text_embedding: Tensor, traj_obs: Tensor, traj_act: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The text head's and the trajectory encoder's outputs, (T, D) each, for the alignment loss."""
        if self.text_head is None or self.traj_encoder is None:
            raise ValueError("prompt_pair needs both prompt encoders (model.align_weight > 0)")
        return self.text_head(text_embedding), self.traj_encoder(traj_obs, traj_act)

    def drop_prompts(self, z: Tensor, drop: Tensor) -> Tensor:
        """Prompt dropout: rows ``drop`` (B,) of z (B, C) replaced by the learned "no prompt" embedding."""
        if self.null_z is None:
            raise ValueError("drop_prompts needs a null_prompt policy (model.prompt_dropout > 0)")
        return torch.where(drop[:, None], self.null_z.expand_as(z), z)

    def state_term(self, obs: Tensor, z: Tensor, guidance: float = 1.0) -> Tensor:
        """The denoiser's state-and-prompt term (first layer ``W_sz [s, z] + b``, FiLM's gammas and betas):
        (B, S), (B, C) → (B, H'), H' the denoiser's ``state_dim``.

        It depends on neither a^k nor k, so a chain's K steps share it. With ``guidance`` w ≠ 1 it is the
        conditional term, then the unconditional one (z replaced by the "no prompt" embedding): (B, 2 H').
        """
        term = self.denoiser.state_term(obs, z)
        if guidance == 1.0:
            return term
        if self.null_z is None:
            raise ValueError("guidance needs a policy trained with prompt dropout (model.prompt_dropout > 0)")
        return torch.cat([term, self.denoiser.state_term(obs, self.null_z.expand_as(z))], dim=-1)

    def eps(self, a_k: Tensor, k: Tensor, obs: Tensor, z: Tensor) -> Tensor:
        """ε_θ(a^k, k, s, z): (B, A), (B,), (B, S), (B, C) → (B, A)."""
        return self.denoiser(a_k, k, self.state_term(obs, z))

    def sample(self, obs: Tensor, z: Tensor, noise: Tensor, guidance: float = 1.0) -> Tensor:
        """a⁰ ~ π_θ(· | s, z) through the full reverse chain (Eq. 4): (B, S), (B, C) → (B, A).

        ``noise`` is the chain's randomness, ``self.diffusion.chain_noise((B, A), generator)``,
        (K + 1, B, A). ``guidance`` w ≠ 1 samples with classifier-free guidance.
        """
        return self.sample_from_state_term(self.state_term(obs, z, guidance), noise, guidance)

    def sample_from_state_term(self, state_term: Tensor, noise: Tensor, guidance: float = 1.0) -> Tensor:
        """:meth:`sample` given the states' and prompts' :meth:`state_term`, shared by the K steps."""
        if guidance == 1.0:
            return self.diffusion.sample(lambda a_k, k: self.denoiser(a_k, k, state_term), noise)
        cond, uncond = state_term.chunk(2, dim=-1)
        return self.diffusion.sample(
            lambda a_k, k: guided_eps(self.denoiser(a_k, k, cond), self.denoiser(a_k, k, uncond), guidance),
            noise,
        )

    @torch.no_grad()
    def select_action(
        self,
        obs: Tensor,
        z: Tensor,
        generator: torch.Generator | None = None,
        critic: TwinCritic | None = None,
        critic_z: Tensor | None = None,
        n_candidates: int = 1,
        guidance: float = 1.0,
    ) -> Tensor:
        """Actions for normalised states: (N, S), (N, C) → (N, A) in [-1, 1].

        Without a critic, one reverse chain per state. With one (``q_softmax``, Diffusion-QL's evaluation),
        ``n_candidates`` chains per state, and candidate j is picked with probability
        ``softmax_j(min(Q1, Q2))``, the critics conditioned on ``critic_z`` (N, C). ``guidance`` w ≠ 1
        samples every chain with classifier-free guidance.
        """
        if critic is None:
            noise = self.diffusion.chain_noise((len(obs), self.act_dim), generator, obs.device)
            return maybe_compiled(PromptedPolicy.sample, self.compile_acting)(self, obs, z, noise, guidance)
        if critic_z is None:
            raise ValueError("select_action: critic_z is required with a critic")
        noise = self.diffusion.chain_noise((len(obs) * n_candidates, self.act_dim), generator, obs.device)
        score = maybe_compiled(scored_candidates, self.compile_acting)
        cand, q1, q2 = score(self, critic, obs, z, critic_z, noise, guidance)  # (N·n, A), (N, n), (N, n)
        pick = torch.multinomial(torch.softmax(torch.minimum(q1, q2), dim=1), 1, generator=generator)
        return cand.view(len(obs), n_candidates, -1)[torch.arange(len(obs), device=obs.device), pick[:, 0]]


def scored_candidates(
    policy: PromptedPolicy,
    critic: TwinCritic,
    obs: Tensor,
    z: Tensor,
    critic_z: Tensor,
    noise: Tensor,
    guidance: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """n actions per state from the policy's reverse chain, and both critic heads' values of each.

    (N, S), (N, C), (N, C), chain noise (K + 1, N·n, A) → candidates (N·n, A), Q1 and Q2 (N, n) each;
    row i·n + j is candidate j of state i. The denoiser's state-and-prompt term is computed once per state
    and shared by its n candidates. Used by ``q_softmax`` acting and by the critic objective's targets
    (n > 1: the max-Q backup). ``guidance``: classifier-free guidance weight w of the chains (acting only).
    """
    n = noise.shape[1] // obs.shape[0]
    if n < 1 or noise.shape[1] != n * obs.shape[0]:
        raise ValueError(
            f"noise must have n >= 1 rows per state, N·n rows for N = {obs.shape[0]} states; "
            f"got shape {tuple(noise.shape)}"
        )
    state_term = policy.state_term(obs, z, guidance).repeat_interleave(n, 0)  # (N·n, H')
    cand = policy.sample_from_state_term(state_term, noise, guidance)  # (N·n, A)
    q1, q2 = critic(obs.repeat_interleave(n, 0), cand, critic_z.repeat_interleave(n, 0))  # (N·n,) each
    return cand, q1.view(-1, n), q2.view(-1, n)


def check_levers(
    prompts: str, conditioning: str, prompt_dropout: float, guidance: float, align: float
) -> None:
    """A :class:`ConfigError` naming the ``model`` key of a lever out of range or unusable by ``prompts``."""
    within("model.prompt_dropout", prompt_dropout, 0.0, 1.0)
    at_least("model.guidance", guidance, 0.0)
    at_least("model.align_weight", align, 0.0)
    if prompts == "none" and conditioning == "film":
        raise ConfigError("model.conditioning", "needs a prompt (model.prompts is 'none')", conditioning)
    if prompts == "none" and prompt_dropout:
        raise ConfigError("model.prompt_dropout", "needs a prompt (model.prompts is 'none')", prompt_dropout)
    if align and prompts not in ("both", "text"):
        raise ConfigError("model.align_weight", f"needs a text prompt (model.prompts: {prompts!r})", align)
    if guidance != 1.0 and not prompt_dropout:
        raise ConfigError("model.guidance", "needs a policy trained with model.prompt_dropout > 0", guidance)


__all__ = ["PolicySpec", "PromptMode", "PromptedPolicy", "check_levers", "scored_candidates"]
