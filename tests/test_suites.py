"""The two suites: task names, widths and episode lengths; locomotion end to end (collect → fit → test),
a Minari dataset given by id, and the errors for a bad env id or mismatched widths."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from llmdpd_pl.cli import main
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.locomotion import normalized_score
from llmdpd_pl.rollouts import TaskResult, format_results, random_policy, run_episodes
from llmdpd_pl.suites import check_tasks, dims, episode_steps, make_eval_envs, suite_of
from tests.conftest import LOCOMOTION_TASK, Collected
from tests.model_fixtures import ModelData, model_data, write_config

__all__ = ["model_data"]


def test_a_task_is_a_meta_world_name_or_a_gymnasium_id() -> None:
    suites = [suite_of(t) for t in ("box-close", "Hopper-v5", "Pendulum-v1")]
    assert suites == ["metaworld", "locomotion", "locomotion"]
    assert check_tasks(["reach", "Walker2d-v5"], "data.seen_tasks") == ["reach", "Walker2d-v5"]
    with pytest.raises(ValueError, match=r"data\.seen_tasks: unknown task 'Hoper-v5'\. Did you mean 'Hopper"):
        check_tasks(["Hoper-v5"], "data.seen_tasks")
    with pytest.raises(ValueError, match=r"data\.unseen_tasks: duplicate"):
        check_tasks(["Hopper-v5", "Hopper-v5"], "data.unseen_tasks")


def test_widths_and_episode_lengths_come_from_the_envs() -> None:
    assert dims("reach") == (39, 4) and episode_steps("reach") == 500
    assert dims("Hopper-v5") == (11, 3) and dims("HalfCheetah-v5") == dims("Walker2d-v5") == (17, 6)
    assert episode_steps("Hopper-v5") == 1000
    with pytest.raises(ValueError, match=r"data\.seen_tasks: the policy acts in \[-1, 1\].*'Pendulum-v1'"):
        dims("Pendulum-v1")


def test_locomotion_episodes_are_seeded_by_their_id_and_scored_by_d4rl() -> None:
    envs = make_eval_envs(LOCOMOTION_TASK, 2, seed=0)
    try:
        first = run_episodes(random_policy(1), LOCOMOTION_TASK, [0, 1], 2, 0, max_steps=50, envs=envs)
        again = run_episodes(random_policy(1), LOCOMOTION_TASK, [0, 1], 2, 0, max_steps=50, envs=envs)
        other = run_episodes(random_policy(1), LOCOMOTION_TASK, [2, 3], 2, 0, max_steps=50, envs=envs)
    finally:
        envs.close()
    assert first == again and first != other
    assert first.successes == 0 and 2 <= first.length_sum < 2 * 50  # a random hopper falls before 50 steps
    row = TaskResult.from_counts(LOCOMOTION_TASK, "seen", "agent", first)
    assert (row.success_rate, row.ci_low, row.ci_high, row.mean_steps_to_success) == (None, None, None, None)
    assert row.normalized_score == pytest.approx(normalized_score(LOCOMOTION_TASK, first.return_sum / 2))
    mean, second_moment = first.return_sum / 2, first.return_sq_sum / 2
    assert row.return_std == pytest.approx(np.sqrt(second_moment - mean**2))
    line = format_results([row]).splitlines()[2].split()
    assert line[:6] == [LOCOMOTION_TASK, "seen", "agent", "2", "-", "-"]
    assert line[-1] == f"{row.normalized_score:.1f}"


def _locomotion_config(tmp_path: Path, model_data: ModelData, sac: Collected, **data: object) -> Path:
    evaluation = {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation",
                  "init_args": {"every_n_updates": 2, "episodes": 2, "test_episodes": 3, "num_envs": 3,
                                "max_steps": 30}}  # fmt: skip
    ema = {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
           "init_args": {"decay": 0.9, "start": 1, "every": 1}}  # fmt: skip
    return write_config(
        tmp_path / "locomotion.yaml", model_data, tmp_path,
        trainer={"callbacks": [ema, evaluation]},
        data={"seen_tasks": [LOCOMOTION_TASK], "unseen_tasks": [], "dataset": dataclasses.asdict(sac.spec),
              "normalize_obs": False, **data},
    )  # fmt: skip


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["llmdpd"])


def test_locomotion_fits_and_tests_end_to_end(
    sac_collected: Collected, model_data: ModelData, tmp_path: Path, plain_argv: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config = _locomotion_config(tmp_path, model_data, sac_collected)
    main(["fit", "--config", str(config)])  # 3 updates, an evaluation at update 2
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    output = tmp_path / "results.json"
    capsys.readouterr()
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output)])
    stdout = capsys.readouterr().out
    data = json.loads(output.read_text())
    (row,) = data["results"]  # no scripted expert on locomotion
    assert (row["task"], row["policy"], row["episodes"]) == (LOCOMOTION_TASK, "agent", 3)
    assert row["success_rate"] is None
    assert row["normalized_score"] == pytest.approx(normalized_score(LOCOMOTION_TASK, row["mean_return"]))
    assert 1 <= row["mean_length"] <= 30
    printed = next(
        cells
        for line in stdout.splitlines()
        if (cells := line.split())[:3] == [LOCOMOTION_TASK, "seen", "agent"]
    )
    assert printed[-1] == f"{row['normalized_score']:.1f}" and printed[6] == f"{row['mean_return']:.1f}"
    (evaluation,) = data["meta"]["during_fit"]  # the fit's evaluation, restored from the checkpoint
    assert (evaluation["updates"], evaluation["episodes"]) == (2, 2)
    assert evaluation["normalized_score"] == pytest.approx(
        normalized_score(LOCOMOTION_TASK, evaluation["mean_return"])
    )


def test_a_minari_dataset_given_by_id_trains_with_its_last_episodes_as_prompts(
    sac_collected: Collected, tmp_path: Path
) -> None:
    root = tmp_path / "minari"
    shutil.copytree(Path(sac_collected.spec.root) / "llmdpd" / "hopper" / "medium-replay-v0",
                    root / "someone" / "hopper" / "replay-v1")  # fmt: skip
    spec = dataclasses.replace(sac_collected.spec, root=str(root), prompt_episodes=2)
    dm = PromptedOfflineDataModule(
        [LOCOMOTION_TASK],
        [],
        dataset=spec,
        dataset_id="someone/hopper/replay-v1",
        cache_dir=str(tmp_path / "emb"),
        traj_prompt_len=5,
        traj_prompt_stride=2,
    )
    dm.prepare_data(progress=False)  # collects nothing: the data is given
    dm.setup("fit")
    assert not (root / "llmdpd").exists()
    episodes = json.loads((root / "someone/hopper/replay-v1/llmdpd.json").read_text())["episodes"]
    assert dm.transitions is not None and dm.task_prompts is not None
    assert len(dm.transitions.obs) == sum(e["length"] for e in episodes[:-2])  # the last 2 are held out
    assert dm.task_prompts.traj_obs.shape == (1, 2, 5, 11)


def test_a_missing_dataset_id_says_how_to_get_it(sac_collected: Collected, tmp_path: Path) -> None:
    dm = PromptedOfflineDataModule([LOCOMOTION_TASK], [], dataset=dataclasses.replace(sac_collected.spec,
                                   root=str(tmp_path)), dataset_id="mujoco/hopper/medium-v0")  # fmt: skip
    wanted = r"data\.dataset_id: no Minari dataset of this id .*`minari download mujoco/hopper/medium-v0`"
    with pytest.raises(ValueError, match=wanted + r".*\(got 'mujoco/hopper/medium-v0'\)"):
        dm.setup("fit")


def test_data_of_other_widths_than_the_tasks_env_is_refused(sac_collected: Collected, tmp_path: Path) -> None:
    # Walker2d's env is 17 wide; the data is Hopper's, 11 wide.
    hopper = "llmdpd/hopper/medium-replay-v0"
    dm = PromptedOfflineDataModule(
        ["Walker2d-v5"], [], dataset=sac_collected.spec, dataset_id=hopper, cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"observations \(\d+, 11\).*expected \(T(\+1)?, 17\)"):
        dm.setup("fit")
