"""Tests for llmdpd_pl.envs: task names, the registered string entry point, seeding, the clipped expert.

The Meta-World pitfalls are pinned here: ``reset(seed=...)`` is ignored (only the
construction seed counts) and scripted policies return actions outside [-1, 1].
"""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest
from metaworld.policies import ENV_POLICY_MAP

from llmdpd_pl.envs import (
    ACT_DIM,
    ENV_ID,
    METAWORLD_TASKS,
    OBS_DIM,
    LayoutReset,
    check_task_names,
    layout_seed,
    make_env,
    make_metaworld,
    register_envs,
    scripted_policy,
    split_overlap,
)
from tests.conftest import Collected

# The ML45 test tasks; door-lock/door-unlock are the pair whose prompts must differ.
ML45_TEST_TASKS = ("bin-picking", "box-close", "door-lock", "door-unlock", "hand-insert")


# ----------------------------------------------------------------------------------------------- names
def test_metaworld_tasks_are_the_50_v3_names() -> None:
    assert len(METAWORLD_TASKS) == 50
    assert len(set(METAWORLD_TASKS)) == 50
    assert list(METAWORLD_TASKS) == sorted(METAWORLD_TASKS)
    assert not [t for t in METAWORLD_TASKS if t.endswith("-v3")]
    assert set(ML45_TEST_TASKS) <= set(METAWORLD_TASKS)
    assert {"reach", "push", "pick-place", "button-press-topdown-wall"} <= set(METAWORLD_TASKS)


def test_unknown_task_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="data.seen_tasks") as err:
        check_task_names(["reach", "box-clos"], "data.seen_tasks")
    message = str(err.value)
    assert "'box-clos'" in message and "Did you mean" in message and "'box-close'" in message


def test_unknown_task_without_close_match_says_so_plainly() -> None:
    with pytest.raises(ValueError, match="unknown Meta-World task 'zzzzzz'") as err:
        check_task_names(["zzzzzz"], "task")
    assert "Did you mean" not in str(err.value)


def test_v3_suffix_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValueError, match="'reach'"):
        check_task_names(["reach-v3"], "data.unseen_tasks")


def test_duplicate_task_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        check_task_names(["reach", "push", "reach"], "data.seen_tasks")


@pytest.mark.parametrize("factory", [make_metaworld, make_env, scripted_policy])
def test_factories_check_the_task_name_before_building(factory) -> None:
    with pytest.raises(ValueError, match="'box-close'"):
        factory("box-clos")


def test_split_overlap() -> None:
    assert split_overlap(["reach", "push", "door-lock"], ["door-lock", "box-close", "reach"]) == [
        "door-lock",
        "reach",
    ]
    assert split_overlap(["reach"], ["push"]) == []


# ----------------------------------------------------------------------------------------------- registration
def test_registered_id_uses_a_string_entry_point() -> None:
    register_envs()
    register_envs()  # idempotent: a second call must not raise "already registered" or replace the spec
    spec = gym.spec(ENV_ID)
    assert spec.entry_point == "llmdpd_pl.envs:make_metaworld"
    assert isinstance(spec.entry_point, str)  # Minari can serialise only string entry points


def test_spaces_match_the_declared_dims() -> None:
    env = make_env("reach", seed=0)
    try:
        assert env.spec is not None and env.spec.id == ENV_ID
        assert env.spec.kwargs == {"task": "reach", "seed": 0}
        assert env.observation_space.shape == (OBS_DIM,)
        assert env.action_space.shape == (ACT_DIM,)
        np.testing.assert_array_equal(env.action_space.low, -np.ones(ACT_DIM))
        np.testing.assert_array_equal(env.action_space.high, np.ones(ACT_DIM))
        obs, _ = env.reset()
        assert obs.shape == (OBS_DIM,)
    finally:
        env.close()


def test_construction_seed_makes_resets_reproducible_and_reset_seed_is_ignored() -> None:
    a, b, c = make_env("reach", seed=0), make_env("reach", seed=0), make_env("reach", seed=1)
    try:
        obs_a, _ = a.reset(seed=1)
        obs_b, _ = b.reset(seed=2)  # a different reset seed: Meta-World ignores it
        obs_c, _ = c.reset(seed=1)  # the same reset seed but another construction seed
        np.testing.assert_array_equal(obs_a, obs_b)
        assert not np.array_equal(obs_a, obs_c)
        # The layout sequence continues identically, and physics is deterministic.
        obs_a2, obs_b2 = a.reset()[0], b.reset()[0]
        np.testing.assert_array_equal(obs_a2, obs_b2)
        assert not np.array_equal(obs_a, obs_a2)  # reset() moves on to the next layout
        action = np.array([0.5, -0.3, 0.2, 1.0], dtype=np.float32)
        for _ in range(5):
            step_a, step_b = a.step(action), b.step(action)
        np.testing.assert_array_equal(step_a[0], step_b[0])
        assert step_a[1] == step_b[1]
    finally:
        for env in (a, b, c):
            env.close()


# ----------------------------------------------------------------------------------------------- expert
def test_scripted_policy_clips_actions_into_unit_box() -> None:
    task = "box-close"  # its raw expert leaves [-1, 1] on most steps
    env = make_env(task, seed=0)
    raw_policy = ENV_POLICY_MAP[f"{task}-v3"]()
    policy = scripted_policy(task)
    raw_out_of_range = 0
    try:
        obs, _ = env.reset()
        for _ in range(40):
            raw = raw_policy.get_action(obs)
            action = policy(obs)
            raw_out_of_range += int((np.abs(raw) > 1.0).any())
            assert action.dtype == np.float32 and action.shape == (ACT_DIM,)
            assert np.all(np.abs(action) <= 1.0)
            np.testing.assert_array_equal(action, np.clip(raw, -1.0, 1.0).astype(np.float32))
            obs, *_ = env.step(action)
    finally:
        env.close()
    assert raw_out_of_range > 0  # otherwise this test would not exercise the clipping


# ----------------------------------------------------------------------------------------------- Minari
def test_recover_environment_replays_a_collected_episode(
    collected: Collected, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", collected.spec.root)
    dataset = minari.load_dataset(collected.spec.dataset_id("reach", "train"))
    env = dataset.recover_environment()
    try:
        assert env.spec is not None and env.spec.id == ENV_ID
        episode = next(dataset.iterate_episodes())
        obs, _ = env.reset()
        # The spec stores the construction seed, so the first reset is the episode's first state...
        np.testing.assert_array_equal(obs, episode.observations[0])
        for t, action in enumerate(episode.actions):
            obs, reward, *_ = env.step(action)
            # ...and deterministic physics replays the whole episode exactly.
            np.testing.assert_array_equal(obs, episode.observations[t + 1])
            assert reward == episode.rewards[t]
    finally:
        env.close()


SEED = 0


def test_layout_reset_picks_layout_by_seed_mod_50() -> None:
    env = LayoutReset(make_env("reach", seed=layout_seed(SEED, "reach")))
    try:
        first = {i: env.reset(seed=i)[0] for i in (3, 4, 53)}
        np.testing.assert_array_equal(first[3], first[53])  # layout i mod 50
        assert not np.array_equal(first[3], first[4])  # another layout
        env.reset(seed=3)
        np.testing.assert_array_equal(env.reset()[0], first[3])  # reset() keeps the layout
    finally:
        env.close()


def test_eval_layouts_depend_on_seed_and_task() -> None:
    assert layout_seed(0, "reach") == layout_seed(0, "reach")
    assert len({layout_seed(0, "reach"), layout_seed(1, "reach"), layout_seed(0, "push")}) == 3
