"""Networks of LLMDPD: the noise predictor eps_theta, twin critics, and the two prompt encoders.

Shapes: B batch rows, S state dim, A action dim, C conditioning dim (z_text and z_traj
concatenated; 0 without prompts), T number of tasks, L prompt-trajectory length, E LLM width.

* ``Denoiser``          eps_theta(a_k, k, s, z)            (paper Eq. 4-5; Diffusion-QL's MLP)
* ``TwinCritic``        Q_phi1, Q_phi2 (s, a, z)           (paper Eq. 6-7), both heads in one batched matmul
* ``TextHead``          h_psi, the MLP on the frozen LLM    (paper Eq. 1, Section 4.1)
* ``TrajectoryEncoder`` g_phi, transformer + mean pool + MLP (paper Eq. 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_last_dim(name: str, x: Tensor, expected: int) -> None:
    if x.shape[-1] != expected:
        raise ValueError(f"{name} must have last dimension {expected}, got shape {tuple(x.shape)}")


def _conditioning(cond: Tensor | None, obs: Tensor, cond_dim: int) -> Tensor:
    """``cond`` checked against ``cond_dim``; ``None`` becomes a (B, 0) tensor when ``cond_dim == 0``."""
    if cond is None:
        if cond_dim:
            raise ValueError(f"cond is required when cond_dim={cond_dim}")
        cond = obs.new_zeros(obs.shape[0], 0)
    _check_last_dim("cond", cond, cond_dim)
    return cond


def mish(x: Tensor) -> Tensor:
    """Mish (Misra 2019), the activation of Diffusion-QL's MLPs, computed from one sigmoid.

    ``mish(x) = x tanh(softplus(x)) = x p / (2 - p)``, with ``s = sigmoid(x)`` and ``p = s (2 - s)``:
    ``e^softplus(x) = 1 + e^x = 1 / (1 - s)``, so ``tanh(softplus(x)) = (1 - (1 - s)^2) / (1 + (1 - s)^2)``.
    No intermediate overflows, and for x -> -inf, ``p ~ 2s`` keeps the relative accuracy of ``x e^x``.

    ``d mish / dx = t + x s (1 - t^2)`` with ``t = tanh(softplus(x)) = p / (2 - p)``.

    Same function as ``torch.nn.functional.mish`` (to float32 rounding), but 2.8x faster forward and
    backward on CPU, where PyTorch's kernel evaluates ``tanh`` and ``log1p`` (``benchmarks/NOTES.md``).

    Args:
        x: any shape.

    Returns:
        mish(x), the shape of ``x``.
    """
    return _Mish.apply(x)


class _Mish(torch.autograd.Function):
    """Autograd of :func:`mish`: saves ``x``, ``s`` and ``t``; the backward is the closed form above."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        p = torch.rsub(s, 2.0).mul_(s)  # s (2 - s)
        t = p.div_(torch.rsub(p, 2.0))  # tanh(softplus(x)) = p / (2 - p), in p's storage
        ctx.save_for_backward(x, s, t)
        return x * t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x, s, t = ctx.saved_tensors
        return torch.addcmul(t, x * s, torch.rsub(t.square(), 1.0)).mul_(grad)  # (t + x s (1 - t^2)) grad


