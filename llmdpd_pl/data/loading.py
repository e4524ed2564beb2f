"""Reading Minari datasets into tensors: the training transitions and the trajectory prompts.

A dataset is either one ``llmdpd collect`` built (``root/<id>``, with its ``llmdpd.json`` sidecar) or
any Minari dataset named by id (``data.dataset_id``, e.g. ``mujoco/hopper/medium-v0``), looked up
locally first under ``data.dataset.root``, then in Minari's own folder (``MINARI_DATASETS_PATH`` or
``~/.minari/datasets``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmdpd_pl.data.batches import Transitions
from llmdpd_pl.data.spec import minari_datasets_path, read_metadata
from llmdpd_pl.errors import ConfigError


def open_collected(path: Path) -> Any:
    """A dataset ``llmdpd collect`` built at ``path`` (its sidecar says it is complete)."""
    import minari

    read_metadata(path)  # missing / incomplete / corrupt sidecar → clear error
    try:
        return minari.MinariDataset(path / "data")
    except Exception as err:
        raise ConfigError("data.dataset.root", f"the dataset cannot be read ({type(err).__name__}: {err}); "
                          "delete it and re-run `llmdpd collect`", path) from None  # fmt: skip


def minari_roots(root: str | Path) -> list[Path]:
    """Where a dataset id is looked up, in order: ``root``, then Minari's own datasets folder."""
    default = os.environ.get("MINARI_DATASETS_PATH", str(Path.home() / ".minari" / "datasets"))
    return list(dict.fromkeys([Path(root).resolve(), Path(default).resolve()]))


def open_by_id(dataset_id: str, root: str | Path) -> Any:
    """``minari.load_dataset(dataset_id)`` from the first of :func:`minari_roots` that holds it."""
    import minari

    for folder in minari_roots(root):
        if (folder / dataset_id / "data").is_dir():
            with minari_datasets_path(folder):
                return minari.load_dataset(dataset_id)
    searched = " or ".join(str(f) for f in minari_roots(root))
    raise ConfigError("data.dataset_id", f"no Minari dataset of this id under {searched}. With internet, "
                      f"`minari download {dataset_id}` fetches it (or set MINARI_DATASETS_PATH to a folder "
                      "that holds it)", dataset_id)  # fmt: skip


def episodes(
    dataset: Any, what: str, indices: Sequence[int] | None = None, key: str = "data.dataset.root"
) -> Iterator[Any]:
    """The dataset's episodes (those of ``indices`` if given). A read error, or a non-finite observation,
    action or reward, is a :class:`ConfigError` under ``key``, the config key that named the dataset
    (``data.dataset.root`` for a collected one, ``data.dataset_id``), that names ``what``."""
    fix = "delete it and re-run `llmdpd collect`" if key == "data.dataset.root" else "download it again"
    try:
        for ep in dataset.iterate_episodes(indices):
            for name in ("observations", "actions", "rewards"):
                if bad := int((~np.isfinite(np.asarray(getattr(ep, name)))).sum()):
                    raise ConfigError(key, f"{what}, episode {ep.id}: {bad} non-finite values (NaN/inf) in "
                                      f"its {name}; the dataset cannot be trained on", what)  # fmt: skip
            yield ep
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(key, f"{what} is corrupt ({type(err).__name__}: {err}); {fix}", what) from None


def to_transitions(
    tasks: Sequence[tuple[Iterable[Any], str]], obs_dim: int, act_dim: int, reward_scale: float
) -> Transitions:
    """Every (s, a, r, s', not_done, task) of the tasks' episodes; ``not_done`` comes from terminations
    only (a time-limit truncation is not a terminal state).

    Args:
        tasks: One (episodes, description for errors) per task, in task-index order.
    """
    keys = ("obs", "action", "reward", "next_obs", "not_done", "task")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    S, A = obs_dim, act_dim
    for task_id, (eps, what) in enumerate(tasks):
        for ep in eps:
            obs, act = np.asarray(ep.observations), np.asarray(ep.actions)
            if obs.ndim != 2 or obs.shape[1] != S or act.ndim != 2 or act.shape[1] != A:
                raise ConfigError("data.seen_tasks", f"{what}: episode {ep.id} has observations {obs.shape} "
                                  f"and actions {act.shape}; expected (T+1, {S}) and (T, {A}), the widths "
                                  "of the tasks' envs", what)  # fmt: skip
            if len(obs) != len(act) + 1:
                raise ValueError(
                    f"{what}: episode {ep.id} has {len(obs)} observations for {len(act)} actions; "
                    "expected T+1 for T"
                )
            parts["obs"].append(obs[:-1])
            parts["next_obs"].append(obs[1:])
            parts["action"].append(act)
            parts["reward"].append(np.asarray(ep.rewards) * reward_scale)
            parts["not_done"].append(1.0 - np.asarray(ep.terminations, dtype=np.float64))
            parts["task"].append(np.full(len(act), task_id))
        if not parts["task"] or parts["task"][-1][0] != task_id:
            raise ValueError(f"{what} has no episodes")

    def cat(key: str, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.from_numpy(np.concatenate(parts[key])).to(dtype)

    return Transitions(
        cat("obs"), cat("action"), cat("reward"), cat("next_obs"), cat("not_done"), cat("task", torch.int64)
    )


def prompt_trajectories(
    eps: Iterable[Any], what: str, length: int, stride: int, obs_dim: int, act_dim: int, windows: int = 1
) -> tuple[Tensor, Tensor]:
    """(P, L, S) states and (P, L, A) actions, P = episodes × ``windows``, episode-major.

    Window w of an episode is its steps ``w·L·stride + k·stride`` for k < L, the last step repeated past
    the end; ``windows = 1`` keeps the first (the whole episode when L × stride covers it).
    """
    obs, act = [], []
    span = length * stride
    for ep in eps:
        o, a = np.asarray(ep.observations)[:-1], np.asarray(ep.actions)
        if o.shape[-1] != obs_dim or a.shape[-1] != act_dim:
            raise ConfigError("data.seen_tasks", f"{what}: observations {o.shape} / actions {a.shape}; "
                              f"expected (T, {obs_dim}) / (T, {act_dim}), the widths of the tasks' envs",
                              what)  # fmt: skip
        if (windows - 1) * span >= len(a):
            raise ConfigError("data.traj_prompt_windows", f"{what} has a {len(a)}-step episode, room for "
                              f"{-(-len(a) // span)} windows of {length} steps every {stride}",
                              windows)  # fmt: skip
        for w in range(windows):
            idx = np.minimum(w * span + np.arange(length) * stride, len(a) - 1)
            obs.append(torch.from_numpy(o[idx]).float())
            act.append(torch.from_numpy(a[idx]).float())
    if not obs:
        raise ValueError(f"{what} has no episodes")
    return torch.stack(obs), torch.stack(act)
