"""Tests for llmdpd_pl.data.sac: real stable-baselines3 SAC on real MuJoCo Hopper, a few hundred steps.

One uninterrupted collection is shared by the module; the resume test makes a second one, paused at its
first checkpoint and resumed, and compares the two array for array.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import pytest

from llmdpd_pl.data.sac import collect_medium_replay
from llmdpd_pl.data.spec import METADATA_FILE, SACRecipe
from llmdpd_pl.locomotion import normalized_score

ENV = "Hopper-v5"
TRAIN, PROMPTS = "llmdpd/hopper/medium-replay-v0", "llmdpd/hopper/prompts-v0"
EPISODE_STEPS = 40  # short cap: the near-random early policy both falls (termination) and times out
#: Out-of-reach medium return: runs to max_steps. 350 gradient steps, checkpoints after steps 100-400.
RECIPE = SACRecipe(
    medium_return=1e6, max_steps=450, eval_every=150, eval_episodes=1, learning_starts=100,
    checkpoint_every=100, max_episode_steps=EPISODE_STEPS,
)
PROMPT_EPISODES = 2


def _collect(root: Path, recipe: SACRecipe = RECIPE, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    return collect_medium_replay(ENV, recipe, seed, root, TRAIN, PROMPTS, PROMPT_EPISODES, progress=False,
                                 **kwargs)


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sac")
    return root, _collect(root)


def _load(root: Path, dataset_id: str, monkeypatch: pytest.MonkeyPatch) -> minari.MinariDataset:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return minari.load_dataset(dataset_id)


def _sidecar(root: Path, dataset_id: str) -> dict[str, Any]:
    return json.loads((root / dataset_id / METADATA_FILE).read_text())


def _hopper_healthy(obs: np.ndarray) -> np.ndarray:
    """Hopper-v5's ``is_healthy`` from observations (z = obs[0], torso angle = obs[1]), per row."""
    obs = np.atleast_2d(obs)
    return (obs[:, 0] > 0.7) & (np.abs(obs[:, 1]) < 0.2) & np.all(np.abs(obs[:, 1:]) < 100, axis=1)


def test_normalized_score_is_pinned_to_d4rl_constants() -> None:
    # REF_MIN_SCORE / REF_MAX_SCORE of d4rl/infos.py, typed here independently of the package
    d4rl = {"HalfCheetah-v5": (-280.178953, 12135.0), "Hopper-v5": (-20.272305, 3234.3),
            "Walker2d-v5": (1.629008, 4592.3)}
    for env_id, (low, high) in d4rl.items():
        assert normalized_score(env_id, low) == pytest.approx(0.0, abs=1e-9)
        assert normalized_score(env_id, high) == pytest.approx(100.0)
    assert normalized_score("Hopper-v5", 1600.0) == pytest.approx(49.78449249724074)  # 100·1620.27/3254.57


