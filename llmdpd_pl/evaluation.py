"""Evaluation as functions: policies, tasks and episode ids go in; counts, rows and a record come out.

* :func:`count_episodes` runs this process's episodes of every (policy, task) pair;
* :func:`as_rows` turns counts (summed over DDP ranks by the caller) into the results table;
* :func:`results_record` builds a results JSON's ``meta``, in one place;
* :class:`TestOptions` are what ``llmdpd test`` runs.

:class:`~llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation` only schedules these, during fit and at
test, and logs their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from llmdpd_pl.acting import conditioning_record
from llmdpd_pl.prompt_matrix import Swap
from llmdpd_pl.rollouts import Counts, PolicyFn, TaskResult, run_episodes
from llmdpd_pl.suites import episode_steps

#: row name → a round robin of policies: episode i runs with the ``i mod len``-th.
Policies = Mapping[str, Sequence[PolicyFn]]
#: (task, split) pairs, the split being ``seen``, ``target`` or ``unseen``.
Tasks = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class TestOptions:
    """What ``llmdpd test`` runs: ``RolloutEvaluation``'s ``test_*`` arguments, which the command's own
    (``--episodes``, ``--seen``, ...) override.

    Attributes:
        episodes: Episodes per task.
        seen: Evaluate the seen tasks too, not only the targets and unseen tasks.
        expert: Add the scripted expert's reference rows.
        prompt_index: The prompt trajectory that conditions every task, or ``all`` (round robin).
        prompts_from: Condition on the config's prompts, or keep the checkpoint's prompt banks.
        prompt_swap: Also run the prompt-sensitivity matrix, swapping these prompts (None: no matrix).
        output: The results JSON's path (None: ``<log_dir>/test_results.json``).
        videos: Episodes per task recorded as videos, besides the scored ones.
    """

    __test__ = False  # not a pytest test class

    episodes: int = 50
    seen: bool = True
    expert: bool = True
    prompt_index: int | Literal["all"] = 0
    prompts_from: Literal["config", "checkpoint"] = "config"
    prompt_swap: Swap | None = None
    output: str | None = None
    videos: int = 0


def rollout_steps(tasks: Tasks, n_episodes: int, n_policies: int, max_steps: int | None) -> int:
    """The most env steps :func:`count_episodes` takes (a progress bar's total)."""
    return n_episodes * n_policies * sum(max_steps or episode_steps(t) for t, _ in tasks)


def count_episodes(
    policies: Policies,
    tasks: Tasks,
    episode_ids: Sequence[int],
    num_envs: int,
    seed: int,
    max_steps: int | None = None,
    envs_for: Callable[[str, int], gym.vector.VectorEnv | None] | None = None,
    progress: tqdm | None = None,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """(len(policies) · len(tasks), 6) float64: the :class:`~llmdpd_pl.rollouts.Counts` of each row name's
    episodes ``episode_ids`` on each task, policies major. ``envs_for(task, n)`` reuses vector envs;
    ``check`` runs before every step and stops the rollouts by raising."""
    local = []
    for robin in policies.values():
        for task, _ in tasks:
            counts, envs = Counts(), envs_for(task, len(episode_ids)) if envs_for else None
            for k, policy in enumerate(robin):
                mine = [i for i in episode_ids if i % len(robin) == k]
                counts += run_episodes(policy, task, mine, num_envs, seed, max_steps, envs=envs,
                                       progress=progress, check=check)  # fmt: skip
            local.append(counts.as_array())
    return np.stack(local).astype(np.float64)


def as_rows(names: Sequence[str], tasks: Tasks, counts: np.ndarray) -> list[TaskResult]:
    """The results rows of :func:`count_episodes`' counts (summed over ranks), in the same order."""
    pairs = [(name, task, split) for name in names for task, split in tasks]
    return [TaskResult.from_counts(t, s, n, Counts.from_array(c.tolist())) for (n, t, s), c in
            zip(pairs, counts, strict=True)]  # fmt: skip


def results_record(
    options: TestOptions,
    module: Any,
    tasks: Sequence[str],
    seed: int,
    max_steps: int | None,
    ckpt_path: str | None,
    world_size: int,
    during_fit: list[dict[str, Any]],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """A results JSON's ``meta``: the test's options, the policy's and its prompts' identity, the
    evaluations during fit, and ``run`` (:func:`~llmdpd_pl.callbacks.provenance.run_record`: the code's
    commit, the training run's provenance and wall time, the resolved config)."""
    hp = module.hparams
    return {
        "episodes_per_task": options.episodes, "prompt_index": options.prompt_index,
        "prompts_from": options.prompts_from, "seed": seed, "max_steps": max_steps, "ckpt_path": ckpt_path,
        "updates": module.updates, "world_size": world_size, "action_selection": hp.action_selection,
        "prompts": hp.prompts, "model_seed": hp.seed, "during_fit": during_fit,
        **conditioning_record(module, tasks, options.prompt_index), **run,
    }  # fmt: skip


__all__ = ["Policies", "Tasks", "TestOptions", "as_rows", "count_episodes", "results_record", "rollout_steps"]
