"""Seen-task transitions in memory, and the seeded, rank-aware, resumable stream of batches drawn from them.

Whole :class:`Batch` es are drawn by indexing the tensors, with no per-sample ``Dataset`` or collate.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from llmdpd_pl.errors import ConfigError
from llmdpd_pl.utils import derive_seed


@dataclass
class Batch:
    """A batch of transitions from several seen tasks. B = batch size, S = obs dim, A = action dim.

    Attributes:
        obs: (B, S) float32 states s_t (raw; the module normalises).
        action: (B, A) float32 actions a_t in [-1, 1].
        reward: (B,) float32 rewards r_t (times ``reward_scale``).
        next_obs: (B, S) float32 states s_{t+1}.
        not_done: (B,) float32, 0 only where s_{t+1} is terminal (a time-limit truncation is not).
        task_id: (B,) int64 index into :attr:`~llmdpd_pl.task_bank.TaskPrompts.names`.
    """

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    not_done: Tensor
    task_id: Tensor


@dataclass
class Transitions:
    """All seen-task transitions, concatenated task after task (N rows)."""

    obs: Tensor  # (N, S)
    action: Tensor  # (N, A)
    reward: Tensor  # (N,)
    next_obs: Tensor  # (N, S)
    not_done: Tensor  # (N,)
    task_id: Tensor  # (N,)
    offsets: Tensor = field(init=False)  # (T_seen,) first row of each task
    sizes: Tensor = field(init=False)  # (T_seen,) rows per task

    def __post_init__(self) -> None:
        self.sizes = torch.bincount(self.task_id)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes


class BatchStream:
    """Whole batches of transitions, ``steps_per_epoch`` per epoch; seeded, rank-aware and resumable.

    Batch ``i`` is drawn with a generator seeded by (seed, rank, i), so the stream's whole state is the
    number of batches the training loop has *consumed* (Lightning prefetches one batch ahead, so the
    number yielded would be off by one). The datamodule counts consumption in ``on_before_batch_transfer``.
    """

    def __init__(
        self,
        data: Transitions,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        rank: int,
        task_sampling: Literal["balanced", "proportional"],
    ) -> None:
        self.data, self.batch_size, self.steps_per_epoch = data, batch_size, steps_per_epoch
        self.seed, self.rank, self.task_sampling = seed, rank, task_sampling
        self.consumed = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample(self, index: int) -> Batch:
        """The ``index``-th batch of this rank's stream."""
        d, b = self.data, self.batch_size
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, index))
        if self.task_sampling == "balanced":  # equal weight per task, whatever its dataset size
            task = torch.randint(len(d.sizes), (b,), generator=gen)
            rows = d.offsets[task] + (torch.rand(b, generator=gen) * d.sizes[task]).long()
        else:
            rows = torch.randint(len(d.obs), (b,), generator=gen)
        return Batch(
            d.obs[rows], d.action[rows], d.reward[rows], d.next_obs[rows], d.not_done[rows], d.task_id[rows]
        )

    def __iter__(self) -> Iterator[Batch]:
        start = self.consumed
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch  # finish the current epoch
        for index in range(start, end):
            yield self.sample(index)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ConfigError("data.seed", f"the checkpoint was trained with seed {state['seed']}", self.seed)
        self.consumed = int(state["consumed"])


__all__ = ["Batch", "BatchStream", "Transitions"]
