"""What a dataset is built from: quality levels, the dataset spec, and the metadata that says a dataset
on disk is complete and was built from a given spec.

Per task two Minari datasets live under ``root`` (``MINARI_DATASETS_PATH``'s layout), ``llmdpd/<task>/
{train,prompts}-v<version>``, each with ``llmdpd.json``: the spec's recipe, per-episode metadata (level,
seed, success, return, length) and the SHA-256 of every data file, which :func:`corruption` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmdpd_pl.envs import check_task_names
from llmdpd_pl.errors import ConfigError, at_least, within
from llmdpd_pl.locomotion import family, is_gym_env, reference

Kind = Literal["train", "prompts"]
METADATA_FILE = "llmdpd.json"


@dataclass(frozen=True)
class QualityLevel:
    """One quality level of the behaviour policy: the scripted expert plus noise. Its values are checked by
    the :class:`DatasetSpec` that holds it, which knows the level's config key.

    Args:
        episodes: Episodes collected at this level, per task.
        noise_std: Std of the Gaussian noise added to the expert's action.
        random_prob: Probability ε of replacing the action by a uniform random one, per step.
    """

    episodes: int
    noise_std: float = 0.0
    random_prob: float = 0.0

    def check(self, key: str) -> None:
        """A :class:`~llmdpd_pl.errors.ConfigError` naming ``key.<field>`` for a bad value."""
        at_least(f"{key}.episodes", self.episodes, 0)
        at_least(f"{key}.noise_std", self.noise_std, 0)
        within(f"{key}.random_prob", self.random_prob, 0, 1)


def default_levels() -> dict[str, Any]:
    """Mixed quality, so that Q-learning has something to improve on over behaviour cloning. Written as a
    config writes them, so that jsonargparse can dump the default (not a QualityLevel inside a dict);
    :class:`DatasetSpec` makes them QualityLevels."""
    return {
        "expert": {"episodes": 50, "noise_std": 0.1},
        "medium": {"episodes": 50, "noise_std": 0.5, "random_prob": 0.3},
        "random": {"episodes": 25, "random_prob": 1.0},
    }


@dataclass(frozen=True)
class SACRecipe:
    """How the behaviour SAC is trained and its data recorded (``data.dataset.sac`` in the configs).

    Args:
        medium_return: Stop once the deterministic evaluation return reaches this; None: the env's D4RL
            "medium" level (:func:`llmdpd_pl.locomotion.reference`); ``inf``: train to ``max_steps``.
        max_steps: Env-step cap; None: the env's D4RL cap. The replay buffer holds this many transitions,
            so nothing is ever overwritten.
        eval_every: Env steps between evaluations (and stopping checks).
        eval_episodes: Deterministic evaluation episodes, on a separate env, averaged.
        learning_starts: Uniform-random env steps before the first gradient step. 1000, as in rlkit's
            ``examples/sac.py`` (D4RL's buffers are rlkit snapshots; D4RL published no value), rather than
            SB3's 100 or the 10k of rl-zoo: these random steps become the start of the dataset.
        checkpoint_every: Env steps between checkpoints (taken at the first episode end past each multiple).
        max_episode_steps: Episode cap passed to ``gym.make``; None: the env's own (1000 for MuJoCo).
    """

    medium_return: float | None = None
    max_steps: int | None = None
    eval_every: int = 5000
    eval_episodes: int = 5
    learning_starts: int = 1000
    checkpoint_every: int = 20000
    max_episode_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("eval_every", "eval_episodes", "checkpoint_every", "max_steps", "max_episode_steps"):
            if (value := getattr(self, name)) is not None:
                at_least(f"data.dataset.sac.{name}", value, 1)
        at_least("data.dataset.sac.learning_starts", self.learning_starts, 0)

    def targets(self, env_id: str) -> tuple[float, int]:
        """(medium_return, max_steps) for ``env_id``: the recipe's, else the env's D4RL reference."""
        ref = reference(env_id)
        medium = getattr(ref, "medium_return", None) if self.medium_return is None else self.medium_return
        max_steps = getattr(ref, "max_steps", None) if self.max_steps is None else self.max_steps
        if medium is None or max_steps is None:
            raise ConfigError("data.dataset.sac.medium_return", "must be set, with .max_steps, for an env "
                              "D4RL has no reference returns for", env_id)  # fmt: skip
        return medium, max_steps


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
        max_episode_steps: Episode length of the Meta-World data (Meta-World truncates at 500).
        workers: Worker processes for the Meta-World collection (one job per task and kind).
        sac: How the locomotion tasks' medium-replay data is made (:mod:`llmdpd_pl.data.sac`).
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
    sac: SACRecipe = field(default_factory=SACRecipe)

    def __post_init__(self) -> None:
        levels = {k: QualityLevel(**v) if isinstance(v, dict) else v for k, v in self.levels.items()}
        object.__setattr__(self, "levels", levels)
        at_least("data.dataset.version", self.version, 0)
        at_least("data.dataset.prompt_episodes", self.prompt_episodes, 1)
        within("data.dataset.max_episode_steps", self.max_episode_steps, 1, 500)
        at_least("data.dataset.workers", self.workers, 1)
        check_task_names(self.task_levels, "data.dataset.task_levels")
        for key, levels in [("data.dataset.levels", self.levels)] + [
            (f"data.dataset.task_levels.{task}", levels) for task, levels in self.task_levels.items()
        ]:
            for name, level in levels.items():
                level.check(f"{key}.{name}")
            if (total := sum(lv.episodes for lv in levels.values())) < 1:
                raise ConfigError(key, "need at least one episode in total", total)

    def dataset_id(self, task: str, kind: Kind) -> str:
        """``llmdpd/<task>/<kind>-v<version>``; a locomotion task's training data is D4RL-named,
        ``llmdpd/<env family>/medium-replay-v<version>``."""
        if is_gym_env(task):
            return f"llmdpd/{family(task)}/{'medium-replay' if kind == 'train' else kind}-v{self.version}"
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
        if is_gym_env(task):
            return recipe_record(task, self.sac, self.seed, self.prompt_episodes)
        levels = {name: asdict(level) for name, level in self.levels_for(kind, task).items()}
        return {"seed": self.seed, "max_episode_steps": self.max_episode_steps, "levels": levels}


@contextmanager
def minari_datasets_path(folder: Path) -> Iterator[None]:
    """Point Minari at ``folder`` (``MINARI_DATASETS_PATH``) inside the block, then restore the variable."""
    previous, os.environ["MINARI_DATASETS_PATH"] = os.environ.get("MINARI_DATASETS_PATH"), str(folder)
    try:
        yield
    finally:
        os.environ.pop("MINARI_DATASETS_PATH")
        os.environ.update({} if previous is None else {"MINARI_DATASETS_PATH": previous})


def staging_folder(root: Path) -> Path:
    """A new staging folder under ``root``, ``.staging-<pid>-<random>``: a dead run's can be told apart."""
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def remove_stale_staging(root: Path) -> list[str]:
    """Remove the staging folders under ``root`` whose process has died; return their names."""
    stale = []
    for folder in sorted(root.glob(".staging-*")) if root.is_dir() else []:
        pid = folder.name.removeprefix(".staging-").split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder.name)
    return stale


