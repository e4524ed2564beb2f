"""Tests for llmdpd_pl.rollouts: rollouts, success read-out, exact sharding, Wilson interval, JSON.

Episodes are shortened (``max_steps`` 30–150 instead of 500) where the claim does not need full
episodes: building a Meta-World env costs ~0.6 s and dominates, so envs are reused where possible.
The Meta-World pitfalls pinned here: success at the truncating step lives in ``info["final_info"]``
(SAME_STEP autoreset), and 7 episodes on 2 ranks must count as 7, not 8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from llmdpd_pl.envs import make_eval_envs, scripted_policy
from llmdpd_pl.rollouts import (
    Counts,
    PolicyFn,
    TaskResult,
    _success,
    expert_policy,
    format_results,
    mean_success,
    random_policy,
    run_episodes,
    shard,
    wilson_interval,
    write_json,
)

SEED = 0
# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")


@pytest.fixture(scope="module")
def reach_envs() -> Iterator[gym.vector.VectorEnv]:
    """One evaluation env of ``reach`` (500-step time limit), shared by the tests that step it by hand."""
    envs = make_eval_envs("reach", 1, SEED)
    yield envs
    envs.close()


# ------------------------------------------------------------------------------- expert vs random
def test_expert_succeeds_and_random_fails(reach_envs: gym.vector.VectorEnv) -> None:
    # The expert goes through the same PolicyFn → run_episodes path as the agent. reach's expert succeeds
    # by step ~60 on every layout, so 150 steps leave a wide margin.
    expert = run_episodes(expert_policy(), "reach", list(range(10)), num_envs=5, seed=SEED, max_steps=150)
    assert expert.episodes == 10 and expert.length_sum == 10 * 150
    assert expert.successes == 10  # a success read wrongly (e.g. never) drops this to 0
    # Steps to first success, in waves of 5 envs, are those of each layout stepped alone by hand.
    assert expert.first_success_sum == sum(_first_success(reach_envs, layout, 150) for layout in range(10))

    # Uniform random actions never pick and place an object; ≤ 10% leaves room for one lucky layout.
    # 2 envs, not 5: building an env costs more than stepping it.
    rand = run_episodes(random_policy(SEED), "pick-place", list(range(10)), num_envs=2, seed=SEED,
                        max_steps=150)
    assert rand.episodes == 10
    assert rand.successes <= 1


# ------------------------------------------------------------------------------- success read-out
def _vector_info(success: list[float], final_success: list[float] | None) -> dict:
    """``info`` as gymnasium's SAME_STEP vector env builds it (measured on reach, gymnasium 1.4).

    On the truncating step the ended envs' own info goes under ``final_info``; the top level then holds
    the new episode's reset info, which for Meta-World has no ``success`` key at all.
    """
    n = len(success)
    info: dict = {"success": np.array(success), "_success": np.ones(n, bool)}
    if final_success is not None:
        ended = np.array([s is not None for s in final_success])
        info["final_info"] = {"success": np.array([s or 0.0 for s in final_success]), "_success": ended}
        info["_final_info"] = ended
        info["_final_obs"] = ended
    return info


def test_success_flags_of_a_plain_step() -> None:
    got = _success(_vector_info([0.0, 1.0, 0.0], None), np.zeros(3, bool), 3)
    np.testing.assert_array_equal(got, [False, True, False])


def test_success_on_truncating_step_is_read_from_final_info() -> None:
    # Both envs truncate: the top level holds no success (reset info); final_info says env 0 succeeded.
    info = {"_final_obs": np.ones(2, bool), "_final_info": np.ones(2, bool),
            "final_info": {"success": np.array([1.0, 0.0]), "_success": np.ones(2, bool)}}
    got = _success(info, np.array([True, True]), 2)
    np.testing.assert_array_equal(got, [True, False])

    # Only env 1 ended: env 0 keeps its own top-level flag, env 1 takes its final flag.
    info = _vector_info([1.0, 0.0], [None, 1.0])
    got = _success(info, np.array([False, True]), 2)
    np.testing.assert_array_equal(got, [True, True])


def _first_success(envs: gym.vector.VectorEnv, layout: int, steps: int) -> int:
    """First step (1-based) at which the expert succeeds on ``layout``, stepping one env by hand."""
    act = scripted_policy("reach")
    obs, _ = envs.reset(seed=[layout])
    for t in range(steps):
        obs, _, _, _, info = envs.step(act(obs[0])[None])
        if info["success"][0] > 0:
            return t + 1
    raise AssertionError(f"the reach expert did not succeed on layout {layout} within {steps} steps")


def test_success_only_on_the_truncating_step_counts(reach_envs: gym.vector.VectorEnv) -> None:
    # Truncate the episode exactly at the step where success first becomes true: its flag then exists
    # only in info["final_info"] (the top-level info already belongs to the next episode).
    layout = 5
    k = _first_success(reach_envs, layout, 150)
    envs = make_eval_envs("reach", 1, SEED, max_episode_steps=k)
    try:
        counts = run_episodes(expert_policy(), "reach", [layout], 1, SEED, max_steps=k, envs=envs)
    finally:
        envs.close()
    assert counts.successes == 1
    assert counts.first_success_sum == k and counts.length_sum == k


class ExpertThenAway:
    """The reach expert for ``k`` steps, then a constant action that lifts the hand off the goal."""

    def __init__(self, k: int) -> None:
        self.k, self.t, self.expert = k, 0, expert_policy()

    def __call__(self, obs: np.ndarray, task: str) -> np.ndarray:
        self.t += 1
        if self.t <= self.k:
            return self.expert(obs, task)
        return np.tile(np.array([0.0, -1.0, 1.0, 0.0], np.float32), (len(obs), 1))


def test_success_counts_even_if_it_later_becomes_false(reach_envs: gym.vector.VectorEnv) -> None:
    layout, extra = 5, 40
    k = _first_success(reach_envs, layout, 150)
    # Check by hand that success really is lost again before the episode ends.
    policy = ExpertThenAway(k)
    obs, _ = reach_envs.reset(seed=[layout])
    trace = []
    for _ in range(k + extra):
        obs, _, _, _, info = reach_envs.step(policy(obs, "reach"))
        trace.append(bool(info["success"][0] > 0))
    assert trace[k - 1] and not any(trace[: k - 1]) and not trace[-1], trace

    counts = run_episodes(ExpertThenAway(k), "reach", [layout], 1, SEED, max_steps=k + extra, envs=reach_envs)
    assert counts.successes == 1
    assert counts.first_success_sum == k


# ------------------------------------------------------------------------------- sharding
def test_shard_covers_every_episode_exactly_once() -> None:
    assert shard(7, 0, 2) == [0, 2, 4, 6]
    assert shard(7, 1, 2) == [1, 3, 5]
    for episodes in range(0, 12):
        for world in range(1, 5):
            ids = sorted(i for r in range(world) for i in shard(episodes, r, world))
            assert ids == list(range(episodes)), (episodes, world)  # no padding, no duplicates


def test_summed_shards_equal_one_process_run() -> None:
    # 50-step reach episodes: some layouts succeed in time and some do not, so the sums discriminate.
    policy: PolicyFn = expert_policy()
    single = run_episodes(policy, "reach", list(range(7)), num_envs=3, seed=SEED, max_steps=50)
    assert 0 < single.successes < 7, single  # otherwise the comparison below proves little
    # Both "ranks" reuse one 2-env vector env: waves [0, 2], [4, 6] and [1, 3], [5 + padding].
    envs = make_eval_envs("reach", 2, SEED)
    try:
        ranks = [run_episodes(policy, "reach", shard(7, r, 2), 2, SEED, 50, envs=envs) for r in (0, 1)]
    finally:
        envs.close()
    assert [c.episodes for c in ranks] == [4, 3]
    total = Counts.from_array(ranks[0].as_array() + ranks[1].as_array())
    assert (total.episodes, total.successes, total.length_sum, total.first_success_sum) == (
        7, single.successes, single.length_sum, single.first_success_sum)
    # Returns are float sums taken in a different order (waves of 3 vs 2): equal up to rounding.
    assert total.return_sum == pytest.approx(single.return_sum, rel=1e-12)


def test_no_episodes_runs_nothing() -> None:
    assert run_episodes(expert_policy(), "reach", [], 5, SEED) == Counts()


# ------------------------------------------------------------------------------- Wilson interval
@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Hand-computed from (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), z = 1.959964.
        (0, 10, 0.0, 0.277533),  # p̂ = 0: the upper bound is (z²/n) / (1 + z²/n)
        (10, 10, 0.722467, 1.0),  # mirror image of 0/10
        (5, 10, 0.236593, 0.763407),
        (1, 3, 0.061492, 0.792340),
    ],
)
def test_wilson_interval_pinned(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4)  # the pinned values carry 6 decimals
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_of_no_episodes_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    row = TaskResult.from_counts("reach", "seen", "agent", Counts())
    assert (row.episodes, row.success_rate, row.ci_low, row.ci_high) == (0, 0.0, 0.0, 1.0)
    assert row.mean_steps_to_success is None


def test_task_result_from_counts() -> None:
    row = TaskResult.from_counts("reach", "seen", "agent", Counts(4, 2, 40.0, 400.0, 30.0))
    assert (row.success_rate, row.mean_return, row.mean_length, row.mean_steps_to_success) == (
        0.5, 10.0, 100.0, 15.0)  # steps to success averages over the 2 successful episodes only
    assert Counts.from_array(Counts(4, 2, 40.0, 400.0, 30.0).as_array()) == Counts(4, 2, 40.0, 400.0, 30.0)


# ------------------------------------------------------------------------------- reproducibility
def test_same_seed_gives_identical_counts(reach_envs: gym.vector.VectorEnv) -> None:
    def run(seed: int) -> Counts:
        return run_episodes(random_policy(seed), "reach", [0, 1], 1, SEED, max_steps=30, envs=reach_envs)

    first, again, other = run(7), run(7), run(8)
    assert first == again  # bit-identical, floats included
    assert other.return_sum != first.return_sum  # the seed does reach the policy


# ------------------------------------------------------------------------------- table and JSON
ROW_TYPES = {"task": str, "split": str, "policy": str, "episodes": int, "success_rate": float,
             "ci_low": float, "ci_high": float, "mean_return": float, "mean_length": float}


def _rows() -> list[TaskResult]:
    return [
        TaskResult.from_counts("reach", "seen", "agent", Counts(4, 2, 40.0, 400.0, 30.0)),
        TaskResult.from_counts("push", "seen", "agent", Counts(4, 4, 80.0, 400.0, 100.0)),
        TaskResult.from_counts("box-close", "unseen", "agent", Counts(4, 0, 4.0, 400.0, 0.0)),
        TaskResult.from_counts("box-close", "unseen", "expert", Counts(4, 4, 400.0, 400.0, 200.0)),
    ]


def test_write_json_schema(tmp_path: Path) -> None:
    path = write_json(_rows(), tmp_path / "new" / "results.json", {"seed": 0, "ckpt_path": None})
    assert path == tmp_path / "new" / "results.json"
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "results"}
    assert data["meta"] == {"seed": 0, "ckpt_path": None}
    assert len(data["results"]) == 4
    for got, row in zip(data["results"], _rows(), strict=True):
        assert set(got) == {f.name for f in fields(TaskResult)}
        for key, kind in ROW_TYPES.items():
            assert type(got[key]) is kind or (kind is float and type(got[key]) is int), (key, got[key])
        assert got == asdict(row)
    assert data["results"][2]["mean_steps_to_success"] is None  # no success: null, not NaN
    assert data["results"][0]["mean_steps_to_success"] == 15.0
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_write_json_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = write_json(_rows(), tmp_path / "results.json", {"seed": 0})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json(_rows(), path, {"seed": object()})  # not JSON-serialisable: fails mid-write
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_json_lists_videos_when_given(tmp_path: Path) -> None:
    videos = [{"task": "reach", "split": "seen", "episode": 0, "path": "videos/test/seen/reach_ep0.gif"}]
    data = json.loads(write_json(_rows(), tmp_path / "r.json", {"seed": 0}, videos).read_text())
    assert set(data) == {"meta", "results", "videos"} and data["videos"] == videos
    data = json.loads(write_json(_rows(), tmp_path / "r.json", {"seed": 0}, []).read_text())
    assert data["videos"] == []  # asked for, none recorded: the key says so


def test_mean_success_averages_each_split_of_one_policy() -> None:
    assert mean_success(_rows()) == {"seen": 0.75, "unseen": 0.0}  # the agent's rows only
    assert mean_success(_rows(), policy="expert") == {"unseen": 1.0}  # no expert row on a seen task


def test_format_results_lists_rows_and_agent_means() -> None:
    table = format_results(_rows())
    lines = table.splitlines()
    for task in ("reach", "push", "box-close"):
        assert any(line.startswith(task) for line in lines), task
    assert len([line for line in lines if line.startswith("box-close")]) == 2  # agent and expert
    means = {line.split()[1]: line.split()[2] for line in lines if line.startswith("mean ")}
    assert means == {"seen": "75.0%", "unseen": "0.0%"}  # the expert's 100% is not averaged in
    reach = next(line for line in lines if line.startswith("reach"))
    assert reach.split()[3:6] == ["4", "50.0%", "[15.0,"]  # eps, success, Wilson low of 2/4 (0.1500)
