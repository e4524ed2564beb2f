"""``llmdpd collect``: offline Meta-World datasets from the scripted policies, stored as Minari (HDF5).

Per task two Minari datasets are written under ``root`` (the ``MINARI_DATASETS_PATH`` layout):

- ``llmdpd/<task>/train-v<version>``: mixed-quality training data (seen tasks only), one block of
  episodes per :class:`QualityLevel` (expert: little noise; medium: large noise and ε-random actions;
  random: uniform actions);
- ``llmdpd/<task>/prompts-v<version>``: a few behaviour-policy episodes used only as trajectory prompts,
  for seen *and* unseen tasks. They are never mixed into training data.

A dataset is written into a staging folder and moved into place only when complete, so an
interrupted run (even ``kill -9``) never leaves a dataset that passes as complete. Complete datasets
are reused; a corrupt one (a data file that no longer matches its SHA-256) is rebuilt, with a warning.
Each dataset folder holds ``llmdpd.json``: the spec it was built from, per-episode metadata (level,
seed, success, return, length) and the SHA-256 of its data files.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmdpd_pl.data.publish import NewDataset, publish
from llmdpd_pl.data.spec import (
    DatasetSpec,
    Kind,
    QualityLevel,
    corruption,
    is_complete,
    read_metadata,
    remove_stale_staging,
    summarize,
)
from llmdpd_pl.envs import check_task_names
from llmdpd_pl.errors import check_writable
from llmdpd_pl.locomotion import is_gym_env
from llmdpd_pl.utils import PROGRESS_INTERVAL, derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    task: str
    kind: Kind
    spec: DatasetSpec


def _run_episode(
    env: Any, expert: Any, level: QualityLevel, rng: np.random.Generator, max_steps: int
) -> tuple[Any, dict[str, Any]]:
    from minari.data_collector import EpisodeBuffer

    obs, _ = env.reset()
    observations, actions, rewards, successes = [obs], [], [], [0.0]
    terminated = truncated = False
    for t in range(max_steps):
        if rng.random() < level.random_prob:
            action = rng.uniform(-1.0, 1.0, size=4)
        else:
            action = expert(obs) + level.noise_std * rng.standard_normal(4)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        truncated = truncated or t == max_steps - 1
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
        successes.append(float(info["success"]))
        if terminated or truncated:
            break
    n = len(actions)
    buffer = EpisodeBuffer(
        observations=np.asarray(observations),
        actions=np.asarray(actions, dtype=np.float32),
        rewards=np.asarray(rewards),
        terminations=np.r_[np.zeros(n - 1, bool), terminated],
        truncations=np.r_[np.zeros(n - 1, bool), truncated and not terminated],
        infos={"success": np.asarray(successes)},
    )
    stats = {"success": bool(max(successes) > 0), "return": float(sum(rewards)), "length": n}
    return buffer, stats


_PROGRESS: Any = None  # a worker's queue of finished-episode counts, set by _init_worker


def _init_worker(parent: int, progress: Any) -> None:
    """A collection worker: report progress on ``progress``, and exit as soon as ``parent`` has died
    (killed, even by SIGKILL), instead of writing on for a run that no longer exists."""
    global _PROGRESS
    _PROGRESS = progress

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _collect_job(job: _Job, progress: Any = None) -> list[dict[str, Any]]:
    """Collect one (task, kind) dataset and publish it (:func:`~llmdpd_pl.data.publish.publish`)."""
    from llmdpd_pl import hidden_goal
    from llmdpd_pl.envs import make_env, scripted_policy

    warnings.filterwarnings("ignore", module="metaworld")
    spec, task, kind = job.spec, job.task, job.kind
    env_seed = derive_seed(spec.seed, task, kind)
    env = make_env(task, seed=env_seed)
    # A hidden-goal region's expert reads the goal the observation hides.
    expert = hidden_goal.privileged_expert(env) if hidden_goal.is_hidden(task) else scripted_policy(task)
    buffers, episodes, levels = [], [], spec.levels_for(kind, task)
    for name, level in levels.items():
        rng = np.random.default_rng(derive_seed(spec.seed, task, kind, name))
        for i in range(level.episodes):
            buffer, stats = _run_episode(env, expert, level, rng, spec.max_episode_steps)
            buffers.append(buffer)
            episodes.append({"task": task, "level": name, "env_seed": env_seed, "index": i, **stats})
            if (queue := progress or _PROGRESS) is not None:
                queue.put(1)
    sidecar = {"task": task, "kind": kind, "recipe": spec.recipe(kind, task), "episodes": episodes}
    description = (f"Meta-World v3 {task}: {kind} data from the scripted policy with noise levels "
                   + ", ".join(f"{n}={asdict(lv)}" for n, lv in levels.items()))  # fmt: skip
    try:
        publish(Path(spec.root).resolve(), [NewDataset(spec.dataset_id(task, kind), buffers, sidecar, {
            "env": env, "eval_env": env.spec,  # evaluation runs on the env that collected the data
            "algorithm_name": f"metaworld-scripted+noise ({kind})", "description": description,
            "data_format": "hdf5"})])  # fmt: skip
    finally:
        env.close()
    return summarize(episodes, kind)


def _reusable(spec: DatasetSpec, job: _Job) -> bool:
    """True if the job's dataset is complete and intact. A corrupt one is deleted, to be rebuilt; one built
    from another spec is a :class:`~llmdpd_pl.errors.ConfigError` (a dataset id is never overwritten)."""
    path = spec.path(job.task, job.kind)
    if path.exists() and (problem := corruption(path)) is not None:
        dataset_id = spec.dataset_id(job.task, job.kind)
        log.warning("collect: dataset %s at %s is corrupt (%s); rebuilding it", dataset_id, path, problem)
        shutil.rmtree(path)
    return is_complete(spec, job.task, job.kind)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary rows as a table; success is "-" on locomotion tasks, which have no success."""
    w = max([20, *(len(r["task"]) + 2 for r in rows)])  # the task column fits the longest name
    header = f"{'task':<{w}}{'kind':<9}{'level':<15}{'episodes':>9}{'transitions':>12}{'success':>9}"
    header += f"{'return':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        success = "-" if is_gym_env(r["task"]) else f"{100 * r['success_rate']:.1f}%"
        lines.append(
            f"{r['task']:<{w}}{r['kind']:<9}{r['level']:<15}{r['episodes']:>9}{r['transitions']:>12}"
            f"{success:>9}{r['mean_return']:>10.1f}"
        )
    return "\n".join(lines)


