"""``RolloutEvaluation``: success rates (Meta-World) or returns and normalised scores (locomotion) on seen
and unseen tasks, during fit (every ``every_n_updates`` updates, logged as ``eval/<split>/...``;
``ModelCheckpoint(monitor="eval/unseen/success")`` works) and in ``llmdpd test``, where it runs
``test_episodes`` per task, prints the results table (the scripted expert as a reference row) and writes
it as JSON (:attr:`json_path`, the last line ``llmdpd test`` prints). The work is done by the functions
of :mod:`llmdpd_pl.evaluation`; this callback schedules them and logs their rows. Episodes are sharded
across DDP ranks and summed: each counts exactly once.

**Prompts at test time.** ``llmdpd test --config C --ckpt_path P`` conditions every task of C, seen by the
checkpoint or not, on C's prompts (``prompts_from="config"``); what training learned (weights, EMA actor,
observation statistics) comes from the checkpoint. ``prompts_from="checkpoint"`` keeps the training-time
banks exactly. ``prompt_index`` picks the prompt trajectory, or ``"all"`` (episode i runs trajectory i mod
P); ``prompt_swap`` adds the prompt-sensitivity matrix (:mod:`llmdpd_pl.prompt_matrix`).

With ``video_episodes > 0`` each evaluation also records that many extra episodes of the agent per task
(:mod:`llmdpd_pl.video`) as GIFs, ``<log_dir>/videos/{test,update<U>}/<split>/<task>_ep<k>.gif`` (listed
under ``"videos"`` in the results JSON), and as ``{test,eval}/<split>/<task>/video_ep<k>`` in TensorBoard
and W&B. Rank 0 records them while the others wait: keep them few under DDP (NCCL's 30 min timeout).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.auto import tqdm

from llmdpd_pl.acting import module_policy
from llmdpd_pl.callbacks.provenance import run_record
from llmdpd_pl.data.embeddings import check_same_llm
from llmdpd_pl.errors import ConfigError, at_least
from llmdpd_pl.evaluation import (
    Policies,
    Tasks,
    TestOptions,
    as_rows,
    count_episodes,
    results_record,
    rollout_steps,
)
from llmdpd_pl.media import sinks
from llmdpd_pl.prompt_matrix import Swap, prompt_sources, report_matrix
from llmdpd_pl.rollouts import (
    PolicyFn,
    TaskResult,
    format_results,
    mean_success,
    reference_policies,
    shard,
    write_json,
)
from llmdpd_pl.suites import make_eval_envs
from llmdpd_pl.utils import PROGRESS_INTERVAL
from llmdpd_pl.video import MAX_GIF_FPS, CameraName, VideoRecorder


def _stop_on_sigterm(trainer: L.Trainer) -> None:
    """Lightning's SIGTERM handler only sets a flag, which its loops read between batches; an evaluation
    reads it between steps, and stops as Lightning's loops do. No results file is written."""
    if trainer.received_sigterm:
        raise SIGTERMException