def test_dataset_loads_with_plain_minari_and_reference_scores(
    collected: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = collected
    dataset = _load(root, TRAIN, monkeypatch)
    train_row = next(r for r in out["rows"] if r["kind"] == "train")
    assert out["complete"] and out["behaviour"]["stop_step"] == RECIPE.max_steps
    assert dataset.total_steps == train_row["transitions"] == RECIPE.max_steps  # every step, once
    assert dataset.total_episodes == train_row["episodes"]
    returns = np.array([ep.rewards.sum() for ep in dataset.iterate_episodes()])
    np.testing.assert_allclose(
        100 * minari.get_normalized_score(dataset, returns), normalized_score(ENV, returns), rtol=1e-12
    )
    for env in (dataset.recover_environment(), dataset.recover_environment(eval_env=True)):
        assert env.spec is not None and env.spec.id == ENV and env.spec.max_episode_steps == EPISODE_STEPS
    assert list((root / ".sac").iterdir()) == []  # the work folder is gone once the datasets are in place


def test_episodes_split_at_terminations_and_timeouts(
    collected: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = collected
    episodes = list(_load(root, TRAIN, monkeypatch).iterate_episodes())
    sidecar = _sidecar(root, TRAIN)["episodes"]
    kinds = []
    for i, ep in enumerate(episodes):
        n = len(ep.actions)
        assert ep.observations.shape == (n + 1, 11) and len(ep.rewards) == n
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
        assert ep.terminations[-1] != ep.truncations[-1]  # exactly one ends each episode
        assert _hopper_healthy(ep.observations[:-1]).all()  # nothing ended early ...
        assert ep.terminations[-1] == (not _hopper_healthy(ep.observations[-1])[0])  # ... or late
        if ep.truncations[-1] and i < len(episodes) - 1:
            assert n == EPISODE_STEPS  # a timeout; only the last, partial episode is shorter
        assert sidecar[i]["length"] == n and sidecar[i]["terminated"] == bool(ep.terminations[-1])
        kinds.append("termination" if ep.terminations[-1] else "timeout")
    assert {"termination", "timeout"} <= set(kinds[:-1])  # both cases are exercised
    assert episodes[-1].truncations[-1]


def test_episodes_replay_in_the_env(
    collected: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored transitions are the env's: replaying the actions from the recorded reset seed
    reproduces observations, flags and rewards (float32 in SB3's buffer)."""
    root, _ = collected
    for dataset_id in (TRAIN, PROMPTS):
        episodes = list(_load(root, dataset_id, monkeypatch).iterate_episodes())
        seeds = [e["seed"] for e in _sidecar(root, dataset_id)["episodes"]]
        env = gym.make(ENV, max_episode_steps=EPISODE_STEPS)
        for i in sorted({0, 1, len(episodes) - 2, len(episodes) - 1}):
            ep = episodes[i]
            obs, _ = env.reset(seed=seeds[i])
            observations, rewards, terminated, truncated = [obs], [], False, False
            for action in ep.actions:
                obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(obs)
                rewards.append(reward)
            np.testing.assert_array_equal(np.array(observations), ep.observations)
            np.testing.assert_allclose(rewards, ep.rewards, rtol=1e-6)  # SB3 stores rewards as float32
            last = len(episodes) - 1
            assert terminated == ep.terminations[-1]
            assert truncated == ep.truncations[-1] or (dataset_id == TRAIN and i == last)  # cut by the stop


def test_prompts_are_held_out_policy_episodes(
    collected: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = collected
    prompts = list(_load(root, PROMPTS, monkeypatch).iterate_episodes())
    train = list(_load(root, TRAIN, monkeypatch).iterate_episodes())
    assert len(prompts) == PROMPT_EPISODES
    starts = {ep.observations[0].tobytes() for ep in train}
    assert all(ep.observations[0].tobytes() not in starts for ep in prompts)
    sidecar = _sidecar(root, PROMPTS)
    assert sidecar["kind"] == "prompts" and {e["level"] for e in sidecar["episodes"]} == {"prompt"}
    assert sidecar["recipe"] == {"seed": 0, "env_id": ENV, "sac": dataclasses.asdict(RECIPE),
                                 "prompt_episodes": PROMPT_EPISODES}
    row = next(r for r in out["rows"] if r["kind"] == "prompts")
    assert row["transitions"] == sum(len(ep.actions) for ep in prompts)


def test_stops_at_the_medium_return(tmp_path: Path) -> None:
    recipe = dataclasses.replace(RECIPE, medium_return=-1e3, eval_every=60, learning_starts=50)
    out = _collect(tmp_path, recipe)
    behaviour = out["behaviour"]
    assert behaviour["reached_medium"] and behaviour["stop_step"] == 60
    assert [step for step, _ in behaviour["eval_curve"]] == [60]
    assert next(r for r in out["rows"] if r["kind"] == "train")["transitions"] == 60


def test_resume_gives_the_same_dataset(
    collected: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, whole = collected
    paused = _collect(tmp_path, pause_after=150)
    work = tmp_path / ".sac" / TRAIN.replace("/", "__")
    assert not paused["complete"] and paused["behaviour"]["stop_step"] >= 150
    assert not (tmp_path / TRAIN).exists() and len(list(work.glob("step-*"))) == 1
    with pytest.raises(ValueError, match="other arguments"):
        _collect(tmp_path, seed=1)
    resumed = _collect(tmp_path)
    assert resumed["rows"] == whole["rows"]
    volatile = {"wall_seconds", "steps_per_second"}  # add up each session's time: documented difference
    strip = lambda b: {k: v for k, v in b.items() if k not in volatile}  # noqa: E731
    assert strip(resumed["behaviour"]) == strip(whole["behaviour"])
    for dataset_id in (TRAIN, PROMPTS):
        ours = list(_load(tmp_path, dataset_id, monkeypatch).iterate_episodes())
        theirs = list(_load(root, dataset_id, monkeypatch).iterate_episodes())
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            for field in ("observations", "actions", "rewards", "terminations", "truncations"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert _sidecar(tmp_path, dataset_id)["episodes"] == _sidecar(root, dataset_id)["episodes"]
    assert not work.exists()


def test_a_complete_dataset_is_reused_and_guarded(collected: tuple[Path, dict[str, Any]]) -> None:
    root, whole = collected
    again = _collect(root)
    assert again["rows"] == whole["rows"] and again["behaviour"] == whole["behaviour"]
    with pytest.raises(ValueError, match="was built from"):
        _collect(root, dataclasses.replace(RECIPE, eval_episodes=2))


@pytest.mark.parametrize(
    ("field", "value"),
    [("eval_every", 0), ("eval_episodes", 0), ("learning_starts", -1), ("checkpoint_every", 0),
     ("max_steps", 0), ("max_episode_steps", 0)],
)
def test_a_bad_recipe_names_its_key(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"data\.dataset\.sac\.{field}: must .*got {value}"):
        SACRecipe(**{field: value})


def test_bad_env_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.seen_tasks: not a registered Gymnasium env id \(got 'No"):
        collect_medium_replay("NoSuchEnv-v0", RECIPE, 0, tmp_path, TRAIN, PROMPTS, progress=False)
    with pytest.raises(ValueError, match=r"data\.dataset\.sac\.medium_return"):  # D4RL has no Pendulum
        collect_medium_replay("Pendulum-v1", SACRecipe(), 0, tmp_path, TRAIN, PROMPTS, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
