"""``PromptedOfflineDataModule``: multi-task offline transitions plus each task's two prompts.

- ``prepare_data`` (rank 0): collects missing Minari datasets and embeds missing text prompts.
- ``setup`` (every rank): loads all seen-task transitions into tensors, the cached text embeddings and
  the trajectory prompts of every task (seen and unseen).
- ``train_dataloader``: a :class:`~llmdpd_pl.data.batches.BatchStream` of whole batches drawn from the
  tensors, with no per-sample ``Dataset``/collate. Batches mix tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from llmdpd_pl.data.batches import Batch, BatchStream, Transitions
from llmdpd_pl.data.collect import collect, format_table
from llmdpd_pl.data.embeddings import EmbedStats, LLMSpec, embed_dim, embed_texts, llm_identity
from llmdpd_pl.data.loading import episodes, open_by_id, open_collected, prompt_trajectories, to_transitions
from llmdpd_pl.data.prompts import load_prompts, render_prompt
from llmdpd_pl.data.spec import DatasetSpec
from llmdpd_pl.envs import split_overlap
from llmdpd_pl.errors import ConfigError, at_least
from llmdpd_pl.suites import check_tasks, dims
from llmdpd_pl.task_bank import TaskPrompts

log = logging.getLogger(__name__)


class PromptedOfflineDataModule(L.LightningDataModule):
    """Offline multi-task data with text and trajectory prompts.

    Args:
        seen_tasks: Meta-World tasks trained on (their offline data is loaded).
        unseen_tasks: Tasks held out for zero-shot evaluation (only their prompts are loaded).
        target_tasks: Seen tasks that are the evaluation's targets (reported as the ``target`` split and
            always evaluated), e.g. tasks with only low-quality data in training.
        dataset: Where the Minari datasets live and how ``llmdpd collect`` generates them.
        dataset_id: Train the one seen task on this Minari dataset instead (e.g.
            ``mujoco/hopper/medium-v0``), found under ``dataset.root`` or Minari's own folder; its last
            ``dataset.prompt_episodes`` episodes are held out as the trajectory prompts.
        llm: The frozen LLM that embeds the text prompts.
        cache_dir: Embedding cache folder, shared by runs and DDP ranks.
        prompts: Overrides or additions to the packaged text prompts: task → {task, objective, constraints}.
        batch_size: Transitions per batch (per DDP rank).
        steps_per_epoch: Batches per "epoch" (the data is sampled with replacement; an epoch is a
            logging/checkpoint unit).
        traj_prompt_len: L, time steps of the trajectory prompt.
        traj_prompt_stride: Take every ``stride``-th step of the prompt episode, so that L × stride
            steps of the episode are covered (25 × 20 = a whole 500-step episode).
        traj_prompt_windows: Cut each prompt episode into this many consecutive windows of L × stride
            steps, each one trajectory prompt (``model.train_prompt: random`` draws one per task and
            update). 1 keeps the first window. MTDiff's random 20-step segments are about L = 20,
            stride 1 and 25 windows of a 500-step episode.
        reward_scale: Rewards are multiplied by this.
        normalize_obs: Provide per-dimension mean/std of the seen-task states (the module applies them);
            if False the statistics are 0 and 1.
        task_sampling: ``balanced`` draws a task uniformly then a transition of it; ``proportional``
            draws transitions uniformly over all seen data.
        seed: Seed of the batch stream (each DDP rank draws its own stream from it).
    """

    def __init__(
        self,
        seen_tasks: list[str],
        unseen_tasks: list[str],
        target_tasks: list[str] | None = None,
        dataset: DatasetSpec | None = None,
        dataset_id: str | None = None,
        llm: LLMSpec | None = None,
        cache_dir: str = "data/embeddings",
        prompts: dict[str, dict[str, str]] | None = None,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        traj_prompt_len: int = 25,
        traj_prompt_stride: int = 20,
        traj_prompt_windows: int = 1,
        reward_scale: float = 1.0,
        normalize_obs: bool = True,
        task_sampling: Literal["balanced", "proportional"] = "balanced",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seen_tasks = check_tasks(seen_tasks, "data.seen_tasks")
        self.unseen_tasks = check_tasks(unseen_tasks, "data.unseen_tasks")
        self.target_tasks = check_tasks(target_tasks or [], "data.target_tasks")
        if stray := [t for t in self.target_tasks if t not in self.seen_tasks]:
            raise ConfigError("data.target_tasks", f"{stray} are not in data.seen_tasks; targets are trained "
                              "on", self.target_tasks)  # fmt: skip
        if not self.seen_tasks:
            raise ConfigError("data.seen_tasks", "at least one seen task is needed", self.seen_tasks)
        if overlap := split_overlap(self.seen_tasks, self.unseen_tasks):
            raise ConfigError("data.unseen_tasks", f"{overlap} also appear in data.seen_tasks; training on "
                              "them would leak the test set", self.unseen_tasks)  # fmt: skip
        for name, value in {
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "traj_prompt_len": traj_prompt_len,
            "traj_prompt_stride": traj_prompt_stride,
            "traj_prompt_windows": traj_prompt_windows,
        }.items():
            at_least(f"data.{name}", value, 1)
        if not np.isfinite(reward_scale) or reward_scale <= 0:
            raise ConfigError("data.reward_scale", "must be a positive number", reward_scale)
        self.dataset = dataset or DatasetSpec()
        if dataset_id is not None and len(self.seen_tasks) != 1:
            raise ConfigError("data.dataset_id", f"one dataset trains one seen task, not {self.seen_tasks}",
                              dataset_id)  # fmt: skip
        self.dataset_id = dataset_id
        self.llm = llm or LLMSpec()
        self.cache_dir = cache_dir
        check_tasks(prompts or {}, "data.prompts")  # a typo is an error, with the close matches
        if unused := [t for t in prompts or {} if t not in self.task_names]:
            log.warning("data.prompts: %s are not tasks of this run; their texts are unused", unused)
        self.prompts = load_prompts(prompts)
        if missing := [t for t in self.task_names if t not in self.prompts]:
            key = "data.seen_tasks" if missing[0] in self.seen_tasks else "data.unseen_tasks"
            raise ConfigError(key, f"no text prompt for {missing}; give one with --data.prompts "
                              f"'{{{missing[0]}: {{task: ..., objective: ..., constraints: ...}}}}'", missing)
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.traj_prompt_len, self.traj_prompt_stride = traj_prompt_len, traj_prompt_stride
        self.traj_prompt_windows = traj_prompt_windows
        self.reward_scale, self.normalize_obs = reward_scale, normalize_obs
        self.task_sampling, self.seed = task_sampling, seed
        self.embed_stats: EmbedStats | None = None
        self.transitions: Transitions | None = None
        self.task_prompts: TaskPrompts | None = None
        self.stream: BatchStream | None = None
        self.obs_dim, self.act_dim = self._common_dims()
        self.obs_mean = torch.zeros(self.obs_dim)
        self.obs_std = torch.ones(self.obs_dim)

    # ---- dimensions and index maps (available before setup, for link_arguments) ----
    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.seen_tasks + self.unseen_tasks)

    @property
    def task_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.task_names)}

    def _common_dims(self) -> tuple[int, int]:
        """(S, A) of the tasks' envs, which one policy needs all tasks to share (the data is checked
        against them when it is loaded)."""
        first = self.seen_tasks[0]
        for task in self.task_names:
            if dims(task) != dims(first):
                raise ConfigError("data.unseen_tasks", f"{task!r} has (observation, action) widths "
                                  f"{dims(task)} but {first!r} has {dims(first)}; one policy needs the same "
                                  "widths for every task", self.unseen_tasks)  # fmt: skip
        return dims(first)

    @property
    def text_embed_dim(self) -> int:
        return embed_dim(self.llm)

    def prompt_texts(self) -> dict[str, str]:
        """task → the exact LLM input (instruction + structured prompt)."""
        return {t: render_prompt(self.prompts[t], self.llm.instruction) for t in self.task_names}

    # ---- Lightning hooks ----
    def prepare_data(self, progress: bool = True) -> None:
        """Rank 0: collect missing datasets, embed missing prompts (a second call runs no LLM).

        ``llmdpd test`` needs every task's prompts but no training data, so it collects prompts only.
        """
        testing = self.trainer is not None and self.trainer.state.fn == TrainerFn.TESTING
        given = [] if self.dataset_id is None else self.seen_tasks  # their data and prompts are the dataset's
        train = [] if testing else [t for t in self.seen_tasks if t not in given]
        rows = collect(self.dataset, train, [t for t in self.task_names if t not in given], progress=progress)
        if progress:
            print(format_table(rows))
        _, self.embed_stats = embed_texts(self.prompt_texts(), self.llm, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Every task's prompts; and, except for ``test`` (whose model brings its own observation
        statistics), the seen tasks' transitions, their statistics and the batch stream."""
        if self.task_prompts is None:
            texts = self.prompt_texts()
            embeddings, _ = embed_texts(texts, self.llm, self.cache_dir)
            trajectories = [self._load_prompt_trajectories(t) for t in self.task_names]
            traj_obs, traj_act = zip(*trajectories, strict=True)
            self.task_prompts = TaskPrompts(
                names=self.task_names,
                text_embedding=torch.stack([embeddings[t] for t in self.task_names]),
                traj_obs=torch.stack(traj_obs),
                traj_act=torch.stack(traj_act),
                llm=llm_identity(self.llm),
                texts=tuple(texts[t] for t in self.task_names),
            )
        if stage == "test" or self.transitions is not None:
            return
        self.transitions = self._load_transitions()
        if self.normalize_obs:
            self.obs_mean = self.transitions.obs.mean(0)
            self.obs_std = self.transitions.obs.std(0).clamp_min(1e-3)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.stream = BatchStream(
            self.transitions, self.batch_size, self.steps_per_epoch, self.seed, rank, self.task_sampling
        )

    def train_dataloader(self) -> BatchStream:
        if self.stream is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return self.stream

    def test_dataloader(self) -> list[int]:
        """One item per rank: ``llmdpd test`` runs rollouts (RolloutEvaluation), not a dataset pass."""
        return [0]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Batch) and self.trainer is not None and self.trainer.training and self.stream:
            self.stream.consumed += 1
        return batch

    # ---- loading ----
    def _train_episodes(self, task: str) -> tuple[Iterator[Any], str]:
        """(episodes, description) of a seen task's training data: all but the prompt episodes of a
        dataset given by ``dataset_id``, or the collected ``train`` dataset."""
        if self.dataset_id is not None:
            dataset = open_by_id(self.dataset_id, self.dataset.root)
            keep = dataset.episode_indices[: -self.dataset.prompt_episodes]
            what = f"dataset {self.dataset_id}"
            return episodes(dataset, what, keep, key="data.dataset_id"), what
        path = self.dataset.path(task, "train")
        what = f"train dataset of {task!r} at {path}"
        return episodes(open_collected(path), what), what

    def _load_transitions(self) -> Transitions:
        tasks = [self._train_episodes(t) for t in self.seen_tasks]
        return to_transitions(tasks, self.obs_dim, self.act_dim, self.reward_scale)

    def _load_prompt_trajectories(self, task: str) -> tuple[Tensor, Tensor]:
        """(P, L, S) states and (P, L, A) actions of ``task``'s trajectory prompts: the last
        ``prompt_episodes`` episodes of a ``dataset_id`` dataset, or the collected ``prompts`` dataset."""
        if self.dataset_id is not None and task == self.seen_tasks[0]:
            dataset = open_by_id(self.dataset_id, self.dataset.root)
            what = f"dataset {self.dataset_id} (its last {self.dataset.prompt_episodes} episodes)"
            last = dataset.episode_indices[-self.dataset.prompt_episodes :]
            eps = episodes(dataset, what, last, "data.dataset_id")
        else:
            path = self.dataset.path(task, "prompts")
            what = f"prompts dataset of {task!r} at {path}"
            eps = episodes(open_collected(path), what)
        L, stride, windows = self.traj_prompt_len, self.traj_prompt_stride, self.traj_prompt_windows
        return prompt_trajectories(eps, what, L, stride, self.obs_dim, self.act_dim, windows)
