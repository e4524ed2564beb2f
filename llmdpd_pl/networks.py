"""Networks of LLMDPD's actor and critics: the noise predictor eps_theta and the twin critics.

Shapes: B batch rows, S state dim, A action dim, C conditioning dim (z_text and z_traj
concatenated; 0 without prompts).

* ``Denoiser``          eps_theta(a_k, k, s, z)            (paper Eq. 4-5; Diffusion-QL's MLP)
* ``TwinCritic``        Q_phi1, Q_phi2 (s, a, z)           (paper Eq. 6-7), both heads in one batched matmul

The prompt encoders that produce z are in :mod:`llmdpd_pl.prompt_encoders`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmdpd_pl.layers import Mish, SinusoidalPosEmb, StackedLinear, check_last_dim, film, mlp


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def _conditioning(cond: Tensor | None, obs: Tensor, cond_dim: int) -> Tensor:
    """``cond`` checked against ``cond_dim``; ``None`` becomes a (B, 0) tensor when ``cond_dim == 0``."""
    if cond is None:
        if cond_dim:
            raise ValueError(f"cond is required when cond_dim={cond_dim}")
        cond = obs.new_zeros(obs.shape[0], 0)
    check_last_dim("cond", cond, cond_dim)
    return cond


class Denoiser(nn.Module):
    """The noise predictor eps_theta(a_k, s, z_text, z_traj, k) of paper Eq. 4-5 (Diffusion-QL's MLP).

    ``t = Linear(2d, d)(Mish(Linear(d, 2d)(SinusoidalPosEmb(d)(k))))`` with d = ``time_dim``, then
    ``concat(a_k, t, s, z) -> n_layers x (Linear hidden_dim, Mish) -> Linear A``.

    The first layer is evaluated in two parts, ``W [a_k, t, s, z] + b = W_at [a_k, t] + (W_sz [s, z] + b)``:
    the state-and-prompt part is the :meth:`state_term`, computed once per reverse chain and reused by its
    K steps, since s and z do not change along the chain. Same weights and same function as the single
    Linear; only the cost differs (``docs/performance.md``).

    With ``film``, z also modulates every hidden layer (FiLM, :func:`~llmdpd_pl.layers.film`): hidden layer
    l's pre-activation becomes ``(1 + gamma_l(z)) * h_l + beta_l(z)``, with ``[gamma_1..n, beta_1..n] =
    Linear(C, 2 n_layers H)(z)`` initialised to zero (the plain denoiser at the start). The gammas and betas
    depend on z only, so they travel with the state term: (B, H + 2 n_layers H).

    Args:
        obs_dim: state dimension S.
        act_dim: action dimension A.
        cond_dim: width C of the conditioning vector (z_text and z_traj concatenated); 0 for an
            unconditioned policy (the w/o-prompt ablation, or plain Diffusion-QL).
        hidden_dim: width of the hidden layers (Diffusion-QL: 256).
        time_dim: width of the step embedding (Diffusion-QL: 16).
        n_layers: number of hidden (Linear, Mish) layers (Diffusion-QL: 3).
        film: Modulate every hidden layer by z (needs ``cond_dim > 0``).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        cond_dim: int,
        hidden_dim: int = 256,
        time_dim: int = 16,
        n_layers: int = 3,
        film: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(obs_dim=obs_dim, act_dim=act_dim, cond_dim=cond_dim, hidden_dim=hidden_dim)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
        self.obs_dim, self.act_dim, self.cond_dim = obs_dim, act_dim, cond_dim
        self.hidden_dim, self.time_dim = hidden_dim, time_dim
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim),
            nn.Linear(time_dim, time_dim * 2),
            Mish(),
            nn.Linear(time_dim * 2, time_dim),
        )
        self.net = mlp(act_dim + time_dim + obs_dim + cond_dim, [hidden_dim] * n_layers, act_dim, Mish)
        if film and not cond_dim:
            raise ValueError("film needs a conditioning vector (cond_dim > 0)")
        self.modulation = nn.Linear(cond_dim, 2 * n_layers * hidden_dim) if film else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
        #: Width of :meth:`state_term`: H, and the FiLM gammas and betas with ``film``.
        self.state_dim = hidden_dim * (1 + 2 * n_layers) if film else hidden_dim

    @property
    def first_layer(self) -> nn.Linear:
        """``Linear(A + time_dim + S + C, hidden_dim)`` on ``concat(a_k, t, s, z)``."""
        return cast(nn.Linear, self.net[0])

    def state_term(self, obs: Tensor, cond: Tensor | None = None) -> Tensor:
        """The first layer's state-and-prompt term ``W_sz [s, z] + b``, shared by a chain's K steps.

        Args:
            obs: states, (B, S).
            cond: prompt embeddings, (B, C); ``None`` or a (B, 0) tensor when ``cond_dim == 0``.

        Returns:
            (B, ``state_dim``): (B, H), then with ``film`` the gammas and betas (B, 2 n_layers H).
        """
        check_last_dim("obs", obs, self.obs_dim)
        cond = _conditioning(cond, obs, self.cond_dim)
        first = self.first_layer
        w_sz = first.weight[:, self.act_dim + self.time_dim :]  # (H, S + C)
        term = F.linear(torch.cat([obs, cond], dim=-1), w_sz, first.bias)  # (B, H)
        return term if self.modulation is None else torch.cat([term, self.modulation(cond)], dim=-1)

    def forward(self, a_k: Tensor, k: Tensor, state_term: Tensor) -> Tensor:
        """Predict the noise in ``a_k``: ``eps_theta(a_k, k, s, z)``, given ``self.state_term(s, z)``.

        Args:
            a_k: noisy actions, (B, A).
            k: diffusion steps, LongTensor (B,).
            state_term: :meth:`state_term` of the states and prompts, (B, ``state_dim``).

        Returns:
            eps, (B, A).
        """
        check_last_dim("a_k", a_k, self.act_dim)
        check_last_dim("state_term", state_term, self.state_dim)
        t = self.time_mlp(k)  # (B, time_dim)
        w_at = self.first_layer.weight[:, : self.act_dim + self.time_dim]  # (H, A + time_dim)
        H, n = self.hidden_dim, len(self.net) // 2
        term = state_term if self.modulation is None else state_term[:, :H]
        mods = None if self.modulation is None else [m.chunk(n, -1) for m in state_term[:, H:].chunk(2, -1)]
        h = torch.addmm(term, torch.cat([a_k, t], dim=-1), w_at.T)  # (B, H), the first layer
        for i in range(1, len(self.net)):
            if mods is not None and i % 2:  # an activation: FiLM its hidden layer's pre-activation first
                h = film(h, mods[0][i // 2], mods[1][i // 2])  # gamma, beta of hidden layer i // 2
            h = self.net[i](h)
        return h  # (B, A)


class TwinCritic(nn.Module):
    """Two independent Q-networks Q_phi1, Q_phi2 (s, a, z) (paper Eq. 6), run as one batched network.

    Each head is ``concat(s, a, z) -> n_layers x (Linear hidden_dim, Mish) -> Linear 1``
    (Diffusion-QL's critic, plus the prompt conditioning). The heads share no parameters: layer l
    holds a (2, out, in) weight and runs both heads in one ``baddbmm``. ``layers[l].weight[h]`` is
    the ``nn.Linear`` weight of head h.

    Args:
        obs_dim: state dimension S.
        act_dim: action dimension A.
        cond_dim: conditioning width C (0 without prompts).
        hidden_dim: hidden width (Diffusion-QL: 256).
        n_layers: number of hidden layers (Diffusion-QL: 3).
    """

    n_heads = 2

    def __init__(
        self, obs_dim: int, act_dim: int, cond_dim: int, hidden_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        _check_dims(obs_dim=obs_dim, act_dim=act_dim, cond_dim=cond_dim)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
        self.obs_dim, self.act_dim, self.cond_dim = obs_dim, act_dim, cond_dim
        widths = [obs_dim + act_dim + cond_dim] + [hidden_dim] * n_layers + [1]
        self.layers = nn.ModuleList(
            StackedLinear(self.n_heads, w_in, w_out)
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.activation = Mish()

    def forward(self, obs: Tensor, act: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both heads' values.

        Args:
            obs: states, (B, S).
            act: actions, (B, A).
            cond: prompt embeddings, (B, C); ``None`` or (B, 0) when ``cond_dim == 0``.

        Returns:
            ``(q1 (B,), q2 (B,))``.
        """
        check_last_dim("obs", obs, self.obs_dim)
        check_last_dim("act", act, self.act_dim)
        cond = _conditioning(cond, obs, self.cond_dim)
        x = torch.cat([obs, act, cond], dim=-1)  # (B, S + A + C)
        return self._heads(self.first_layer(self._per_head(x)))

    @property
    def first_layer(self) -> StackedLinear:
        """Both heads' ``Linear(S + A + C, hidden_dim)`` on ``concat(s, a, z)``."""
        return cast(StackedLinear, self.layers[0])

    def _per_head(self, x: Tensor) -> Tensor:
        """The same input for both heads, without a copy: (B, D) → (2, B, D)."""
        return x.unsqueeze(0).expand(self.n_heads, *x.shape)

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The layers after the first, from its pre-activation (2, B, H): (q1 (B,), q2 (B,))."""
        for layer in self.layers[1:]:
            h = layer(self.activation(h))  # (2, B, hidden), then (2, B, 1)
        q = h.squeeze(-1)  # (2, B)
        return q[0], q[1]


__all__ = ["Denoiser", "TwinCritic"]
