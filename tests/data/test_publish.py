"""Tests for ``llmdpd_pl.data.publish``: a dataset appears complete, with its checksummed sidecar, or not at
all; a dataset published meanwhile is kept; nothing is left in staging."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from llmdpd_pl.data.publish import NewDataset, publish
from llmdpd_pl.data.spec import METADATA_FILE, checksums


def _episodes(n: int, seed: int, steps: int = 5) -> list[EpisodeBuffer]:
    """``n`` episodes of Pendulum's spaces: 3 observation and 1 action dimensions, truncated at the end."""
    rng = np.random.default_rng(seed)
    return [EpisodeBuffer(id=i, seed=i, observations=rng.uniform(-1, 1, (steps + 1, 3)).astype(np.float32),
                          actions=rng.uniform(-2, 2, (steps, 1)).astype(np.float32),
                          rewards=rng.normal(size=steps), terminations=np.zeros(steps, bool),
                          truncations=np.r_[np.zeros(steps - 1, bool), True]) for i in range(n)]  # fmt: skip


def _new(dataset_id: str, seed: int) -> NewDataset:
    return NewDataset(dataset_id, _episodes(2, seed), {"task": "pendulum", "kind": "train", "seed": seed},
                      {"env": gym.spec("Pendulum-v1"), "algorithm_name": "random"})  # fmt: skip


def test_publish_moves_each_dataset_into_place_with_its_checksums(tmp_path: Path) -> None:
    publish(tmp_path, [_new("test/a-v0", 0), _new("test/b-v0", 1)])
    for name, seed in (("a", 0), ("b", 1)):
        folder = tmp_path / "test" / f"{name}-v0"
        sidecar = json.loads((folder / METADATA_FILE).read_text())
        assert sidecar == {"task": "pendulum", "kind": "train", "seed": seed, "sha256": checksums(folder)}
        assert sidecar["sha256"]  # the files of the dataset, not the sidecar
    assert (tmp_path / "test" / "namespace_metadata.json").is_file()
    assert list(tmp_path.glob(".staging-*")) == []


def test_a_dataset_published_meanwhile_is_kept(tmp_path: Path) -> None:
    publish(tmp_path, [_new("test/a-v0", 0)])
    before = (tmp_path / "test" / "a-v0" / METADATA_FILE).read_bytes()
    publish(tmp_path, [_new("test/a-v0", 5)])
    assert (tmp_path / "test" / "a-v0" / METADATA_FILE).read_bytes() == before
    assert list(tmp_path.glob(".staging-*")) == []


def test_a_failure_publishes_nothing_and_leaves_no_staging(tmp_path: Path) -> None:
    bad = NewDataset("test/b-v0", _episodes(1, 1), {}, {"env": gym.spec("Pendulum-v1"), "no_such": 1})
    with pytest.raises(TypeError):
        publish(tmp_path, [_new("test/a-v0", 0), bad])
    assert not (tmp_path / "test" / "a-v0").exists() and not (tmp_path / "test" / "b-v0").exists()
    assert list(tmp_path.glob(".staging-*")) == []
