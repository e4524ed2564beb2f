"""Meta-World v3 environments: task names, factories and the scripted expert policies.

Every task is built through :func:`make_metaworld`, which is registered with gymnasium under the
**string** entry point ``llmdpd_pl.envs:make_metaworld`` (id :data:`ENV_ID`). Meta-World registers its
own ids with lambdas, which Minari cannot serialise; ours lets ``dataset.recover_environment()`` work.

Pitfalls pinned by ``tests/test_envs.py``: ``reset(seed=...)`` is ignored by Meta-World, so all randomness
comes from the ``seed`` given at construction; scripted policies return unclipped actions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import gymnasium as gym
import metaworld
import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from llmdpd_pl import hidden_goal
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.utils import derive_seed

ENV_ID = "llmdpd/MetaWorld-v3"
#: The 50 Meta-World v3 task names, without the ``-v3`` suffix.
METAWORLD_TASKS: tuple[str, ...] = tuple(sorted(n.removesuffix("-v3") for n in metaworld.ALL_V3_ENVIRONMENTS))
#: Every task this module builds: the 50, then the 12 hidden-goal regions (:mod:`llmdpd_pl.hidden_goal`).
TASKS: tuple[str, ...] = (*METAWORLD_TASKS, *hidden_goal.TASKS)
OBS_DIM = 39
ACT_DIM = 4
MAX_EPISODE_STEPS = 500


def check_names(
    names: Iterable[str], field: str, known: Callable[[str], bool], candidates: Sequence[str], unknown: str
) -> list[str]:
    """``names`` as a list, or a :class:`ConfigError` naming ``field``: for duplicates, or for the first
    name not ``known``, with message ``unknown`` (a template of ``name`` and ``hint``, the close
    ``candidates``)."""
    names = list(names)
    for name in names:
        if not known(name):
            close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(field, unknown.format(name=name, hint=hint), names)
    if len(set(names)) != len(names):
        raise ConfigError(field, "duplicate task names", names)
    return names


def check_task_names(names: Iterable[str], field: str) -> list[str]:
    """:func:`check_names` for Meta-World task names (:data:`TASKS`) only."""
    return check_names(names, field, TASKS.__contains__, TASKS,
                       "unknown Meta-World task {name!r}.{hint} Names are the v3 tasks without the '-v3' "
                       "suffix, e.g. 'box-close', or a hidden-goal region, e.g. 'hidden-reach-left-far-high'")


def make_metaworld(task: str, seed: int = 0, **kwargs: Any) -> gym.Env:
    """Build one Meta-World v3 task (500-step episodes, success in ``info['success']``).

    Args:
        task: Task name without the ``-v3`` suffix, e.g. ``"box-close"``.
        seed: Fixes the 50 object/goal layouts and the order in which ``reset()`` visits them.
        **kwargs: Passed to ``metaworld.make_mt_envs`` (e.g. ``render_mode``, ``camera_name``).
    """
    check_task_names([task], "task")
    if hidden_goal.is_hidden(task):
        return hidden_goal.make_env(task, seed=seed, **kwargs)
    env = metaworld.make_mt_envs(f"{task}-v3", seed=seed, **kwargs)
    assert isinstance(env, gym.Env)  # one task name gives one env, not a vector env
    return env


def register_envs() -> None:
    """Register :data:`ENV_ID` with a string entry point (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="llmdpd_pl.envs:make_metaworld", disable_env_checker=True)


def make_env(task: str, seed: int = 0, **kwargs: Any) -> gym.Env:
    """``gym.make`` through the registered id, so the spec is serialisable."""
    register_envs()
    return gym.make(ENV_ID, task=task, seed=seed, **kwargs)


def scripted_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """The task's Meta-World scripted expert, with actions clipped to [-1, 1] (they are not, raw); for a
    hidden-goal region, the expert sent to the region's centre (the observation has no goal)."""
    check_task_names([task], "task")
    if hidden_goal.is_hidden(task):
        return hidden_goal.region_expert(task)
    policy = ENV_POLICY_MAP[f"{task}-v3"]()

    def act(obs: np.ndarray) -> np.ndarray:
        return np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32)

    return act


def split_overlap(seen: Sequence[str], unseen: Sequence[str]) -> list[str]:
    """Tasks that are both seen and unseen (leaks the test set)."""
    return sorted(set(seen) & set(unseen))


class LayoutReset(gym.Wrapper):
    """``reset(seed=i)`` puts the task in object/goal layout ``i mod 50``; ``reset()`` keeps the layout."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        selector = env
        while not hasattr(selector, "tasks"):
            selector = selector.env  # the RandomTaskSelectWrapper holds the 50 layouts
        selector.toggle_sample_tasks_on_reset(False)
        self.layouts = selector.tasks

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        if seed is not None:
            self.env.unwrapped.set_task(self.layouts[seed % len(self.layouts)])
        return self.env.reset(options=options)


def layout_seed(seed: int, task: str) -> int:
    """Construction seed of a task's evaluation envs (a layout set disjoint from the training data's)."""
    return derive_seed(seed, task, "eval")


def vector_env(
    fns: Sequence[Callable[[], gym.Env]], vectorization: Literal["sync", "async"]
) -> gym.vector.VectorEnv:
    """The envs made by ``fns`` as one vector env with SAME_STEP autoreset (``async``: a process each)."""
    mode = gym.vector.AutoresetMode.SAME_STEP
    if vectorization == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="spawn")
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


def make_eval_envs(
    task: str, num_envs: int, seed: int, vectorization: Literal["sync", "async"] = "sync", **kwargs: Any
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``task`` with the evaluation layout set, SAME_STEP autoreset."""
    env_seed = layout_seed(seed, task)
    if hidden_goal.is_hidden(task):  # reset(seed=i) draws episode i's goal itself
        fns = [lambda: make_env(task, seed=env_seed, **kwargs) for _ in range(num_envs)]
    else:
        fns = [lambda: LayoutReset(make_env(task, seed=env_seed, **kwargs)) for _ in range(num_envs)]
    return vector_env(fns, vectorization)
