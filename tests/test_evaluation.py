"""Tests for ``llmdpd_pl.evaluation``: evaluation as functions of policies, tasks and episode ids."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from llmdpd_pl.evaluation import TestOptions, as_rows, count_episodes, rollout_steps
from llmdpd_pl.rollouts import TaskResult, expert_policy, random_policy, run_episodes


def test_count_episodes_runs_each_round_robin_on_its_own_episodes() -> None:
    """Episode i runs with policy i mod 2 of its row; rows are policies major, tasks minor."""
    policies = {"mixed": [expert_policy(), random_policy(3)], "expert": [expert_policy()]}
    tasks = [("reach", "seen"), ("push", "unseen")]
    counts = count_episodes(policies, tasks, [0, 1, 2, 3], num_envs=2, seed=0, max_steps=40)
    rows = as_rows(list(policies), tasks, counts)
    mixed_reach = (run_episodes(expert_policy(), "reach", [0, 2], 2, 0, 40)
                   + run_episodes(random_policy(3), "reach", [1, 3], 2, 0, 40))  # fmt: skip
    assert [(r.policy, r.task, r.split) for r in rows] == [
        ("mixed", "reach", "seen"), ("mixed", "push", "unseen"), ("expert", "reach", "seen"),
        ("expert", "push", "unseen")]  # fmt: skip
    assert rows[0] == TaskResult.from_counts("reach", "seen", "mixed", mixed_reach)
    assert rows[3] == TaskResult.from_counts("push", "unseen", "expert",
                                             run_episodes(expert_policy(), "push", [0, 1, 2, 3], 2, 0, 40))
    assert counts.dtype == np.float64 and counts.shape == (4, 6)
    assert rollout_steps(tasks, 4, len(policies), 40) == 4 * 2 * 80


def test_check_runs_before_every_step_and_stops_by_raising() -> None:
    steps: list[int] = []

    def check() -> None:
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        count_episodes({"agent": [random_policy(0)]}, [("reach", "seen")], [0, 1], 2, 0, 40, check=check)
    assert len(steps) == 5


def test_test_options_are_replaced_not_mutated() -> None:
    options = TestOptions()
    assert (options.episodes, options.seen, options.expert, options.prompt_index) == (50, True, True, 0)
    assert replace(options, episodes=3).episodes == 3 and options.episodes == 50
    with pytest.raises(AttributeError):
        options.episodes = 3  # type: ignore[misc]
