"""Tests for llmdpd_pl.data.spec: per-task quality levels and their recipes."""

from __future__ import annotations

import pytest

from llmdpd_pl.data.spec import DatasetSpec, QualityLevel

LOW = {"low": QualityLevel(episodes=4, noise_std=0.8, random_prob=0.5)}


def test_task_levels_replace_the_levels_of_their_tasks_only() -> None:
    spec = DatasetSpec(levels={"expert": QualityLevel(3, noise_std=0.1)}, task_levels={"box-close": LOW})
    assert spec.levels_for("train", "box-close") == LOW
    assert spec.levels_for("train", "reach") == {"expert": QualityLevel(3, noise_std=0.1)}
    assert spec.recipe("train", "box-close") != spec.recipe("train", "reach")
    # Prompt trajectories stay near-expert for every task.
    assert spec.levels_for("prompts", "box-close") == spec.levels_for("prompts", "reach")


@pytest.mark.parametrize(("task_levels", "message"), [
    ({"box-closer": LOW}, r"data\.dataset\.task_levels: unknown Meta-World task 'box-closer'"),
    ({"box-close": {"low": QualityLevel(episodes=0)}}, r"data\.dataset\.task_levels\.box-close: need"),
])  # fmt: skip
def test_task_levels_reject_bad_input(task_levels: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatasetSpec(task_levels=task_levels)
