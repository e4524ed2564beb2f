"""Hidden-goal reach: Meta-World ``reach`` whose goal is a named region of space and absent from the
observation, so that the prompt is the only way to know the task (protocol P4, a positive control).

A task is one goal region, named by three words, one per axis: ``hidden-reach-<x>-<y>-<z>`` with x in
``left / centre / right`` (−x / 0 / +x), y in ``near / far`` (towards / away from the robot's base) and z
in ``low / high``: 12 tasks. Each episode draws its goal uniformly from a cube of half-width
:data:`JITTER` around the region's centre (:data:`CENTRES`). As in Meta-World's meta-learning benchmarks
(ML1, ML10, ML45), the environment is *partially observable*: the goal's three coordinates in the
observation are zero. The goal is a public attribute of :class:`HiddenGoalReach`, which only the
data-collecting expert reads (:func:`privileged_expert`).

Two scripted references bound what a policy can do from the observation and the prompt:

- :func:`region_expert`, the expert sent to the region's centre: the best a policy that knows only the
  region can do (the ``expert`` row of ``llmdpd test``);
- :func:`blind_expert`, the expert sent to the centre of all regions: the best a policy that knows nothing
  can do (the ``expert-blind`` row).

The text prompt of every region comes from one template (:func:`text_prompt`), so that a held-out region's
text is a new combination of words seen in training.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import metaworld
import numpy as np
from metaworld.policies import SawyerReachV3Policy

PREFIX = "hidden-reach-"
#: Region centre per axis word (metres, Meta-World's frame).
AXES: tuple[dict[str, float], ...] = (
    {"left": -0.25, "centre": 0.0, "right": 0.25},
    {"near": 0.6, "far": 0.85},
    {"low": 0.1, "high": 0.3},
)
JITTER = 0.01  # half-width of the cube a region's goals are drawn from: corner 1.7 cm from the centre
SUCCESS_RADIUS = 0.05  # Meta-World reach: success when the gripper is within 5 cm of the goal
EPISODE_STEPS = 150  # the scripted expert reaches the farthest region in about 60 steps
PUCK = np.array([0.0, 0.4, 0.02])  # reach's unused puck, fixed: nothing in the state tells the goal (and
# Meta-World loops forever unless it lies 15 cm or more from the goal in x-y)
GOAL_SLICE = slice(36, 39)  # the goal's coordinates in Meta-World's 39-wide observation

WORDS: dict[str, tuple[str, str, str]] = {
    f"{PREFIX}{x}-{y}-{z}": (x, y, z) for x, y, z in itertools.product(*(list(a) for a in AXES))
}
#: The 12 hidden-goal tasks.
TASKS: tuple[str, ...] = tuple(WORDS)
CENTRES: dict[str, np.ndarray] = {
    t: np.array([axis[w] for axis, w in zip(AXES, ws, strict=True)]) for t, ws in WORDS.items()
}
ALL_CENTRE = np.mean(list(CENTRES.values()), axis=0)


def is_hidden(task: str) -> bool:
    return task in WORDS


def text_prompt(task: str) -> dict[str, str]:
    """The region's structured prompt, one template for all: only the three region words differ."""
    x, y, z = WORDS[task]
    return {
        "task": "Reach a hidden goal",
        "objective": f"Move the gripper to the {y} {x} of the table, {z} above it. Success when the "
        "gripper is within 5 cm of the goal.",
        "constraints": f"The goal is not shown; only its region is known: the {y} {x} of the table, {z} "
        "above it. Go there directly and hold the gripper still.",
    }


class HiddenGoalReach(gym.Wrapper):
    """Meta-World ``reach-v3`` with its goal drawn in ``task``'s region and zeroed in the observation.

    ``reset(seed=i)`` draws episode ``i``'s goal from a generator seeded by (construction seed, i), so an
    evaluation episode is reproducible; ``reset()`` draws the next goal from the construction seed's
    stream. The current goal is :attr:`goal`.
    """

    def __init__(self, task: str, seed: int = 0, **kwargs: Any) -> None:
        # The raw env, not make_mt_envs: its 50 preset goals take 0.8 s to build, and we set the goal.
        self.reach = metaworld.ALL_V3_ENVIRONMENTS["reach-v3"](**kwargs)
        super().__init__(gym.wrappers.TimeLimit(self.reach, EPISODE_STEPS))
        self.task, self.seed, self.centre = task, seed, CENTRES[task]
        self._rng = np.random.default_rng([seed, 0])
        self.goal = self.centre.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        rng = self._rng if seed is None else np.random.default_rng([self.seed, 1, seed])
        self.goal = self.centre + rng.uniform(-JITTER, JITTER, size=3)
        data = {"env_cls": type(self.reach), "rand_vec": np.r_[PUCK, self.goal], "partially_observable": True}
        self.reach.set_task(metaworld.Task(env_name="reach-v3", data=pickle.dumps(data)))
        return self.env.reset(options=options)


def make_env(task: str, seed: int = 0, **kwargs: Any) -> HiddenGoalReach:
    return HiddenGoalReach(task, seed, **kwargs)


def _aimed(goal: Callable[[], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted reach expert, heading for ``goal()`` instead of the observed goal."""
    policy = SawyerReachV3Policy()

    def act(obs: np.ndarray) -> np.ndarray:
        seen = np.array(obs, dtype=np.float64)
        seen[GOAL_SLICE] = goal()
        return np.clip(policy.get_action(seen), -1.0, 1.0).astype(np.float32)

    return act


def privileged_expert(env: gym.Env) -> Callable[[np.ndarray], np.ndarray]:
    """The expert that reads the true goal from the env (data collection only)."""
    return _aimed(lambda: env.get_wrapper_attr("goal"))


def region_expert(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """The expert sent to ``task``'s region centre: what a policy that knows only the region can do."""
    return _aimed(lambda: CENTRES[task])


def blind_expert() -> Callable[[np.ndarray], np.ndarray]:
    """The expert sent to the centre of all regions: what a policy that knows nothing can do."""
    return _aimed(lambda: ALL_CENTRE)
