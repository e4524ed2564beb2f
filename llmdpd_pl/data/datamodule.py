"""``PromptedOfflineDataModule``: multi-task offline transitions plus each task's two prompts.

- ``prepare_data`` (rank 0): collects missing Minari datasets and embeds missing text prompts.
- ``setup`` (every rank): loads all seen-task transitions into tensors, the cached text embeddings and
  the trajectory prompts of every task (seen and unseen).
- ``train_dataloader``: a :class:`~llmdpd_pl.data.batches.BatchStream` of whole batches drawn from the
  tensors, with no per-sample ``Dataset``/collate. Batches mix tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from llmdpd_pl.data.batches import Batch, BatchStream, Transitions
from llmdpd_pl.data.collect import collect, format_table
from llmdpd_pl.data.embeddings import EmbedStats, LLMSpec, embed_dim, embed_texts, llm_identity
from llmdpd_pl.data.prompts import load_prompts, render_prompt
from llmdpd_pl.data.spec import DatasetSpec, Kind, read_metadata
from llmdpd_pl.envs import ACT_DIM, OBS_DIM, check_task_names, split_overlap
from llmdpd_pl.task_bank import TaskPrompts


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{what}: {bad} non-finite values (NaN/inf) in the data")


def _load_minari(path: Path) -> Any:
    import minari

    read_metadata(path)  # missing / incomplete / corrupt sidecar → clear error
    try:
        return minari.MinariDataset(path / "data")
    except Exception as err:
        raise ValueError(
            f"dataset at {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it and re-run `llmdpd collect`"
        ) from None


def _episodes(path: Path, task: str, kind: Kind) -> Iterator[Any]:
    dataset = _load_minari(path)
    try:
        yield from dataset.iterate_episodes()
    except Exception as err:
        raise ValueError(
            f"{kind} dataset of {task!r} at {path} is corrupt ({type(err).__name__}: {err}); "
            "delete it and re-run `llmdpd collect`"
        ) from None


class PromptedOfflineDataModule(L.LightningDataModule):
    """Offline multi-task data with text and trajectory prompts.

    Args:
        seen_tasks: Meta-World tasks trained on (their offline data is loaded).
        unseen_tasks: Tasks held out for zero-shot evaluation (only their prompts are loaded).
        target_tasks: Seen tasks that are the evaluation's targets (reported as the ``target`` split and
            always evaluated), e.g. tasks with only low-quality data in training.
        dataset: Where the Minari datasets live and how ``llmdpd collect`` generates them.
        llm: The frozen LLM that embeds the text prompts.
        cache_dir: Embedding cache folder, shared by runs and DDP ranks.
        prompts: Overrides or additions to the packaged text prompts: task → {task, objective, constraints}.
        batch_size: Transitions per batch (per DDP rank).
        steps_per_epoch: Batches per "epoch" (the data is sampled with replacement; an epoch is a
            logging/checkpoint unit).
        traj_prompt_len: L, time steps of the trajectory prompt.
        traj_prompt_stride: Take every ``stride``-th step of the prompt episode, so that L × stride
            steps of the episode are covered (25 × 20 = a whole 500-step episode).
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
        llm: LLMSpec | None = None,
        cache_dir: str = "data/embeddings",
        prompts: dict[str, dict[str, str]] | None = None,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        traj_prompt_len: int = 25,
        traj_prompt_stride: int = 20,
        reward_scale: float = 1.0,
        normalize_obs: bool = True,
        task_sampling: Literal["balanced", "proportional"] = "balanced",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seen_tasks = check_task_names(seen_tasks, "data.seen_tasks")
        self.unseen_tasks = check_task_names(unseen_tasks, "data.unseen_tasks")
        self.target_tasks = check_task_names(target_tasks or [], "data.target_tasks")
        if stray := [t for t in self.target_tasks if t not in self.seen_tasks]:
            raise ValueError(f"data.target_tasks: {stray} are not in data.seen_tasks; targets are trained on")
        if not self.seen_tasks:
            raise ValueError("data.seen_tasks: at least one seen task is needed")
        if overlap := split_overlap(self.seen_tasks, self.unseen_tasks):
            raise ValueError(
                f"data.unseen_tasks: {overlap} also appear in data.seen_tasks; "
                "training on them would leak the test set"
            )
        for name, value in {
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "traj_prompt_len": traj_prompt_len,
            "traj_prompt_stride": traj_prompt_stride,
        }.items():
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if not np.isfinite(reward_scale) or reward_scale <= 0:
            raise ValueError(f"data.reward_scale must be a positive number, got {reward_scale}")
        self.dataset = dataset or DatasetSpec()
        self.llm = llm or LLMSpec()
        self.cache_dir = cache_dir
        self.prompts = load_prompts(prompts)
        missing = [t for t in self.task_names if t not in self.prompts]
        if missing:
            raise ValueError(f"data.prompts: no text prompt for tasks {missing}")
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.traj_prompt_len, self.traj_prompt_stride = traj_prompt_len, traj_prompt_stride
        self.reward_scale, self.normalize_obs = reward_scale, normalize_obs
        self.task_sampling, self.seed = task_sampling, seed
        self.embed_stats: EmbedStats | None = None
        self.transitions: Transitions | None = None
        self.task_prompts: TaskPrompts | None = None
        self.stream: BatchStream | None = None
        self.obs_mean = torch.zeros(OBS_DIM)
        self.obs_std = torch.ones(OBS_DIM)

    # ---- dimensions and index maps (available before setup, for link_arguments) ----
    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.seen_tasks + self.unseen_tasks)

    @property
    def task_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.task_names)}

    @property
    def obs_dim(self) -> int:
        return OBS_DIM

    @property
    def act_dim(self) -> int:
        return ACT_DIM

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
        rows = collect(self.dataset, [] if testing else self.seen_tasks, self.task_names, progress=progress)
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
    def _load_transitions(self) -> Transitions:
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("obs", "action", "reward", "next_obs", "not_done", "task")
        }
        for task_id, task in enumerate(self.seen_tasks):
            path = self.dataset.path(task, "train")
            for ep in _episodes(path, task, "train"):
                obs, act = np.asarray(ep.observations), np.asarray(ep.actions)
                if obs.ndim != 2 or obs.shape[1] != OBS_DIM or act.ndim != 2 or act.shape[1] != ACT_DIM:
                    raise ValueError(
                        f"train dataset of {task!r} at {path}: episode {ep.id} has observations {obs.shape} "
                        f"and actions {act.shape}; expected (T+1, {OBS_DIM}) and (T, {ACT_DIM})"
                    )
                if len(obs) != len(act) + 1:
                    raise ValueError(
                        f"train dataset of {task!r}: episode {ep.id} has {len(obs)} observations "
                        f"for {len(act)} actions; expected T+1 for T"
                    )
                for what, arr in (("observations", obs), ("actions", act), ("rewards", ep.rewards)):
                    _check_finite(
                        np.asarray(arr), f"train dataset of {task!r} at {path}, episode {ep.id}, {what}"
                    )
                parts["obs"].append(obs[:-1])
                parts["next_obs"].append(obs[1:])
                parts["action"].append(act)
                parts["reward"].append(np.asarray(ep.rewards) * self.reward_scale)
                parts["not_done"].append(1.0 - np.asarray(ep.terminations, dtype=np.float64))
                parts["task"].append(np.full(len(act), task_id))
            if not parts["task"] or parts["task"][-1][0] != task_id:
                raise ValueError(f"train dataset of {task!r} at {path} has no episodes")

        def cat(key: str, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.from_numpy(np.concatenate(parts[key])).to(dtype)

        return Transitions(
            cat("obs"),
            cat("action"),
            cat("reward"),
            cat("next_obs"),
            cat("not_done"),
            cat("task", torch.int64),
        )

    def _load_prompt_trajectories(self, task: str) -> tuple[Tensor, Tensor]:
        """(P, L, S) states and (P, L, A) actions: every ``stride``-th step, the last repeated if short."""
        path = self.dataset.path(task, "prompts")
        obs, act = [], []
        for ep in _episodes(path, task, "prompts"):
            o, a = np.asarray(ep.observations)[:-1], np.asarray(ep.actions)
            if o.shape[-1] != OBS_DIM or a.shape[-1] != ACT_DIM:
                raise ValueError(
                    f"prompts dataset of {task!r} at {path}: observations {o.shape} / actions "
                    f"{a.shape}; expected (T, {OBS_DIM}) / (T, {ACT_DIM})"
                )
            _check_finite(o, f"prompts dataset of {task!r} at {path}, observations")
            _check_finite(a, f"prompts dataset of {task!r} at {path}, actions")
            idx = np.minimum(np.arange(self.traj_prompt_len) * self.traj_prompt_stride, len(a) - 1)
            obs.append(torch.from_numpy(o[idx]).float())
            act.append(torch.from_numpy(a[idx]).float())
        if not obs:
            raise ValueError(f"prompts dataset of {task!r} at {path} has no episodes")
        return torch.stack(obs), torch.stack(act)
