"""``Provenance``: where a training run came from, saved in every checkpoint it writes.

Each ``llmdpd fit`` adds one segment: the code's commit (``+dirty`` for uncommitted changes), the resolved
config, the seeds and the versions of the packages that shape the result. Resuming from a checkpoint keeps
the earlier segments and appends its own, so a run resumed at another commit says so. ``llmdpd test`` copies
the segments into the results JSON (``meta.train_provenance``, and the last one's commit as
``meta.train_commit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from llmdpd_pl.utils import git_commit

PACKAGES = ("torch", "lightning", "metaworld", "transformers", "gymnasium", "mujoco")


def package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`PACKAGES` (None if absent)."""

    def get(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: get(name) for name in PACKAGES}


class Provenance(L.Callback):
    """Saves :attr:`segments` (one per fit) with the trainer's checkpoints.

    Args:
        config: The fit's resolved config, as plain data.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        model = config.get("model") or {}
        self.segments = [{"commit": git_commit(), "seed_everything": config.get("seed_everything"),
                          "model_seed": model.get("seed"), "versions": package_versions(),
                          "config": config}]  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"segments": self.segments}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.segments = [*state_dict.get("segments", []), self.segments[-1]]


def train_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``train_commit`` and ``train_provenance`` of a loaded checkpoint (None and [] if it has none)."""
    return _trained(checkpoint.get("callbacks", {}).get("Provenance", {}).get("segments", []))


def _trained(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """``train_commit`` (the last segment's) and ``train_provenance`` of a checkpoint's segments."""
    return {"train_commit": segments[-1]["commit"] if segments else None, "train_provenance": segments}


def run_record(callbacks: Sequence[L.Callback]) -> dict[str, Any]:
    """What a results JSON records of the run at test: the code's commit, the checkpoint's training wall
    time (its restored ``Timer``) and provenance, and the test's resolved config (the test's own
    ``Provenance`` segment, the last one; None without a ``Provenance`` callback)."""
    provenance = next((cb for cb in callbacks if isinstance(cb, Provenance)), None)
    timer = next((cb for cb in callbacks if isinstance(cb, Timer)), None)
    return {
        "commit": git_commit(),
        "train_seconds": timer.time_elapsed("train") if timer is not None else None,
        **_trained(provenance.segments[:-1] if provenance is not None else []),
        "config": provenance.segments[-1]["config"] if provenance is not None else None,
    }
