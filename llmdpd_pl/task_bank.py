"""``TaskBank``: every task's prompts and the seen tasks' observation statistics, as buffers.

The policy is conditioned on its task only through these prompts, so they travel with the weights: a
checkpoint holds the text embeddings and trajectory prompts of every task it knows, seen and unseen, and
acts zero-shot on the unseen ones without the datamodule. The LLM is not here: the text bank holds its
frozen embeddings, computed once by :mod:`llmdpd_pl.data.embeddings`.

Shapes: T tasks (seen first, then unseen), P trajectory prompts per task, L prompt length, S state dim,
A action dim, E LLM width.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from llmdpd_pl.errors import ConfigError
from llmdpd_pl.utils import derive_seed

BANKS = ("text_bank", "traj_obs_bank", "traj_act_bank", "obs_mean", "obs_std")
"""The buffers, whose shapes (except the statistics') depend on the data."""


@dataclass(frozen=True)
class TaskPrompts:
    """Both prompts of every task, seen tasks first, as the datamodule loads them.

    Attributes:
        names: (T,) task names; the index is the ``task_id``.
        text_embedding: (T, E) frozen-LLM embedding M(z_text) of each task's text prompt.
        traj_obs: (T, P, L, S) states of each task's prompt trajectories (raw).
        traj_act: (T, P, L, A) actions of each task's prompt trajectories.
        llm: The identity of the LLM that embedded the text (``data.embeddings.llm_identity``), if known.
        texts: (T,) the LLM input of each task's text prompt, if known.
    """

    names: tuple[str, ...]
    text_embedding: Tensor
    traj_obs: Tensor
    traj_act: Tensor
    llm: dict[str, Any] | None = None
    texts: tuple[str, ...] | None = None


class PromptInputs(NamedTuple):
    """One prompt per task, as the prompt encoders read it (``PromptedPolicy.encode_prompts(*inputs)``)."""

    text_embedding: Tensor  # (T, E)
    traj_obs: Tensor  # (T, L, S), normalised
    traj_act: Tensor  # (T, L, A)


class TaskBank(nn.Module):
    """The tasks' prompt banks and the observation statistics, filled by :meth:`fill` and saved as buffers.

    The task names, the number of seen tasks, the LLM's identity and the prompt texts are saved with them
    (``get_extra_state``). :attr:`version` counts fills and loads, so what is computed from the banks can
    tell when they changed.

    Args:
        obs_dim: S.
        act_dim: A.
        text_embed_dim: E.
        traj_prompt_len: L.
        text_source: ``llm`` keeps the LLM embeddings; ``random`` replaces each task's with a fixed random
            vector of the same dimension and norm, seeded by ``(text_seed, task name)``.
        text_seed: Seed of the ``random`` text vectors.
    """

    text_bank: Tensor  # (T, E)
    traj_obs_bank: Tensor  # (T, P, L, S), raw states
    traj_act_bank: Tensor  # (T, P, L, A)
    obs_mean: Tensor  # (S,)
    obs_std: Tensor  # (S,)

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        text_embed_dim: int,
        traj_prompt_len: int,
        text_source: Literal["llm", "random"] = "llm",
        text_seed: int = 0,
    ) -> None:
        super().__init__()
        self.text_source, self.text_seed = text_source, text_seed
        self.register_buffer("text_bank", torch.zeros(0, text_embed_dim))
        self.register_buffer("traj_obs_bank", torch.zeros(0, 1, traj_prompt_len, obs_dim))
        self.register_buffer("traj_act_bank", torch.zeros(0, 1, traj_prompt_len, act_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.task_names: tuple[str, ...] = ()
        self.n_seen = 0
        self.llm: dict[str, Any] | None = None
        self.texts: tuple[str, ...] | None = None
        self.version = 0

    def fill(self, prompts: TaskPrompts, obs_mean: Tensor, obs_std: Tensor, n_seen: int) -> None:
        """Copy every task's prompts and the observation statistics (S,), (S,) into the buffers."""
        text = prompts.text_embedding  # (T, E)
        if self.text_source == "random":  # same dimension and norm, no task semantics
            text = torch.stack(
                [
                    torch.randn(
                        text.shape[1],
                        generator=torch.Generator().manual_seed(derive_seed(self.text_seed, name)),
                    )
                    for name in prompts.names
                ]
            )
            text = text / text.norm(dim=1, keepdim=True) * prompts.text_embedding.norm(dim=1, keepdim=True)
        device = self.obs_mean.device
        self.text_bank = text.to(device)
        self.traj_obs_bank = prompts.traj_obs.to(device)
        self.traj_act_bank = prompts.traj_act.to(device)
        self.obs_mean, self.obs_std = obs_mean.to(device), obs_std.to(device)
        self.task_names, self.n_seen = tuple(prompts.names), n_seen
        self.llm, self.texts = prompts.llm, prompts.texts
        self.version += 1

    def get_extra_state(self) -> dict[str, Any]:
        texts = None if self.texts is None else list(self.texts)
        return {"task_names": list(self.task_names), "n_seen": self.n_seen, "llm": self.llm, "texts": texts}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.task_names, self.n_seen = tuple(state["task_names"]), int(state["n_seen"])
        self.llm, texts = state.get("llm"), state.get("texts")
        self.texts = None if texts is None else tuple(texts)
        self.version += 1

    @property
    def n_prompts(self) -> int:
        """P, the trajectory prompts per task."""
        return self.traj_obs_bank.shape[1]

    def check_prompt_index(self, index: int, hint: str = "") -> None:
        """A :class:`ConfigError` under ``prompt_index`` unless ``index`` is one of the :attr:`n_prompts`."""
        if not 0 <= index < (n := self.n_prompts):
            problem = f"this run has {n} prompt trajectories per task: 0 to {n - 1}{hint}"
            raise ConfigError("prompt_index", problem, index)

    def normalize(self, obs: Tensor) -> Tensor:
        """(…, S) raw states → (…, S) standardised with the seen-task statistics."""
        return (obs - self.obs_mean) / self.obs_std

    def prompts(self, tasks: Tensor, prompt_index: Tensor, traj_tasks: Tensor | None = None) -> PromptInputs:
        """Tasks' text embeddings and trajectory prompt ``prompt_index``: (T,), (T,) → (T, …).

        ``traj_tasks`` (T,) takes the trajectory prompts from other tasks (the prompt-swap test).
        """
        traj_tasks = tasks if traj_tasks is None else traj_tasks
        traj_obs = self.normalize(self.traj_obs_bank[traj_tasks, prompt_index])  # (T, L, S)
        return PromptInputs(self.text_bank[tasks], traj_obs, self.traj_act_bank[traj_tasks, prompt_index])

    def task_ids(self, names: Iterable[str]) -> Tensor:
        """Indices of task names in this bank: names → (N,) int64."""
        index = {n: i for i, n in enumerate(self.task_names)}
        missing = list(dict.fromkeys(n for n in names if n not in index))
        if missing:
            raise ValueError(f"tasks {missing} are not in the model's task bank {list(self.task_names)}")
        return torch.tensor([index[n] for n in names], device=self.obs_mean.device)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in BANKS:  # the banks' shapes depend on the data: take the checkpoint's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.obs_mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.version += 1
