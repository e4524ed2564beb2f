"""Gymnasium MuJoCo locomotion (D4RL's suite): env ids, the D4RL normalised score, medium-level targets.

A locomotion task is named by its Gymnasium id, e.g. ``"Hopper-v5"``. Its metric is the episode return
and D4RL's normalised score ``100 · (R − R_min) / (R_max − R_min)``, with D4RL's reference returns
(``d4rl/infos.py``: a random policy's and an expert's) for the three envs of the paper's Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class Reference:
    """D4RL's reference returns of one env family, and the SAC stopping rule of its "medium" data.

    Args:
        min_score: Return of a random policy (``REF_MIN_SCORE``).
        max_score: Return of an expert (``REF_MAX_SCORE``).
        medium_return: Deterministic evaluation return at which the behaviour SAC stops: about a third
            of expert, D4RL's "medium" (the exact threshold was never published).
        max_steps: Step cap of the behaviour SAC.
    """

    min_score: float
    max_score: float
    medium_return: float
    max_steps: int


#: env family (the id's name, lower case) → D4RL reference
REFERENCES: dict[str, Reference] = {
    "halfcheetah": Reference(-280.178953, 12135.0, 4800.0, 200_000),
    "hopper": Reference(-20.272305, 3234.3, 1600.0, 400_000),
    "walker2d": Reference(1.629008, 4592.3, 2900.0, 300_000),
}


def family(env_id: str) -> str:
    """``"Hopper-v5"`` → ``"hopper"``: the D4RL name of an env id."""
    return env_id.split("/")[-1].split("-v")[0].lower()


def is_gym_env(env_id: str) -> bool:
    """True if ``env_id`` is a registered Gymnasium id (any suite: MuJoCo, classic control, ...)."""
    return env_id in gym.registry


def reference(env_id: str) -> Reference | None:
    """The D4RL reference of ``env_id``'s family, or None for envs D4RL has no constants for."""
    return REFERENCES.get(family(env_id))


def normalized_score(env_id: str, returns: float | np.ndarray) -> float | np.ndarray:
    """D4RL's normalised score: ``100 · (R − R_min) / (R_max − R_min)``.

    Raises:
        ValueError: ``env_id`` has no D4RL reference returns.
    """
    ref = reference(env_id)
    if ref is None:
        raise ValueError(f"{env_id!r} has no D4RL reference returns; known: {sorted(REFERENCES)}")
    return 100.0 * (returns - ref.min_score) / (ref.max_score - ref.min_score)


def make_locomotion(env_id: str, seed: int = 0, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id)``; ``seed`` seeds its action space (episodes are seeded by ``reset(seed=...)``)."""
    env = gym.make(env_id, **kwargs)
    env.action_space.seed(seed)
    return env
