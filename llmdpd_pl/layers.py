"""Building blocks of LLMDPD's networks: Mish, the diffusion-step embedding, MLPs, stacked Linear heads.

Shared by :mod:`llmdpd_pl.networks` (denoiser, critics) and :mod:`llmdpd_pl.prompt_encoders`, with the
check that gives their inputs of the wrong width a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_last_dim(name: str, x: Tensor, expected: int) -> None:
    """A ``ValueError`` naming ``name`` and its shape unless ``x``'s last dimension is ``expected``."""
    if x.shape[-1] != expected:
        raise ValueError(f"{name} must have last dimension {expected}, got shape {tuple(x.shape)}")


def mish(x: Tensor) -> Tensor:
    """Mish (Misra 2019), the activation of Diffusion-QL's MLPs, from one sigmoid.

    ``mish(x) = x tanh(softplus(x)) = x p / (2 - p)``, with ``s = sigmoid(x)`` and ``p = s (2 - s)``:
    ``e^softplus(x) = 1 + e^x = 1 / (1 - s)``, so ``tanh(softplus(x)) = (1 - (1 - s)^2) / (1 + (1 - s)^2)``.
    No intermediate overflows, and for x -> -inf, ``p ~ 2s`` keeps the relative accuracy of ``x e^x``.

    The same function as ``torch.nn.functional.mish`` (to float32 rounding). Compiled, its sigmoid form
    fuses into cheaper kernels than PyTorch's ``tanh(softplus(x))`` (``docs/performance.md``).

    Args:
        x: any shape.

    Returns:
        mish(x), the shape of ``x``.
    """
    s = torch.sigmoid(x)
    p = s * (2.0 - s)
    return x * (p / (2.0 - p))


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


def film(h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """FiLM (Perez et al. 2018): ``FiLM(h) = (1 + gamma) * h + beta``, gamma and beta computed from z.

    Written about 1, so that zero-initialised gamma and beta leave ``h`` unchanged. (B, H) each → (B, H).
    """
    return torch.addcmul(beta, h, 1.0 + gamma)


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


def _in_contiguous_layout(grad: Tensor) -> Tensor:
    """``grad`` with row-major strides, those of size-1 dimensions included (``contiguous()`` keeps a
    tensor whose strides differ only there)."""
    return grad.clone(memory_format=torch.contiguous_format)


class StackedLinear(nn.Module):
    """H independent Linear layers applied in one batched matmul (``torch.baddbmm``).

    ``y[h] = x[h] @ weight[h]^T + bias[h]``: ``weight[h]`` is laid out as ``nn.Linear``'s (out, in), which
    is also the fast layout for ``baddbmm`` with a narrow output (the critics' last layer: 7x faster
    forward than an (in, out) weight with out = 1; ``docs/performance.md``). Each head is initialised
    exactly as ``nn.Linear``'s default (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
    for weight and bias), drawn independently per head.

    The weight's gradient comes out of ``bmm`` transposed; a hook hands it over in the weight's own
    layout, strides of size-1 dimensions included, as DDP's gradient buckets expect (otherwise DDP warns
    and copies it on every backward; the hook's copy replaces the one autograd makes to match the layout).

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
        self.weight.register_hook(_in_contiguous_layout)
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


__all__ = ["Mish", "SinusoidalPosEmb", "StackedLinear", "check_last_dim", "film", "mish", "mlp"]
