"""``RolloutEvaluation``: success rates on seen and unseen tasks, during fit and in ``llmdpd test``.

During fit it evaluates every ``every_n_updates`` updates and logs ``eval/seen/...`` and
``eval/unseen/...`` (``ModelCheckpoint(monitor="eval/unseen/success")`` works). In ``llmdpd test`` it
runs ``test_episodes`` per task, prints the results table (with the scripted expert as a reference row)
and writes the same as JSON, whose path is the last line printed. Episodes are sharded across DDP ranks
and the counts summed, so each episode counts exactly once.

With ``video_episodes > 0`` each evaluation also records that many extra episodes of the agent per task
(:mod:`llmdpd_pl.video`), after the scored ones, which they do not change. Each becomes a GIF,
``<log_dir>/videos/test/<split>/<task>_ep<k>.gif`` in ``llmdpd test`` and
``<log_dir>/videos/update<U>/<split>/<task>_ep<k>.gif`` during fit (listed under ``"videos"`` in the
results JSON), and, with a ``TensorBoardLogger``, an animated image ``test/<split>/<task>/video_ep<k>``
(at step ``updates``) or ``eval/<split>/<task>/video_ep<k>`` (at the step of the ``eval/`` metrics).
Rank 0 records them all while the other ranks go on: keep them few under DDP, where a rank that reaches
a collective waits for rank 0 (NCCL's timeout is 30 min).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tqdm.auto import tqdm

from llmdpd_pl.envs import make_eval_envs
from llmdpd_pl.rollouts import (
    Counts,
    PolicyFn,
    TaskResult,
    expert_policy,
    format_results,
    mean_success,
    module_policy,
    run_episodes,
    shard,
    write_json,
)
from llmdpd_pl.utils import PROGRESS_INTERVAL, atomic_write
from llmdpd_pl.video import MAX_GIF_FPS, CameraName, encode_gif, gif_summary, make_video_env, record_episode


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
        video_episodes: Episodes per task to record as videos at each evaluation (0: none). Episode k
            runs the layout of scored episode k with its own action noise; it is not scored.
        video_size: Frame width and height in pixels.
        video_camera: Meta-World camera; frames are turned upright (see :mod:`llmdpd_pl.video`).
        video_stride: Keep the frame of every this many steps (rendering costs ~0.1 s a frame on CPU).
        video_fps: GIF frame rate, at most 50. One step is 12.5 ms of simulated time, so the default
            ``video_stride`` 4 at 20 fps plays in real time.
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
        video_episodes: int = 0,
        video_size: int = 256,
        video_camera: CameraName = "corner",
        video_stride: int = 4,
        video_fps: int = 20,
    ) -> None:
        for name, value, low in (
            ("episodes", episodes, 1),
            ("test_episodes", test_episodes, 1),
            ("num_envs", num_envs, 1),
            ("max_steps", max_steps, 1),
            ("video_episodes", video_episodes, 0),
            ("video_size", video_size, 16),
            ("video_stride", video_stride, 1),
            ("video_fps", video_fps, 1),
        ):
            if value < low:
                raise ValueError(f"RolloutEvaluation.{name} must be >= {low}, got {value}")
        if video_fps > MAX_GIF_FPS:
            raise ValueError(
                f"RolloutEvaluation.video_fps must be <= {MAX_GIF_FPS} (GIF delays are whole centiseconds, "
                f"and viewers slow delays under 20 ms down to 100 ms), got {video_fps}"
            )
        self.every_n_updates, self.episodes, self.test_episodes = every_n_updates, episodes, test_episodes
        self.num_envs, self.vectorization, self.test_seen = num_envs, vectorization, test_seen
        self.expert_reference, self.prompt_index, self.max_steps = expert_reference, prompt_index, max_steps
        self.seed, self.output = seed, output
        self.video_episodes, self.video_size, self.video_camera = video_episodes, video_size, video_camera
        self.video_stride, self.video_fps = video_stride, video_fps
        self.results: list[TaskResult] = []
        self.videos: list[dict[str, Any]] = []
        self.json_path: Path | None = None
        self._envs: dict[tuple[str, int], gym.vector.VectorEnv] = {}
        self._video_envs: dict[tuple[str, int, str], gym.Env] = {}

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
        for env in self._video_envs.values():
            env.close()
        self._video_envs.clear()

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

    def record_videos(
        self,
        trainer: L.Trainer,
        policy: PolicyFn,
        tasks: list[tuple[str, str]],
        directory: Path,
        tag: str,
        step: int,
    ) -> list[dict[str, Any]]:
        """Record ``video_episodes`` episodes of ``policy`` per task as GIFs in ``directory/<split>/`` and
        as ``<tag>/<split>/<task>/video_ep<k>`` images in TensorBoard; return one JSON entry per video."""
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        bar = tqdm(
            total=len(tasks) * self.video_episodes * self.max_steps,
            desc="video",
            unit="step",
            leave=False,
            mininterval=PROGRESS_INTERVAL,
        )
        entries = []
        for task, split in tasks:
            key = (task, self.video_size, self.video_camera)
            if key not in self._video_envs:  # ~0.6 s to build, so reused by every evaluation
                self._video_envs[key] = make_video_env(task, self.seed, self.video_size, self.video_camera)
            for k in range(self.video_episodes):
                video = record_episode(
                    policy, task, k, self._video_envs[key], self.max_steps, self.video_stride
                )
                gif = encode_gif(video.frames, self.video_fps)
                path = atomic_write(directory / split / f"{task}_ep{k}.gif", gif)
                summary = gif_summary(f"{tag}/{split}/{task}/video_ep{k}", gif, *video.frames.shape[1:3])
                for writer in writers:
                    # add_video's own route (it needs moviepy to encode): the writer's event file writer
                    writer.file_writer.add_summary(summary, step)
                    writer.flush()
                entries.append(
                    {
                        "task": task,
                        "split": split,
                        "episode": k,
                        "path": str(path),
                        "frames": len(video.frames),
                        "success": video.success,
                        "return": video.episode_return,
                        "length": video.length,
                    }
                )
                bar.update(self.max_steps)
        bar.close()
        return entries

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_updates or pl_module.updates % self.every_n_updates:
            return
        policy = module_policy(pl_module, self.prompt_index, self.seed + pl_module.updates)
        rows = self.evaluate(trainer, {"agent": policy}, self._tasks(trainer, seen=True), self.episodes)
        metrics: dict[str, float] = {}
        for r in rows:
            metrics[f"eval/{r.split}/{r.task}/success"] = r.success_rate
            metrics[f"eval/{r.split}/{r.task}/return"] = r.mean_return
        metrics.update({f"eval/{split}/success": mean for split, mean in mean_success(rows).items()})
        # Step metrics reach the loggers only on batches where step % log_every_n_steps == 0, which would
        # silently drop evaluations unless every_n_updates is a multiple of it: write to the loggers
        # directly, at the step Lightning gives this batch's train metrics. log_dict still fills
        # callback_metrics (ModelCheckpoint(monitor="eval/unseen/success")).
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)
        step = pl_module.updates - 1  # Lightning's step of this batch's train metrics: batches before it
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.video_episodes and trainer.is_global_zero:
            self.record_videos(
                trainer,
                module_policy(pl_module, self.prompt_index, self.seed + pl_module.updates),
                self._tasks(trainer, seen=True),
                Path(trainer.log_dir or ".") / "videos" / f"update{pl_module.updates}",
                "eval",
                step,
            )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        policies = {"agent": module_policy(pl_module, self.prompt_index, self.seed)}
        if self.expert_reference:
            policies["expert"] = expert_policy()
        tasks = self._tasks(trainer, seen=self.test_seen)
        rows = self.evaluate(trainer, policies, tasks, self.test_episodes)
        self.results = rows
        for split, mean in mean_success(rows).items():
            pl_module.log(f"test/{split}/success", mean)
        if trainer.is_global_zero:
            log_dir = Path(trainer.log_dir or ".")
            videos = None
            if self.video_episodes:
                # A fresh policy with the scored run's seed: the videos do not depend on how many
                # scored episodes ran before them, and those ran before the videos, unchanged by them.
                policy = module_policy(pl_module, self.prompt_index, self.seed)
                videos = self.record_videos(
                    trainer, policy, tasks, log_dir / "videos" / "test", "test", pl_module.updates
                )
            self.videos = videos or []
            path = Path(self.output or log_dir / "test_results.json")
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
            self.json_path = write_json(rows, path, meta, videos)
            print(format_results(rows))
            if self.video_episodes:
                print(f"videos: {log_dir / 'videos' / 'test'}")
            print(f"results: {self.json_path}")
