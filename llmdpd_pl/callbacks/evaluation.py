"""``RolloutEvaluation``: success rates on seen and unseen tasks, during fit and in ``llmdpd test``.

During fit it evaluates every ``every_n_updates`` updates and logs ``eval/seen/...`` and
``eval/unseen/...`` (``ModelCheckpoint(monitor="eval/unseen/success")`` works). In ``llmdpd test`` it
runs ``test_episodes`` per task, prints the results table (with the scripted expert as a reference row)
and writes the same as JSON, whose path is the last line printed. Episodes are sharded across DDP ranks
and the counts summed, so each episode counts exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from llmdpd_pl.data.collect import PROGRESS_INTERVAL
from llmdpd_pl.evaluation import (
    Counts,
    PolicyFn,
    TaskResult,
    expert_policy,
    format_results,
    make_eval_envs,
    run_episodes,
    shard,
    write_json,
)


def module_policy(module: Any, prompt_index: int, seed: int) -> PolicyFn:
    """The module's EMA actor as a :data:`PolicyFn`, conditioned on each task's prompts.

    The prompts' encodings are computed once per task (the weights do not change during an evaluation).
    """
    gen = torch.Generator(device=module.device).manual_seed(seed)
    conditioning: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def act(obs: np.ndarray, task: str) -> np.ndarray:
        if task not in conditioning:
            conditioning[task] = module.task_conditioning(module.task_ids([task]), prompt_index)
        cond, critic_cond = (c.expand(len(obs), -1) for c in conditioning[task])
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=module.device)
        return module.act_conditioned(obs_t, cond, critic_cond, gen).cpu().numpy()

    return act


class RolloutEvaluation(L.Callback):
    """Roll out the EMA actor on the datamodule's seen and unseen tasks.

    Args:
        every_n_updates: Evaluate during fit every this many updates (0: never during fit).
        episodes: Episodes per task for evaluations during fit.
        test_episodes: Episodes per task in ``llmdpd test`` (the paper uses 500).
        num_envs: Parallel envs per task (per rank).
        vectorization: ``sync`` (right for 2 cores) or ``async`` (one process per env).
        test_seen: In ``llmdpd test``, evaluate the seen tasks too, not only the unseen ones.
        expert_reference: In ``llmdpd test``, add the scripted expert's row for each task.
        prompt_index: Which prompt trajectory of each task conditions the policy (recorded in the JSON).
        max_steps: Episode length (Meta-World: 500).
        seed: Evaluation seed (env layouts and action sampling).
        output: JSON path of ``llmdpd test``; default ``<log_dir>/test_results.json``.
    """

    def __init__(
        self,
        every_n_updates: int = 0,
        episodes: int = 10,
        test_episodes: int = 50,
        num_envs: int = 10,
        vectorization: Literal["sync", "async"] = "sync",
        test_seen: bool = True,
        expert_reference: bool = True,
        prompt_index: int = 0,
        max_steps: int = 500,
        seed: int = 0,
        output: str | None = None,
    ) -> None:
        for name, value in (
            ("episodes", episodes),
            ("test_episodes", test_episodes),
            ("num_envs", num_envs),
            ("max_steps", max_steps),
        ):
            if value < 1:
                raise ValueError(f"RolloutEvaluation.{name} must be >= 1, got {value}")
        self.every_n_updates, self.episodes, self.test_episodes = every_n_updates, episodes, test_episodes
        self.num_envs, self.vectorization, self.test_seen = num_envs, vectorization, test_seen
        self.expert_reference, self.prompt_index, self.max_steps = expert_reference, prompt_index, max_steps
        self.seed, self.output = seed, output
        self.results: list[TaskResult] = []
        self.json_path: Path | None = None
        self._envs: dict[tuple[str, int], gym.vector.VectorEnv] = {}

    def _envs_for(self, task: str, n_episodes: int) -> gym.vector.VectorEnv | None:
        """The task's vector env, built once (an env takes ~0.6 s to build) and reused by every evaluation."""
        if n_episodes == 0:
            return None
        key = (task, min(self.num_envs, n_episodes))
        if key not in self._envs:
            self._envs[key] = make_eval_envs(task, key[1], self.seed, self.vectorization)
        return self._envs[key]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for envs in self._envs.values():
            envs.close()
        self._envs.clear()

    def _tasks(self, trainer: L.Trainer, seen: bool) -> list[tuple[str, str]]:
        dm = trainer.datamodule
        return [(t, "seen") for t in dm.seen_tasks if seen] + [(t, "unseen") for t in dm.unseen_tasks]

    def evaluate(
        self, trainer: L.Trainer, policies: dict[str, PolicyFn], tasks: list[tuple[str, str]], episodes: int
    ) -> list[TaskResult]:
        """Counts of this rank's shard, summed over ranks, as rows (same on every rank)."""
        rank, world = trainer.global_rank, trainer.world_size
        ids = shard(episodes, rank, world)
        total = len(ids) * self.max_steps * len(tasks) * len(policies)
        bar = tqdm(
            total=total,
            desc="eval",
            unit="step",
            disable=rank != 0,
            leave=False,
            mininterval=PROGRESS_INTERVAL,
        )
        local = []
        for policy in policies.values():
            for task, _ in tasks:
                counts = run_episodes(
                    policy,
                    task,
                    ids,
                    self.num_envs,
                    self.seed,
                    self.max_steps,
                    envs=self._envs_for(task, len(ids)),
                    progress=bar,
                )
                local.append(counts.as_array())
        bar.close()
        summed = torch.as_tensor(np.stack(local), dtype=torch.float64)
        summed = trainer.strategy.reduce(summed.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        rows, i = [], 0
        for name in policies:
            for task, split in tasks:
                rows.append(TaskResult.from_counts(task, split, name, Counts.from_array(summed[i].tolist())))
                i += 1
        return rows

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_updates or pl_module.updates % self.every_n_updates:
            return
        policy = module_policy(pl_module, self.prompt_index, self.seed + pl_module.updates)
        rows = self.evaluate(trainer, {"agent": policy}, self._tasks(trainer, seen=True), self.episodes)
        metrics: dict[str, float] = {}
        for split in ("seen", "unseen"):
            split_rows = [r for r in rows if r.split == split]
            for r in split_rows:
                metrics[f"eval/{split}/{r.task}/success"] = r.success_rate
                metrics[f"eval/{split}/{r.task}/return"] = r.mean_return
            if split_rows:
                metrics[f"eval/{split}/success"] = float(np.mean([r.success_rate for r in split_rows]))
        # Step metrics reach the loggers only on batches where step % log_every_n_steps == 0, which would
        # silently drop evaluations unless every_n_updates is a multiple of it: write to the loggers
        # directly, at the step Lightning gives this batch's train metrics. log_dict still fills
        # callback_metrics (ModelCheckpoint(monitor="eval/unseen/success")).
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        policies = {"agent": module_policy(pl_module, self.prompt_index, self.seed)}
        if self.expert_reference:
            policies["expert"] = expert_policy()
        rows = self.evaluate(trainer, policies, self._tasks(trainer, seen=self.test_seen), self.test_episodes)
        self.results = rows
        agent = [r for r in rows if r.policy == "agent"]
        for split in ("seen", "unseen"):
            split_rows = [r for r in agent if r.split == split]
            if split_rows:
                pl_module.log(f"test/{split}/success", float(np.mean([r.success_rate for r in split_rows])))
        if trainer.is_global_zero:
            path = Path(self.output or Path(trainer.log_dir or ".") / "test_results.json")
            meta = {
                "episodes_per_task": self.test_episodes,
                "prompt_index": self.prompt_index,
                "seed": self.seed,
                "max_steps": self.max_steps,
                "ckpt_path": trainer.ckpt_path,
                "updates": pl_module.updates,
                "action_selection": pl_module.hparams.action_selection,
                "prompts": pl_module.hparams.prompts,
                "world_size": trainer.world_size,
            }
            self.json_path = write_json(rows, path, meta)
            print(format_results(rows))
            print(f"results: {self.json_path}")
