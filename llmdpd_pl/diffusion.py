"""Gaussian diffusion over actions (DDPM, Ho et al. 2020), as used by Diffusion-QL and LLMDPD.

The conditional policy pi_theta(a | s, z_text, z_traj) of the paper (Section 3.2) is a K-step
denoising chain. This module holds the noise schedule and the four DDPM operations on it; it knows
nothing about states or prompts: the caller passes an ``eps_model(a_k, k)`` closure that has the
conditioning baked in.

Notation (paper Eq. 4-5, 0-based step index as in Diffusion-QL's code):

* ``k`` is a LongTensor of shape (B,) with values in [0, K). ``k = 0`` is the *least* noisy step:
  index ``k`` here is the paper's step ``k + 1``, so ``alphas_cumprod[k]`` is the paper's
  ``alpha_bar_{k+1}``.
* ``a0`` is a clean action, ``a_k`` the noisy action at step ``k``; both have shape (B, A).
* beta_k is the variance schedule, alpha_k = 1 - beta_k, alpha_bar_k = prod_{i<=k} alpha_i.

The schedule is computed once in float64 and stored as float32 buffers (non-persistent: it is a
pure function of the constructor arguments, so it is rebuilt on load and never goes stale in a
checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor, nn

from llmdpd_pl.schedules import ScheduleName, check_n_steps, linear_beta_schedule, vp_beta_schedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""``eps_model(a_k (B, A), k (B,) long) -> eps (B, A)``; the caller closes over state and prompts."""


