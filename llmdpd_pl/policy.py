"""The actor π_θ(a | s, z_text, z_traj) together with its prompt encoders h_ψ and g_φ.

These are exactly the parameters that the actor loss (Eq. 8) trains and that the EMA averages, so they
live in one ``nn.Module``. The frozen LLM is not part of it: the policy reads cached LLM embeddings.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from llmdpd_pl.diffusion import GaussianDiffusion
from llmdpd_pl.networks import Denoiser
from llmdpd_pl.prompt_encoders import TextHead, TrajectoryEncoder

PromptMode = Literal["both", "text", "trajectory", "none"]


class PromptedPolicy(nn.Module):
    """Context-aware conditional policy diffusion (paper §3.2) with its prompt encoders (§3.1).

    Args:
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

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        text_embed_dim: int,
        traj_prompt_len: int,
        prompts: PromptMode = "both",
        prompt_dim: int = 64,
        n_diffusion_steps: int = 5,
        beta_schedule: Literal["vp", "linear"] = "vp",
        hidden_dim: int = 256,
        traj_d_model: int = 128,
        traj_layers: int = 2,
        traj_heads: int = 2,
    ) -> None:
        super().__init__()
        self.uses_text = prompts in ("both", "text")
        self.uses_traj = prompts in ("both", "trajectory")
        self.text_head = TextHead(text_embed_dim, prompt_dim) if self.uses_text else None
        self.traj_encoder = (
            TrajectoryEncoder(
                obs_dim, act_dim, prompt_dim, traj_prompt_len, traj_d_model, traj_layers, traj_heads
            )
            if self.uses_traj
            else None
        )
        self.cond_dim = prompt_dim * (int(self.uses_text) + int(self.uses_traj))
        self.act_dim = act_dim
        self.denoiser = Denoiser(obs_dim, act_dim, self.cond_dim, hidden_dim)
        self.diffusion = GaussianDiffusion(n_diffusion_steps, beta_schedule)

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

    def context(self, obs: Tensor, cond: Tensor) -> Tensor:
        """The denoiser's state-and-prompt part ``W_sz [s, z] + b``: (B, S), (B, C) → (B, H).

        It depends on neither a^k nor k, so every denoiser pass on the same states and prompts shares it:
        a chain's K steps, and Eq. 5's pass in the actor objective.
        """
        return self.denoiser.context(obs, cond)

    def eps(self, a_k: Tensor, k: Tensor, context: Tensor) -> Tensor:
        """ε_θ(a^k, k, s, z): (B, A), (B,), :meth:`context` (B, H) → (B, A)."""
        return self.denoiser(a_k, k, context)

    def sample(self, obs: Tensor, cond: Tensor, noise: Tensor) -> Tensor:
        """a⁰ ~ π_θ(· | s, z) through the full reverse chain (Eq. 4): (B, S), (B, C) → (B, A).

        ``noise`` is the chain's randomness, ``self.diffusion.chain_noise((B, A), generator)``,
        (K + 1, B, A).
        """
        return self.sample_from_context(self.context(obs, cond), noise)

    def sample_from_context(self, context: Tensor, noise: Tensor) -> Tensor:
        """:meth:`sample` given the states' and prompts' :meth:`context` (B, H), shared by the K steps."""
        return self.diffusion.sample(lambda a_k, k: self.denoiser(a_k, k, context), noise)
