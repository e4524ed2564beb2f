"""Hidden-goal reach (protocol P4): the goal is nowhere in what is stored or seen, the held-out regions have
no training data, and the two scripted references bracket what a policy can do."""

from __future__ import annotations

import warnings
from pathlib import Path

import minari
import numpy as np
import pytest
import yaml

from llmdpd_pl import hidden_goal
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.spec import DatasetSpec, QualityLevel
from llmdpd_pl.envs import make_env
from llmdpd_pl.rollouts import reference_policies, run_episodes
from llmdpd_pl.suites import make_eval_envs

CONFIG = Path(__file__).parents[1] / "configs" / "protocols" / "p4_hidden_goal_reach.yaml"
SHUFFLED = Path(__file__).parents[1] / "configs" / "prompts" / "p4_shuffled_text.yaml"
SPLIT = yaml.safe_load(CONFIG.read_text())["data"]
REGION = "hidden-reach-left-far-low"


def test_the_observation_never_shows_the_goal_and_episode_ids_fix_the_goal() -> None:
    env = make_env(REGION, seed=3)
    goals = []
    for i in (0, 1, 0):
        obs, _ = env.reset(seed=i)
        goal = env.get_wrapper_attr("goal")
        goals.append(goal)
        assert np.abs(goal - hidden_goal.CENTRES[REGION]).max() <= hidden_goal.JITTER
        for _ in range(3):
            assert not obs[hidden_goal.GOAL_SLICE].any()
            obs, *_ = env.step(env.action_space.sample())
    assert np.array_equal(goals[0], goals[2]) and not np.array_equal(goals[0], goals[1])
    env.close()


def test_the_split_holds_out_new_combinations_of_seen_words() -> None:
    seen, unseen = SPLIT["seen_tasks"], SPLIT["unseen_tasks"]
    assert set(seen) | set(unseen) == set(hidden_goal.TASKS) and not set(seen) & set(unseen)
    for task in unseen:
        for axis, word in enumerate(hidden_goal.WORDS[task]):
            assert any(hidden_goal.WORDS[s][axis] == word for s in seen), (task, word)


def test_shuffled_text_gives_every_region_another_regions_text_within_its_split() -> None:
    texts = yaml.safe_load(SHUFFLED.read_text())["data"]["prompts"]
    for split in ("seen_tasks", "unseen_tasks"):
        own = {t: hidden_goal.text_prompt(t) for t in SPLIT[split]}
        assert set(texts) >= set(own)
        given = [texts[t] for t in SPLIT[split]]
        assert all(texts[t] != own[t] for t in own)  # nobody reads its own text
        assert sorted(map(str, given)) == sorted(map(str, own.values()))  # a permutation within the split


def test_no_goal_in_stored_or_seen_observations_and_no_data_of_held_out_regions(tmp_path: Path) -> None:
    """The shipped split, collected tiny: the datasets, the training transitions, the trajectory prompts
    and the evaluation envs carry zeros where the goal would be; held-out regions have prompts only."""
    spec = DatasetSpec(root=str(tmp_path / "minari"), version=6, levels={"expert": QualityLevel(1, 0.1)},
                       prompt_episodes=1, max_episode_steps=20, workers=1)  # fmt: skip
    dm = PromptedOfflineDataModule(SPLIT["seen_tasks"], SPLIT["unseen_tasks"], dataset=spec,
                                   cache_dir=str(tmp_path / "emb"), traj_prompt_len=4, traj_prompt_stride=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data(progress=False)
    dm.setup("fit")
    for task in SPLIT["unseen_tasks"]:
        assert not spec.path(task, "train").exists()
        assert spec.path(task, "prompts").exists()
    for task in SPLIT["seen_tasks"]:
        for kind in ("train", "prompts"):
            data = minari.MinariDataset(spec.path(task, kind) / "data")
            for episode in data.iterate_episodes():
                assert episode.observations.shape[1] == 39
                assert not episode.observations[:, hidden_goal.GOAL_SLICE].any()
    assert dm.transitions is not None and dm.task_prompts is not None
    assert not dm.transitions.obs[:, hidden_goal.GOAL_SLICE].any()
    assert not dm.transitions.next_obs[:, hidden_goal.GOAL_SLICE].any()
    assert not dm.task_prompts.traj_obs[..., hidden_goal.GOAL_SLICE].any()  # held-out regions' too
    envs = make_eval_envs(SPLIT["unseen_tasks"][0], 2, seed=0)
    obs, _ = envs.reset(seed=[0, 1])
    assert not obs[:, hidden_goal.GOAL_SLICE].any()
    envs.close()


@pytest.mark.parametrize("task", ["hidden-reach-right-near-high", "hidden-reach-centre-far-low"])
def test_the_region_expert_succeeds_where_the_blind_expert_fails(task: str) -> None:
    rows = {name: run_episodes(policy, task, range(4), 4, seed=0)
            for name, policy, _ in reference_policies([(task, "unseen")])}  # fmt: skip
    assert set(rows) == {"expert", "expert-blind"}
    assert rows["expert"].successes >= 3 and rows["expert-blind"].successes == 0