def extract(coef: Tensor, k: Tensor, x_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather per-sample schedule values and reshape them to broadcast against ``x``.

    Args:
        coef: schedule tensor of shape (K,).
        k: step indices, LongTensor of shape (B,).
        x_shape: shape of the tensor the result multiplies, (B, ...).

    Returns:
        Tensor of shape (B, 1, ..., 1) with ``len(x_shape)`` dimensions.
    """
    out = coef.gather(0, k)  # (B,)
    return out.reshape(k.shape[0], *((1,) * (len(x_shape) - 1)))


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``eps~ = eps(a_k, k, s, null) + w (eps(a_k, k, s, z)
    - eps(a_k, k, s, null))``.

    w = 1 is the conditional prediction, w = 0 the unconditional one, w > 1 extrapolates away from the
    unconditional. (B, A), (B, A) → (B, A).
    """
    return torch.lerp(eps_uncond, eps_cond, w)


class GaussianDiffusion(nn.Module):
    """DDPM forward/reverse process over actions with x̂₀ clipping (Diffusion-QL's ``Diffusion``).

    The module owns no learnable parameters: the noise predictor eps_theta is passed to
    ``p_sample``/``sample`` as a closure, so the same schedule serves the online actor, the EMA
    actor, and any conditioning.

    Args:
        n_steps: number of diffusion steps K (Diffusion-QL: 5).
        schedule: noise schedule; ``"vp"`` (Diffusion-QL's default, beta_min 0.1, beta_max 10)
            or ``"linear"`` (DDPM's 1e-4 to 2e-2; only meaningful for large K).
        max_action: actions live in [-max_action, max_action]; the predicted clean action is
            clipped to this box at every reverse step, and so is the final sample.

    Raises:
        ValueError: on ``n_steps < 1``, an unknown ``schedule`` or ``max_action <= 0``.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, n_steps: int = 5, schedule: ScheduleName = "vp", max_action: float = 1.0) -> None:
        super().__init__()
        check_n_steps(n_steps)
        if schedule not in get_args(ScheduleName):
            raise ValueError(f"schedule must be one of {get_args(ScheduleName)}, got {schedule!r}")
        if not max_action > 0:
            raise ValueError(f"max_action must be > 0, got {max_action!r}")
        self.n_steps = int(n_steps)
        self.schedule = schedule
        self.max_action = float(max_action)

        # Everything below in float64, cast to float32 once when registered.
        betas = vp_beta_schedule(n_steps) if schedule == "vp" else linear_beta_schedule(n_steps)  # (K,)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_k
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(a_{k-1} | a_k, a_0) = N(coef1 * a_0 + coef2 * a_k, posterior_variance)  (DDPM Eq. 6-7)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # The variance is 0 at k = 0 (no noise is added there); clamp before the log.
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return f"n_steps={self.n_steps}, schedule={self.schedule!r}, max_action={self.max_action}"

    # ----------------------------------------------------------------------------- forward process
    def q_sample(self, a0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """Forward process q(a_k | a_0), the noising inside paper Eq. 5.

        ``a_k = sqrt(alpha_bar_k) * a0 + sqrt(1 - alpha_bar_k) * eps``

        Args:
            a0: clean actions, (B, A).
            k: step indices, LongTensor (B,) in [0, K).
            noise: eps ~ N(0, I), (B, A).

        Returns:
            a_k, (B, A).
        """
        return (
            extract(self.sqrt_alphas_cumprod, k, a0.shape) * a0
            + extract(self.sqrt_one_minus_alphas_cumprod, k, a0.shape) * noise
        )

    def predict_start_from_noise(self, a_k: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        """Invert ``q_sample`` for a given noise: ``a0 = a_k / sqrt(ab_k) - sqrt(1/ab_k - 1) * eps``.

        Args:
            a_k: noisy actions, (B, A).
            k: step indices, LongTensor (B,).
            eps: (predicted) noise, (B, A).

        Returns:
            a0_hat, (B, A).
        """
        return (
            extract(self.sqrt_recip_alphas_cumprod, k, a_k.shape) * a_k
            - extract(self.sqrt_recipm1_alphas_cumprod, k, a_k.shape) * eps
        )

    def q_posterior(self, a0: Tensor, a_k: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior q(a_{k-1} | a_k, a_0) = N(mean, exp(log_variance)) (DDPM Eq. 6-7).

        ``mean = coef1_k * a0 + coef2_k * a_k`` with ``coef1_k = beta_k sqrt(ab_{k-1}) / (1 - ab_k)``,
        ``coef2_k = (1 - ab_{k-1}) sqrt(alpha_k) / (1 - ab_k)``
        and ``variance = beta_k (1 - ab_{k-1}) / (1 - ab_k)``. Substituting
        ``a0 = predict_start_from_noise(a_k, k, eps)`` gives exactly the mean of paper Eq. 4.

        Args:
            a0: (predicted) clean actions, (B, A).
            a_k: noisy actions, (B, A).
            k: step indices, LongTensor (B,).

        Returns:
            ``(mean (B, A), log_variance (B, 1))``; the log variance is clamped at 1e-20 before
            the log (it is exactly 0 at k = 0).
        """
        mean = (
            extract(self.posterior_mean_coef1, k, a_k.shape) * a0
            + extract(self.posterior_mean_coef2, k, a_k.shape) * a_k
        )
        log_variance = extract(self.posterior_log_variance_clipped, k, a_k.shape)
        return mean, log_variance

    # ----------------------------------------------------------------------------- reverse process
    def p_sample(self, eps_model: EpsModel, a_k: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """One reverse step a_k -> a_{k-1} ~ p_theta(a_{k-1} | a_k, s, z) (paper Eq. 4, x̂₀ clipped).

        Args:
            eps_model: ``eps_model(a_k, k) -> eps (B, A)``, conditioning closed over.
            a_k: current noisy actions, (B, A).
            k: step indices, LongTensor (B,).
            noise: standard normal noise for this step, (B, A). Ignored where ``k == 0``.

        Returns:
            a_{k-1}, (B, A). Differentiable with respect to ``eps_model``'s parameters.
        """
        # 1. Predict the noise: eps_theta(a_k, s, z, k).
        eps = eps_model(a_k, k)  # (B, A)
        # 2. Predicted clean action (inverse of the forward process, Eq. 5's q_sample), clipped to
        #    the action box. Without clipping this step and 3. reduce to Eq. 4's mu_theta.
        a0_hat = self.predict_start_from_noise(a_k, k, eps).clamp(-self.max_action, self.max_action)
        # 3. Posterior mean and variance of q(a_{k-1} | a_k, a0_hat): mu_theta and sigma_k^2 of Eq. 4.
        mean, log_variance = self.q_posterior(a0_hat, a_k, k)  # (B, A), (B, 1)
        # 4. a_{k-1} = mu_theta + sigma_k * z, with no noise at the final step (k == 0).
        nonzero = (k != 0).to(a_k.dtype).reshape(-1, *((1,) * (a_k.dim() - 1)))  # (B, 1)
        return mean + nonzero * (0.5 * log_variance).exp() * noise

    def chain_noise(
        self,
        shape: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """All the randomness of one reverse chain, drawn at once: standard normal, (K + 1, B, A).

        ``noise[K]`` is a^K and ``noise[k]`` the noise added by step k (``noise[0]`` is unused: the last
        step adds none). Drawing it up front keeps :meth:`sample` a pure function of its inputs, which
        ``torch.compile`` can capture whole.

        Args:
            shape: ``(B, A)``.
            generator: optional RNG (on ``device``), for reproducible samples.
            device: defaults to the device of this module's buffers.
        """
        device = self.betas.device if device is None else torch.device(device)
        return torch.randn(
            (self.n_steps + 1, *shape), generator=generator, device=device, dtype=self.betas.dtype
        )

    def sample(self, eps_model: EpsModel, noise: Tensor) -> Tensor:
        """Draw a^0 ~ pi_theta by running the full reverse chain a^K ~ N(0, I), k = K-1, ..., 0.

        The chain is differentiable (no ``no_grad`` here): Diffusion-QL's actor loss (paper Eq. 7)
        backpropagates Q through all K steps. Wrap the call in ``torch.no_grad()`` when only
        samples are needed (target actions, evaluation).

        Args:
            eps_model: ``eps_model(a_k, k) -> eps (B, A)``, conditioning closed over.
            noise: :meth:`chain_noise`, (K + 1, B, A).

        Returns:
            a^0, (B, A), clamped to [-max_action, max_action].
        """
        if not isinstance(noise, Tensor) or noise.dim() != 3 or noise.shape[0] != self.n_steps + 1:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a (K + 1 = {self.n_steps + 1}, B, A) tensor, got {got}")
        a = noise[self.n_steps]  # (B, A), a^K
        for i in reversed(range(self.n_steps)):
            k = torch.full((a.shape[0],), i, device=a.device, dtype=torch.long)  # (B,)
            a = self.p_sample(eps_model, a, k, noise[i])  # (B, A); noise[0] is masked out at k = 0
        return a.clamp(-self.max_action, self.max_action)

    # ----------------------------------------------------------------------------- training inputs
    def loss_inputs(
        self, a0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw what paper Eq. 5 needs: k ~ U{0..K-1}, eps ~ N(0, I), and a_k = q_sample(a0, k, eps).

        Args:
            a0: clean (dataset) actions, (B, A).
            generator: optional RNG on ``a0.device``.

        Returns:
            ``(a_k (B, A), k (B,) long, noise (B, A))``; the Eq. 5 target is ``noise``.
        """
        k = torch.randint(0, self.n_steps, (a0.shape[0],), generator=generator, device=a0.device)  # (B,)
        noise = torch.randn(a0.shape, generator=generator, device=a0.device, dtype=a0.dtype)  # (B, A)
        return self.q_sample(a0, k, noise), k, noise


__all__ = [
    "EpsModel",
    "GaussianDiffusion",
    "ScheduleName",
    "extract",
    "guided_eps",
    "linear_beta_schedule",
    "vp_beta_schedule",
]