class RolloutEvaluation(L.Callback):
    """Roll out the EMA actor on the datamodule's seen and unseen tasks.

    Args:
        every_n_updates: Evaluate during fit every this many updates (0: never during fit).
        episodes: Episodes per task for evaluations during fit.
        test_episodes: Episodes per task in ``llmdpd test`` (the paper uses 500).
        num_envs: Parallel envs per task (per rank).
        vectorization: ``sync`` (right for 2 cores) or ``async`` (one process per env).
        test_seen: In ``llmdpd test``, evaluate the seen tasks too, not only the unseen ones.
        expert_reference: In ``llmdpd test``, add the scripted expert's row for each Meta-World task; a
            hidden-goal region gets two: ``expert`` (sent to the region's centre) and ``expert-blind``
            (sent to the centre of all regions).
        prompt_index: Which prompt trajectory of each task conditions the policy, or ``all``: episode i
            runs with trajectory i mod P (recorded in the JSON).
        prompts_from: In ``llmdpd test``, condition on the config's prompts (``config``) or keep the
            checkpoint's training-time prompt banks (``checkpoint``).
        prompt_swap: In ``llmdpd test``, also run the prompt-sensitivity matrix, swapping the ``text``,
            ``trajectory`` or ``both`` prompts between the evaluated tasks (``None``: no matrix).
        max_steps: Episode step cap (default: each task's full episode; Meta-World 500, MuJoCo 1000).
        seed: Evaluation seed (env layouts and action sampling).
        output: JSON path of ``llmdpd test``; default ``<log_dir>/test_results.json``.
        video_episodes: Episodes per task to record as videos at each evaluation (0: none). Episode k
            runs the layout of scored episode k with its own action noise; it is not scored.
        video_size: Frame width and height in pixels.
        video_camera: Meta-World camera; frames are turned upright (see :mod:`llmdpd_pl.video`).
        video_stride: Keep the frame of every this many steps (rendering costs ~0.1 s a frame on CPU).
        video_fps: GIF frame rate, at most 50. One step is 12.5 ms of simulated time, so the default
            ``video_stride`` 4 at 20 fps plays in real time.

    The ``test_*``, ``prompt_*``, ``expert_reference``, ``output`` and ``video_episodes`` arguments are
    the defaults of :attr:`test_options`, which ``llmdpd test``'s own options override for one test
    (:meth:`testing`).
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
        prompt_index: int | Literal["all"] = 0,
        prompts_from: Literal["config", "checkpoint"] = "config",
        prompt_swap: Swap | None = None,
        max_steps: int | None = None,
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
            ("max_steps", 1 if max_steps is None else max_steps, 1),
            ("video_episodes", video_episodes, 0),
            ("video_size", video_size, 16),
            ("video_stride", video_stride, 1),
            ("video_fps", video_fps, 1),
            ("prompt_index", 0 if prompt_index == "all" else prompt_index, 0),
        ):
            at_least(f"RolloutEvaluation.{name}", value, low)
        if video_fps > MAX_GIF_FPS:
            raise ConfigError("RolloutEvaluation.video_fps", f"must be <= {MAX_GIF_FPS} (GIF delays are "
                              "whole centiseconds; viewers slow delays under 20 ms to 100 ms)", video_fps)
        self.every_n_updates, self.episodes, self.num_envs = every_n_updates, episodes, num_envs
        self.vectorization, self.max_steps, self.seed = vectorization, max_steps, seed
        self.test_options = TestOptions(test_episodes, test_seen, expert_reference, prompt_index,
                                        prompts_from, prompt_swap, output, video_episodes)  # fmt: skip
        self.video_episodes = video_episodes  # during fit
        self.recorder = VideoRecorder(
            seed, video_size, video_camera, video_stride, video_fps, max_steps or 500
        )
        self.results: list[TaskResult] = []
        self.history: list[dict[str, Any]] = []  # every evaluation during fit; saved in checkpoints
        self.matrix: list[list[float]] | None = None
        self.json_path: Path | None = None
        self._envs: dict[tuple[str, int], gym.vector.VectorEnv] = {}

    @contextmanager
    def testing(self, options: TestOptions) -> Iterator[None]:
        """Run the tests inside this block with ``options`` instead of :attr:`test_options`."""
        saved, self.test_options = self.test_options, options
        try:
            yield
        finally:
            self.test_options = saved

    def _envs_for(self, task: str, n_episodes: int) -> gym.vector.VectorEnv | None:
        """The task's vector env, built once (an env takes ~0.6 s to build) and reused by every evaluation."""
        if n_episodes == 0:
            return None
        key = (task, min(self.num_envs, n_episodes))
        if key not in self._envs:
            self._envs[key] = make_eval_envs(task, key[1], self.seed, self.vectorization)
        return self._envs[key]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for envs in self._envs.values():
            envs.close()
        self._envs.clear()
        self.recorder.close()

    def _tasks(self, trainer: L.Trainer, seen: bool) -> list[tuple[str, str]]:
        """(task, split): the targets and unseen tasks, and the other seen tasks if ``seen``."""
        dm, targets = trainer.datamodule, getattr(trainer.datamodule, "target_tasks", [])
        split = [(t, "target" if t in targets else "seen") for t in dm.seen_tasks if seen or t in targets]
        return split + [(t, "unseen") for t in dm.unseen_tasks]

    def _agent(
        self, pl_module: Any, seed: int, prompt_index: int | Literal["all"],
        sources: Mapping[str, tuple[str, str]] | None = None,
    ) -> list[PolicyFn]:  # fmt: skip
        """The module's policy once per prompt trajectory it runs with (all of them with ``all``)."""
        if prompt_index != "all":
            pl_module.task_bank.check_prompt_index(prompt_index, hint=", or all")
        indices = range(pl_module.task_bank.n_prompts) if prompt_index == "all" else [prompt_index]
        return [module_policy(pl_module, int(p), seed, sources) for p in indices]

    def evaluate(
        self, trainer: L.Trainer, policies: Policies, tasks: Tasks, episodes: int
    ) -> list[TaskResult]:
        """:func:`~llmdpd_pl.evaluation.count_episodes` on this rank's shard of ``episodes``, summed over
        ranks, as rows (the same on every rank)."""
        ids = shard(episodes, trainer.global_rank, trainer.world_size)
        quiet = trainer.global_rank != 0 or trainer.progress_bar_callback is None  # the trainer's setting
        bar = tqdm(total=rollout_steps(tasks, len(ids), len(policies), self.max_steps), desc="eval",
                   unit="step", disable=quiet, leave=False, mininterval=PROGRESS_INTERVAL)  # fmt: skip
        local = count_episodes(policies, tasks, ids, self.num_envs, self.seed, self.max_steps, self._envs_for,
                               bar, partial(_stop_on_sigterm, trainer))  # fmt: skip
        bar.close()
        summed = trainer.strategy.reduce(torch.as_tensor(local).to(trainer.strategy.root_device), "sum")
        return as_rows(list(policies), tasks, summed.cpu().numpy())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_updates or pl_module.updates % self.every_n_updates:
            return
        agent = self._agent(pl_module, self.seed + pl_module.updates, self.test_options.prompt_index)
        rows = self.evaluate(trainer, {"agent": agent}, self._tasks(trainer, seen=True), self.episodes)
        self.history += [{"updates": pl_module.updates, **asdict(r)} for r in rows]
        metrics: dict[str, float] = {f"eval/{r.split}/{r.task}/return": r.mean_return for r in rows}
        for r in rows:
            named = (("success", r.success_rate), ("normalized_score", r.normalized_score))
            metrics |= {f"eval/{r.split}/{r.task}/{k}": v for k, v in named if v is not None}
        metrics.update({f"eval/{split}/success": mean for split, mean in mean_success(rows).items()})
        # Logged step metrics reach the loggers only when step % log_every_n_steps == 0: write to them
        # directly, at this batch's step; log_dict fills callback_metrics (for ModelCheckpoint's monitor).
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)
        step = pl_module.updates - 1  # Lightning's step of this batch's train metrics: batches before it
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.video_episodes and trainer.is_global_zero:
            directory = Path(trainer.log_dir or ".") / "videos" / f"update{pl_module.updates}"
            self.recorder.record(agent[0], self._tasks(trainer, seen=True), self.video_episodes, directory,
                                 "eval", step, sinks(trainer))  # fmt: skip

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Condition the restored model on the config's prompts, or check the checkpoint's banks' tasks."""
        bank, given = pl_module.task_bank, trainer.datamodule.task_prompts
        if self.test_options.prompts_from == "checkpoint":
            tested = self._tasks(trainer, self.test_options.seen)
            if missing := [t for t, _ in tested if t not in bank.task_names]:
                raise ConfigError("prompts_from", f"the checkpoint's task banks lack {missing} (they hold "
                                  f"{list(bank.task_names)}); --prompts_from config gives them", "checkpoint")
            return
        if bank.llm is not None and given.llm is not None and pl_module.policy.uses_text:
            check_same_llm(bank.llm, given.llm)
        # The observation statistics are the training data's, restored with the weights.
        bank.fill(given, bank.obs_mean.clone(), bank.obs_std.clone(), len(trainer.datamodule.seen_tasks))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        opts = self.test_options
        tasks = self._tasks(trainer, seen=opts.seen)
        agent = self._agent(pl_module, self.seed, opts.prompt_index)
        rows = self.evaluate(trainer, {"agent": agent}, tasks, opts.episodes)
        for name, policy, scripted in reference_policies(tasks) if opts.expert else []:
            rows += self.evaluate(trainer, {name: [policy]}, scripted, opts.episodes)
        self.results = rows
        for split, mean in mean_success(rows).items():
            pl_module.log(f"test/{split}/success", mean)
        matrix_rows = self._prompt_matrix(trainer, pl_module, tasks, opts) if opts.prompt_swap else None
        if not trainer.is_global_zero:
            return
        log_dir, names = Path(trainer.log_dir or "."), [t for t, _ in tasks]
        videos = None
        if opts.videos:
            # A fresh policy with the scored run's seed: the videos do not depend on how many
            # scored episodes ran before them, and those ran before the videos, unchanged by them.
            videos = self.recorder.record(self._agent(pl_module, self.seed, opts.prompt_index)[0], tasks,
                                          opts.videos, log_dir / "videos" / "test", "test", pl_module.updates,
                                          sinks(trainer))  # fmt: skip
        meta = results_record(opts, pl_module, names, self.seed, self.max_steps, trainer.ckpt_path,
                              trainer.world_size, self.history, run_record(trainer.callbacks))  # fmt: skip
        self.json_path = write_json(rows, Path(opts.output or log_dir / "test_results.json"), meta, videos)
        print(format_results(rows))
        if matrix_rows is not None and opts.prompt_swap is not None:
            self.matrix = report_matrix(matrix_rows, names, opts.prompt_swap, log_dir,
                                        {**meta, "episodes_per_cell": opts.episodes}, sinks(trainer),
                                        pl_module.updates)  # fmt: skip
        if videos is not None:
            print(f"videos: {log_dir / 'videos' / 'test'}")

    def _prompt_matrix(self, trainer: L.Trainer, pl_module: Any, tasks: Tasks, opts: TestOptions) -> Any:
        """One row per (environment task, prompt source): each task's episodes under every task's prompts."""
        names = [t for t, _ in tasks]
        agents = {u: self._agent(pl_module, self.seed, opts.prompt_index,
                                 prompt_sources(names, u, opts.prompt_swap)) for u in names}  # fmt: skip
        rows = self.evaluate(trainer, agents, tasks, opts.episodes)
        return [replace(r, policy="agent", prompt_source=r.policy) for r in rows]