def recipe_record(env_id: str, sac: SACRecipe, seed: int, prompt_episodes: int) -> dict[str, Any]:
    """The recipe of a locomotion task's two datasets (both are made by one SAC run)."""
    return {"seed": seed, "env_id": env_id, "sac": asdict(sac), "prompt_episodes": prompt_episodes}


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``llmdpd.json`` of a complete dataset, or a :class:`ConfigError` that says what is wrong."""
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise ConfigError("data.dataset.root", f"the dataset is missing or incomplete (no {METADATA_FILE}); "
                          "run `llmdpd collect` first", path)  # fmt: skip
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("data.dataset.root", f"corrupt {METADATA_FILE} ({err}); run `llmdpd collect` to "
                          "rebuild the dataset", path) from None  # fmt: skip
    if not isinstance(meta, dict) or "recipe" not in meta or "episodes" not in meta:
        raise ConfigError("data.dataset.root", f"{METADATA_FILE} lacks 'recipe'/'episodes'; run `llmdpd "
                          "collect` to rebuild the dataset", path)  # fmt: skip
    return meta


def summarize(episodes: Sequence[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Rows of task × level → episodes, transitions, success rate, mean return."""
    rows: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for ep in episodes:
        rows.setdefault((ep["task"], ep["level"]), []).append(ep)
    return [
        {
            "task": task,
            "kind": kind,
            "level": level,
            "episodes": len(eps),
            "transitions": int(sum(e["length"] for e in eps)),
            "success_rate": float(np.mean([e["success"] for e in eps])),
            "mean_return": float(np.mean([e["return"] for e in eps])),
        }
        for (task, level), eps in rows.items()
    ]


def checksums(path: Path) -> dict[str, str]:
    """SHA-256 of every file under the dataset's ``data/`` folder (Minari's HDF5 and metadata), by path
    relative to the dataset folder."""
    digests = {}
    for f in sorted(f for f in (path / "data").rglob("*") if f.is_file()):
        h = hashlib.sha256()
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)
        digests[f.relative_to(path).as_posix()] = h.hexdigest()
    return digests


def corruption(path: Path) -> str | None:
    """What is wrong with the dataset folder at ``path``, or None if it is intact.

    Intact: its ``llmdpd.json`` is readable and every file whose SHA-256 it records has that SHA-256.
    A dataset whose ``llmdpd.json`` records no checksums counts as corrupt, and is rebuilt.
    """
    try:
        meta = read_metadata(path)
    except ConfigError as err:  # collect rebuilds it: drop the advice to run collect
        return err.problem.partition("; run `llmdpd collect`")[0]
    if "sha256" not in meta:
        return f"{METADATA_FILE} records no checksums"
    found = checksums(path)
    for name, digest in meta["sha256"].items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} does not match its SHA-256 in {METADATA_FILE}"
    return None


def is_complete(spec: DatasetSpec, task: str, kind: Kind) -> bool:
    """True if the dataset exists and was built from this spec; :class:`ConfigError` if built from another."""
    path = spec.path(task, kind)
    if not path.exists():
        return False
    meta = read_metadata(path)
    if (recipe := spec.recipe(kind, task)) != meta["recipe"]:
        raise ConfigError("data.dataset.version", f"dataset {spec.dataset_id(task, kind)} at {path} was "
                          f"built from a different spec ({meta['recipe']} != {recipe}); bump "
                          "data.dataset.version or delete the folder", spec.version)  # fmt: skip
    return True
