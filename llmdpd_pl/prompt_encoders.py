"""The two prompt encoders of LLMDPD: h_psi on the frozen LLM's text embedding, g_phi on a trajectory.

Shapes: T number of tasks, L prompt-trajectory length, S state dim, A action dim, E LLM width.

* ``TextHead``          h_psi, the MLP on the frozen LLM    (paper Eq. 1, Section 4.1)
* ``TrajectoryEncoder`` g_phi, transformer + mean pool + MLP (paper Eq. 3)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmdpd_pl.layers import check_last_dim, mlp


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
        check_last_dim("e", e, self.in_dim)
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
        check_last_dim("obs", obs, self.obs_dim)
        check_last_dim("act", act, self.act_dim)
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


__all__ = ["TextHead", "TrajectoryEncoder"]