def collect(
    spec: DatasetSpec, train_tasks: Sequence[str], prompt_tasks: Sequence[str], progress: bool = True
) -> list[dict[str, Any]]:
    """Build every missing or corrupt dataset; return the summary rows of all (new and reused) datasets.

    Meta-World tasks' datasets come from the scripted policies, in ``spec.workers`` processes; a
    locomotion task's two datasets come from one SAC run (:func:`llmdpd_pl.data.sac.collect_medium_replay`,
    resumable), in this process.

    Args:
        spec: Dataset spec.
        train_tasks: Tasks that need training data (the seen tasks).
        prompt_tasks: Tasks that need trajectory prompts (seen and unseen).
        progress: Show a tqdm bar over episodes (SAC: over env steps).
    """
    sac_rows = [row for task in dict.fromkeys([*train_tasks, *prompt_tasks]) if is_gym_env(task)
                for row in _medium_replay(spec, task, progress)]  # fmt: skip
    train_tasks = [t for t in train_tasks if not is_gym_env(t)]
    prompt_tasks = [t for t in prompt_tasks if not is_gym_env(t)]
    check_task_names(train_tasks, "train_tasks")
    check_task_names(prompt_tasks, "prompt_tasks")
    wanted = [_Job(t, "train", spec) for t in train_tasks] + [_Job(t, "prompts", spec) for t in prompt_tasks]
    todo = [job for job in wanted if not _reusable(spec, job)]
    if todo:
        check_writable("data.dataset.root", spec.root)  # before any episode is run
        if stale := remove_stale_staging(Path(spec.root)):
            log.warning("collect: removed %d staging folders of runs that died: %s", len(stale), stale)
    total = sum(sum(lv.episodes for lv in spec.levels_for(j.kind, j.task).values()) for j in todo)
    if todo:
        bar = tqdm(
            total=total, desc="collect", unit="ep", disable=not progress, mininterval=PROGRESS_INTERVAL
        )
        if spec.workers == 1 or len(todo) == 1:
            for job in todo:
                _collect_job(job)
                bar.update(sum(lv.episodes for lv in spec.levels_for(job.kind, job.task).values()))
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            with ProcessPoolExecutor(min(spec.workers, len(todo)), ctx, initializer=_init_worker,
                                     initargs=(os.getpid(), queue)) as pool:  # fmt: skip
                futures = [pool.submit(_collect_job, job) for job in todo]
                done = 0
                while done < total:
                    if any(f.done() and f.exception() is not None for f in futures):
                        break
                    try:
                        done += queue.get(timeout=1.0)
                        bar.update(1)
                    except queue_module.Empty:
                        continue
                for f in futures:
                    f.result()  # re-raise a worker's error here
        bar.close()
    rows: list[dict[str, Any]] = sac_rows
    for job in wanted:
        rows += summarize(read_metadata(spec.path(job.task, job.kind))["episodes"], job.kind)
    return rows


def _medium_replay(spec: DatasetSpec, task: str, progress: bool) -> list[dict[str, Any]]:
    """The summary rows of a locomotion task's SAC datasets, made first if missing."""
    from llmdpd_pl.data.sac import collect_medium_replay  # stable-baselines3 only where it is used

    train, prompts = spec.dataset_id(task, "train"), spec.dataset_id(task, "prompts")
    done = collect_medium_replay(task, spec.sac, spec.seed, Path(spec.root), train, prompts,
                                 spec.prompt_episodes, progress)  # fmt: skip
    return list(done["rows"])
