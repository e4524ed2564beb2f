"""What a dataset is built from: quality levels, the dataset spec, and the metadata that says a dataset
on disk is complete and was built from a given spec.

Per task two Minari datasets live under ``root`` (the ``MINARI_DATASETS_PATH`` layout):
``llmdpd/<task>/train-v<version>`` and ``llmdpd/<task>/prompts-v<version>``. Each folder holds
``llmdpd.json``: the spec's recipe and per-episode metadata (level, seed, success, return, length).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmdpd_pl.envs import check_task_names

Kind = Literal["train", "prompts"]
METADATA_FILE = "llmdpd.json"


@dataclass(frozen=True)
class QualityLevel:
    """One quality level of the behaviour policy: the scripted expert plus noise.

    Args:
        episodes: Episodes collected at this level, per task.
        noise_std: Std of the Gaussian noise added to the expert's action.
        random_prob: Probability ε of replacing the action by a uniform random one, per step.
    """

    episodes: int
    noise_std: float = 0.0
    random_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.episodes < 0:
            raise ValueError(f"data.dataset.levels: episodes must be >= 0, got {self.episodes}")
        if self.noise_std < 0:
            raise ValueError(f"data.dataset.levels: noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.random_prob <= 1.0:
            raise ValueError(f"data.dataset.levels: random_prob must be in [0, 1], got {self.random_prob}")


def default_levels() -> dict[str, QualityLevel]:
    """Mixed quality, so that Q-learning has something to improve on over behaviour cloning."""
    return {
        "expert": QualityLevel(episodes=50, noise_std=0.1),
        "medium": QualityLevel(episodes=50, noise_std=0.5, random_prob=0.3),
        "random": QualityLevel(episodes=25, random_prob=1.0),
    }


@dataclass(frozen=True)
class DatasetSpec:
    """Where the offline data lives and how it is generated.

    Args:
        root: Folder of the Minari datasets (``MINARI_DATASETS_PATH`` layout).
        version: Dataset version ``v<version>`` in the ids. Bump it when you change the spec:
            a dataset id is never overwritten.
        seed: Base seed; every (task, kind) derives its own env-layout and noise seeds from it.
        levels: Quality levels of the training data (name → level).
        task_levels: Per-task replacements of ``levels`` (task → name → level), e.g. only low-quality
            episodes for the target tasks of the low-quality-target protocol.
        prompt_episodes: Trajectory-prompt episodes per task.
        prompt_noise_std: Action-noise std of the prompt behaviour policy.
        max_episode_steps: Episode length (Meta-World truncates at 500).
        workers: Worker processes for collection (one job per task and kind).
    """

    root: str = "data/minari"
    version: int = 0
    seed: int = 0
    levels: dict[str, QualityLevel] = field(default_factory=default_levels)
    task_levels: dict[str, dict[str, QualityLevel]] = field(default_factory=dict)
    prompt_episodes: int = 5
    prompt_noise_std: float = 0.1
    max_episode_steps: int = 500
    workers: int = 2

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"data.dataset.version must be >= 0, got {self.version}")
        if self.prompt_episodes < 1:
            raise ValueError(f"data.dataset.prompt_episodes must be >= 1, got {self.prompt_episodes}")
        if not 1 <= self.max_episode_steps <= 500:
            raise ValueError(
                f"data.dataset.max_episode_steps must be in [1, 500], got {self.max_episode_steps}"
            )
        if self.workers < 1:
            raise ValueError(f"data.dataset.workers must be >= 1, got {self.workers}")
        if sum(lv.episodes for lv in self.levels.values()) < 1:
            raise ValueError(f"data.dataset.levels: need at least one episode in total, got {self.levels}")
        check_task_names(self.task_levels, "data.dataset.task_levels")
        for task, levels in self.task_levels.items():
            if sum(lv.episodes for lv in levels.values()) < 1:
                raise ValueError(f"data.dataset.task_levels.{task}: need at least one episode, got {levels}")

    def dataset_id(self, task: str, kind: Kind) -> str:
        return f"llmdpd/{task}/{kind}-v{self.version}"

    def path(self, task: str, kind: Kind) -> Path:
        return Path(self.root) / self.dataset_id(task, kind)

    def levels_for(self, kind: Kind, task: str) -> dict[str, QualityLevel]:
        """The quality levels of ``task``'s dataset of ``kind``."""
        if kind == "prompts":
            return {"prompt": QualityLevel(self.prompt_episodes, noise_std=self.prompt_noise_std)}
        return dict(self.task_levels.get(task, self.levels))

    def recipe(self, kind: Kind, task: str) -> dict[str, Any]:
        """Everything that changes a dataset's content; stored with it and checked on reuse."""
        levels = {name: asdict(level) for name, level in self.levels_for(kind, task).items()}
        return {"seed": self.seed, "max_episode_steps": self.max_episode_steps, "levels": levels}


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``llmdpd.json`` of a complete dataset, or a ``ValueError`` that says what is wrong."""
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"dataset at {path} is missing or incomplete (no {METADATA_FILE}); run `llmdpd collect` first"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"dataset at {path}: corrupt {METADATA_FILE} ({err}); delete the folder and re-collect"
        ) from None
    if not isinstance(meta, dict) or "recipe" not in meta or "episodes" not in meta:
        raise ValueError(
            f"dataset at {path}: {METADATA_FILE} lacks 'recipe'/'episodes'; delete and re-collect"
        )
    return meta


def is_complete(spec: DatasetSpec, task: str, kind: Kind) -> bool:
    """True if the dataset exists and was built from this spec; ``ValueError`` if built from another."""
    path = spec.path(task, kind)
    if not path.exists():
        return False
    meta = read_metadata(path)
    if (recipe := spec.recipe(kind, task)) != meta["recipe"]:
        raise ValueError(
            f"dataset {spec.dataset_id(task, kind)} at {path} was built from a different spec "
            f"({meta['recipe']} != {recipe}). Bump data.dataset.version or delete the folder."
        )
    return True
