"""The two task suites, told apart by the task's name: a few functions, not a framework.

- ``metaworld``: a Meta-World v3 task name without ``-v3`` (``"box-close"``), or a hidden-goal reach
  region (``"hidden-reach-left-far-high"``, :mod:`llmdpd_pl.hidden_goal`); metric: success rate.
- ``locomotion``: any registered Gymnasium id (``"Hopper-v5"``); metric: return, and D4RL's normalised
  score where D4RL has reference returns (:mod:`llmdpd_pl.locomotion`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any, Literal

import gymnasium as gym

from llmdpd_pl import envs, hidden_goal
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.locomotion import is_gym_env, make_locomotion

Suite = Literal["metaworld", "locomotion"]


def _suite(task: str) -> Suite | None:
    """``metaworld`` for a Meta-World task name, ``locomotion`` for a Gymnasium id, None else."""
    if task in envs.TASKS:
        return "metaworld"
    return "locomotion" if is_gym_env(task) else None


def suite_of(task: str) -> Suite:
    """The suite of ``task`` (see :func:`_suite`); ``ValueError`` for an unknown task."""
    if (suite := _suite(task)) is None:
        raise ValueError(f"unknown task {task!r}")
    return suite


def check_tasks(names: Iterable[str], field: str) -> list[str]:
    """``names`` as a list, or a :class:`ConfigError` naming ``field``, the name and close matches."""
    known = list(envs.TASKS) + [k for k in gym.registry if k.endswith("-v5")]
    return envs.check_names(names, field, lambda t: _suite(t) is not None, known,
                            "unknown task {name!r}.{hint} A task is a Meta-World v3 name without '-v3' "
                            "(e.g. 'box-close') or a Gymnasium env id (e.g. 'Hopper-v5')")  # fmt: skip


def make_env(task: str, seed: int = 0, **kwargs: Any) -> gym.Env:
    """One env of ``task``."""
    if suite_of(task) == "metaworld":
        return envs.make_env(task, seed=seed, **kwargs)
    return make_locomotion(task, seed=seed, **kwargs)


@cache
def dims(task: str) -> tuple[int, int]:
    """(observation width, action width) of ``task``'s env; actions must lie in [-1, 1]."""
    if suite_of(task) == "metaworld":
        return envs.OBS_DIM, envs.ACT_DIM  # every task's (pinned by the tests), without building 50 envs
    env = make_env(task)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if (
        not isinstance(act_space, gym.spaces.Box)
        or (act_space.low != -1).any()
        or (act_space.high != 1).any()
    ):
        raise ConfigError("data.seen_tasks", f"the policy acts in [-1, 1]^A, but {task}'s action space is "
                          f"{act_space}", task)  # fmt: skip
    assert obs_space.shape is not None and act_space.shape is not None
    return int(obs_space.shape[0]), int(act_space.shape[0])


@cache
def episode_steps(task: str) -> int:
    """Steps of a full episode: Meta-World's 500 (a hidden-goal region's 150), or the env's registered
    ``max_episode_steps``."""
    if suite_of(task) == "metaworld":
        return hidden_goal.EPISODE_STEPS if hidden_goal.is_hidden(task) else envs.MAX_EPISODE_STEPS
    steps = gym.spec(task).max_episode_steps
    if steps is None:
        raise ConfigError("data.seen_tasks", "the env has no max_episode_steps; register it with a time "
                          "limit", task)  # fmt: skip
    return int(steps)


def make_eval_envs(
    task: str, num_envs: int, seed: int, vectorization: Literal["sync", "async"] = "sync"
) -> gym.vector.VectorEnv:
    """``num_envs`` evaluation envs of ``task``, SAME_STEP autoreset; episode ``i`` is ``reset(seed=i)``."""
    if suite_of(task) == "metaworld":
        return envs.make_eval_envs(task, num_envs, seed, vectorization)
    return envs.vector_env([lambda: make_locomotion(task, seed=seed) for _ in range(num_envs)], vectorization)