class Mish(nn.Module):
    """:func:`mish` as a module (drop-in for ``torch.nn.Mish``; no parameters, same checkpoints)."""

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> the same shape."""
        return mish(x)


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of the diffusion step (DDPM / Diffusion-QL).

    ``emb = [sin(k * w_0..w_{h-1}), cos(k * w_0..w_{h-1})]``, ``w_j = 10000^(-j / (h - 1))``,
    ``h = dim // 2``.

    Args:
        dim: embedding width (even, >= 4).
    """

    freqs: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim must be even and >= 4, got {dim!r}")
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)  # (dim/2,)

    def forward(self, k: Tensor) -> Tensor:
        """Embed steps ``k`` (B,) (any numeric dtype) into (B, dim)."""
        arg = k.to(self.freqs.dtype)[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat((arg.sin(), arg.cos()), dim=-1)  # (B, dim)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: type[nn.Module]) -> nn.Sequential:
    """``Linear(in, h_1), act, ..., Linear(h_{n-1}, h_n), act, Linear(h_n, out)``.

    Args:
        in_dim: input width.
        hidden: widths of the hidden layers (may be empty: a single Linear).
        out_dim: output width (no activation after the last layer).
        activation: activation class, instantiated once per hidden layer (e.g. ``nn.Mish``).
    """
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class Denoiser(nn.Module):
    """The noise predictor eps_theta(a_k, s, z_text, z_traj, k) of paper Eq. 4-5 (Diffusion-QL's MLP).

    ``t = Linear(2d, d)(Mish(Linear(d, 2d)(SinusoidalPosEmb(d)(k))))`` with d = ``time_dim``, then
    ``concat(a_k, t, s, z) -> n_layers x (Linear hidden_dim, Mish) -> Linear A``.

    The first layer is evaluated in two parts, ``W [a_k, t, s, z] + b = W_at [a_k, t] + (W_sz [s, z] + b)``:
    the state-and-prompt part is the :meth:`context`, computed once per reverse chain and reused by its
    K steps, since s and z do not change along the chain. Same weights and same function as the single
    Linear; only the cost differs (``benchmarks/NOTES.md``).

    Args:
        obs_dim: state dimension S.
        act_dim: action dimension A.
        cond_dim: width C of the conditioning vector (z_text and z_traj concatenated); 0 for an
            unconditioned policy (the w/o-prompt ablation, or plain Diffusion-QL).
        hidden_dim: width of the hidden layers (Diffusion-QL: 256).
        time_dim: width of the step embedding (Diffusion-QL: 16).
        n_layers: number of hidden (Linear, Mish) layers (Diffusion-QL: 3).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        cond_dim: int,
        hidden_dim: int = 256,
        time_dim: int = 16,
        n_layers: int = 3,
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

    @property
    def first_layer(self) -> nn.Linear:
        """``Linear(A + time_dim + S + C, hidden_dim)`` on ``concat(a_k, t, s, z)``."""
        return cast(nn.Linear, self.net[0])

    def context(self, obs: Tensor, cond: Tensor | None = None) -> Tensor:
        """The first layer's state-and-prompt part ``W_sz [s, z] + b``, shared by a chain's K steps.

        Args:
            obs: states, (B, S).
            cond: prompt embeddings, (B, C); ``None`` or a (B, 0) tensor when ``cond_dim == 0``.

        Returns:
            (B, hidden_dim).
        """
        _check_last_dim("obs", obs, self.obs_dim)
        cond = _conditioning(cond, obs, self.cond_dim)
        first = self.first_layer
        w_sz = first.weight[:, self.act_dim + self.time_dim :]  # (H, S + C)
        return F.linear(torch.cat([obs, cond], dim=-1), w_sz, first.bias)  # (B, H)

    def forward(self, a_k: Tensor, k: Tensor, context: Tensor) -> Tensor:
        """Predict the noise in ``a_k``: ``eps_theta(a_k, k, s, z)`` with ``context = self.context(s, z)``.

        Args:
            a_k: noisy actions, (B, A).
            k: diffusion steps, LongTensor (B,).
            context: :meth:`context` of the states and prompts, (B, hidden_dim).

        Returns:
            eps, (B, A).
        """
        _check_last_dim("a_k", a_k, self.act_dim)
        _check_last_dim("context", context, self.hidden_dim)
        t = self.time_mlp(k)  # (B, time_dim)
        w_at = self.first_layer.weight[:, : self.act_dim + self.time_dim]  # (H, A + time_dim)
        h = torch.addmm(context, torch.cat([a_k, t], dim=-1), w_at.T)  # (B, H), the first layer
        for i in range(1, len(self.net)):
            h = self.net[i](h)
        return h  # (B, A)


class StackedLinear(nn.Module):
    """H independent Linear layers applied in one batched matmul (``torch.baddbmm``).

    ``y[h] = x[h] @ weight[h]^T + bias[h]``: ``weight[h]`` is laid out as ``nn.Linear``'s (out, in), which
    is also the fast layout for ``baddbmm`` with a narrow output (the critics' last layer: 7x faster
    forward than an (in, out) weight with out = 1; ``benchmarks/NOTES.md``). Each head is initialised
    exactly as ``nn.Linear``'s default (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
    for weight and bias), drawn independently per head.

    Args:
        n_heads: number of heads H.
        in_dim: input width.
        out_dim: output width.
    """

    def __init__(self, n_heads: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if n_heads < 1 or in_dim < 1 or out_dim < 1:
            raise ValueError(f"n_heads, in_dim and out_dim must be >= 1, got {(n_heads, in_dim, out_dim)!r}")
        self.n_heads, self.in_dim, self.out_dim = n_heads, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(n_heads, out_dim, in_dim))  # (H, out, in)
        self.bias = nn.Parameter(torch.empty(n_heads, 1, out_dim))  # (H, 1, out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(H, B, in) -> (H, B, out)."""
        return torch.baddbmm(self.bias, x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, in_dim={self.in_dim}, out_dim={self.out_dim}"


class TwinCritic(nn.Module):
    """Two independent Q-networks Q_phi1, Q_phi2 (s, a, z) (paper Eq. 6), run as one batched network.

    Each head is ``concat(s, a, z) -> n_layers x (Linear hidden_dim, Mish) -> Linear 1``
    (Diffusion-QL's critic, plus the prompt conditioning). The heads share no parameters: layer l
    holds a (2, out, in) weight and runs both heads in one ``baddbmm``. ``layers[l].weight[h]`` is
    the ``nn.Linear`` weight of head h.

    Scoring many actions at the same states and prompts (action candidates, the max-Q backup), the first
    layer splits as ``W [s, a, z] + b = W_a a + (W_sz [s, z] + b)``: :meth:`context` computes the
    state-and-prompt part once per state and :meth:`from_context` the rest per action. Same weights and
    same function as :meth:`forward`, which keeps the single matmul for one action per state.

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
        _check_last_dim("obs", obs, self.obs_dim)
        _check_last_dim("act", act, self.act_dim)
        cond = _conditioning(cond, obs, self.cond_dim)
        x = torch.cat([obs, act, cond], dim=-1)  # (B, S + A + C)
        return self._heads(self.first_layer(self._per_head(x)))

    @property
    def first_layer(self) -> StackedLinear:
        """Both heads' ``Linear(S + A + C, hidden_dim)`` on ``concat(s, a, z)``."""
        return cast(StackedLinear, self.layers[0])

    def context(self, obs: Tensor, cond: Tensor | None = None) -> Tensor:
        """Both heads' first-layer state-and-prompt part ``W_sz [s, z] + b``: (B, S), (B, C) → (2, B, H).

        ``cond`` is ``None`` or (B, 0) when ``cond_dim == 0``.
        """
        _check_last_dim("obs", obs, self.obs_dim)
        cond = _conditioning(cond, obs, self.cond_dim)
        w, s = self.first_layer.weight, self.obs_dim  # (2, H, S + A + C)
        w_sz = torch.cat([w[..., :s], w[..., s + self.act_dim :]], dim=-1)  # (2, H, S + C)
        x = self._per_head(torch.cat([obs, cond], dim=-1))  # (2, B, S + C)
        return torch.baddbmm(self.first_layer.bias, x, w_sz.transpose(1, 2))

    def from_context(self, act: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads' values at actions (B, A), given their states' :meth:`context` (2, B, H).

        Returns:
            ``(q1 (B,), q2 (B,))``.
        """
        _check_last_dim("act", act, self.act_dim)
        _check_last_dim("context", context, self.first_layer.out_dim)
        w_a = self.first_layer.weight[..., self.obs_dim : self.obs_dim + self.act_dim]  # (2, H, A)
        a = self._per_head(act)  # (2, B, A)
        # A product and an add, not baddbmm: compiled, the add (and a repeat of the context that feeds
        # it) fuses into the activation's kernel instead of being written out (benchmarks/NOTES.md).
        return self._heads(torch.bmm(a, w_a.transpose(1, 2)) + context)

    def _per_head(self, x: Tensor) -> Tensor:
        """The same input for both heads, without a copy: (B, D) → (2, B, D)."""
        return x.unsqueeze(0).expand(self.n_heads, *x.shape)

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The layers after the first, from its pre-activation (2, B, H): (q1 (B,), q2 (B,))."""
        for layer in self.layers[1:]:
            h = layer(self.activation(h))  # (2, B, hidden), then (2, B, 1)
        q = h.squeeze(-1)  # (2, B)
        return q[0], q[1]


class TextHead(nn.Module):
    """h_psi of paper Eq. 1: ``z_text = h_psi(M(z_text))``, a 3-layer ReLU MLP (Section 4.1).

    ``in_dim -> hidden_dim -> hidden_dim -> out_dim`` with ReLU between layers.

    Args:
        in_dim: width E of the frozen LLM's pooled embedding (MiniLM: 384; Llama-3-8B: 4096).
        out_dim: width of z_text.
        hidden_dim: hidden width (paper: 512).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = mlp(in_dim, [hidden_dim, hidden_dim], out_dim, nn.ReLU)

    def forward(self, e: Tensor) -> Tensor:
        """(T, E) cached LLM embeddings -> (T, out_dim)."""
        _check_last_dim("e", e, self.in_dim)
        return self.net(e)


class TrajectoryEncoder(nn.Module):
    """g_phi of paper Eq. 3: a transformer over the (s_t, a_t) prompt trajectory, mean-pooled, then an MLP.

    token_t = Linear(concat(s_t, a_t)) + pos_emb[t]  ->  pre-LN TransformerEncoder (+ final LayerNorm)
    -> masked mean over t  ->  Linear d_model, ReLU, Linear out_dim.

    One token per (s_t, a_t) pair, as MTDiff's prompt tokens; the paper's Eq. 2 interleaves s and a,
    which would double the sequence length for the same information.

    Args:
        obs_dim: state dimension S.
        act_dim: action dimension A.
        out_dim: width of z_traj.
        max_len: longest prompt trajectory L accepted (size of the learned positional table).
        d_model: transformer width (MTDiff: 256; 128 is the CPU-friendly default).
        n_layers: transformer layers (MTDiff: 4).
        n_heads: attention heads (MTDiff: 2); must divide ``d_model``.
        dropout: dropout inside the transformer layers.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        out_dim: int,
        max_len: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len!r}")
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads!r}) must divide d_model ({d_model!r})")
        self.obs_dim, self.act_dim, self.out_dim, self.max_len = obs_dim, act_dim, out_dim, max_len
        self.token = nn.Linear(obs_dim + act_dim, d_model)
        self.pos_emb = nn.Parameter(torch.empty(max_len, d_model))  # (L_max, d_model)
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.head = mlp(d_model, [d_model], out_dim, nn.ReLU)

    def forward(self, obs: Tensor, act: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode one prompt trajectory per task.

        Args:
            obs: states, (T, L, S).
            act: actions, (T, L, A).
            mask: (T, L) bool, True at **valid** steps (padding is False); ``None`` means all valid.
                A row with no valid step pools to the zero vector.

        Returns:
            z_traj, (T, out_dim).
        """
        if obs.dim() != 3 or act.dim() != 3 or obs.shape[:2] != act.shape[:2]:
            raise ValueError(
                f"obs and act must be (T, L, S) and (T, L, A), got {tuple(obs.shape)} and {tuple(act.shape)}"
            )
        _check_last_dim("obs", obs, self.obs_dim)
        _check_last_dim("act", act, self.act_dim)
        length = obs.shape[1]
        if length > self.max_len:
            raise ValueError(f"trajectory length L={length} exceeds max_len={self.max_len}")
        if mask is not None and tuple(mask.shape) != tuple(obs.shape[:2]):
            raise ValueError(f"mask must have shape {tuple(obs.shape[:2])}, got {tuple(mask.shape)}")
        x = self.token(torch.cat([obs, act], dim=-1)) + self.pos_emb[:length]  # (T, L, d_model)
        padding = None if mask is None else ~mask.bool()  # (T, L), True = ignore
        h = self.transformer(x, src_key_padding_mask=padding)  # (T, L, d_model)
        if mask is None:
            pooled = h.mean(dim=1)  # (T, d_model)
        else:
            valid = mask.bool().unsqueeze(-1)  # (T, L, 1)
            # masked_fill, not a product: padded outputs may be non-finite on the inference fast path.
            total = h.masked_fill(~valid, 0.0).sum(dim=1)  # (T, d_model)
            pooled = total / valid.sum(dim=1).clamp_min(1).to(h.dtype)  # (T, d_model)
        return self.head(pooled)  # (T, out_dim)


__all__ = [
    "Denoiser",
    "Mish",
    "SinusoidalPosEmb",
    "StackedLinear",
    "TextHead",
    "TrajectoryEncoder",
    "TwinCritic",
    "mish",
    "mlp",
]
