"""Tests for ``RolloutEvaluation``: rows and the reduce, evaluation during fit, ``llmdpd test`` end to end.

One tiny fit (4 updates, evaluating every 2, with one 64-px video per task) is shared by the module: its
logged metrics and videos are checked, and its checkpoint is what ``llmdpd test`` evaluates. Episodes
last 20 steps and each task gets one env (building a Meta-World env costs ~0.6 s; stepping is cheap), so
the tiny random agent's success rates mean nothing: these tests check plumbing (rows, counts, metrics,
files), not performance.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from llmdpd_pl.acting import module_policy
from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation
from llmdpd_pl.cli import build_cli, main
from llmdpd_pl.data.embeddings import embed_texts
from llmdpd_pl.data.prompts import load_prompts, render_prompt
from llmdpd_pl.data.spec import DatasetSpec
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.rollouts import TaskResult, expert_policy, run_episodes, wilson_interval
from tests.model_fixtures import ModelData, model_data, one_thread, write_config

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

SEEN, UNSEEN = ("reach", "push"), ("box-close",)  # conftest's session collection
EVAL_STEPS = 20
TEST_STEPS = 60  # llmdpd test's end-to-end run: long enough for reach's scripted expert to succeed
VIDEO_STRIDE = 4  # RolloutEvaluation's default
VIDEO_FRAMES = 1 + EVAL_STEPS // VIDEO_STRIDE  # the reset frame, then every 4th step


def _evaluation(**overrides: object) -> dict:
    init = {"max_steps": EVAL_STEPS, "num_envs": 1, "episodes": 2, "test_episodes": 2, **overrides}
    return {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation", "init_args": init}


# ------------------------------------------------------------------------------- evaluate()
def test_constructor_rejects_non_positive_counts() -> None:
    with pytest.raises(ValueError, match=r"num_envs: must be >= 1 \(got 0\)"):
        RolloutEvaluation(num_envs=0)
    with pytest.raises(ValueError, match="test_episodes"):
        RolloutEvaluation(test_episodes=0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("video_episodes", -1, r"video_episodes: must be >= 0 \(got -1\)"),
        ("video_size", 8, r"video_size: must be >= 16 \(got 8\)"),
        ("video_stride", 0, r"video_stride: must be >= 1 \(got 0\)"),
        ("video_fps", 0, r"video_fps: must be >= 1 \(got 0\)"),
        ("video_fps", 60, r"video_fps: must be <= 50 .*\(got 60\)"),
    ],
)
def test_constructor_rejects_bad_video_options(option: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"RolloutEvaluation.{message}"):
        RolloutEvaluation(**{option: value})  # type: ignore[arg-type]


def test_videos_are_off_by_default() -> None:
    assert RolloutEvaluation().video_episodes == 0


def test_evaluate_on_one_rank_equals_run_episodes(tmp_path: Path) -> None:
    # The whole path of the callback (shard → run_episodes → strategy.reduce → rows) on a real CPU
    # trainer with world size 1; exact sharding across ranks is tested in tests/test_rollouts.py.
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    cb = RolloutEvaluation(num_envs=3, max_steps=50, seed=0)
    rows = cb.evaluate(trainer, {"expert": [expert_policy()]}, [("reach", "seen")], episodes=7)
    expected = TaskResult.from_counts("reach", "seen", "expert",
                                      run_episodes(expert_policy(), "reach", list(range(7)), 3, 0, 50))
    assert len(rows) == 1 and rows[0].episodes == 7
    # The reduce goes through float64 tensors: floats survive it exactly.
    assert asdict(rows[0]) == asdict(expected)


# ------------------------------------------------------------------------------- fit, then test
@dataclass(frozen=True)
class Fitted:
    """The shared tiny fit: its config (with the RolloutEvaluation), checkpoint and logged metrics."""

    config: Path
    ckpt: Path
    log_dir: Path
    callback_metrics: set[str]


@pytest.fixture(scope="module")
def fitted(model_data: ModelData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fitted]:
    """Fit 4 updates with RolloutEvaluation(every_n_updates=2, video_episodes=1) and a CSV logger.

    The config holds the RolloutEvaluation that ``llmdpd test`` uses too.
    """
    root = tmp_path_factory.mktemp("fit")
    callbacks = [{"class_path": "llmdpd_pl.callbacks.ema.ActorEMA", "init_args": {"decay": 0.9, "start": 1,
                                                                                 "every": 1}},
                 _evaluation(every_n_updates=2, video_episodes=1, video_size=64)]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(root), "name": "logs", "version": "fit"}}
    config = write_config(root / "config.yaml", model_data, root,
                          trainer={"max_steps": 8, "callbacks": callbacks, "logger": logger})  # 4 updates
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["llmdpd"])  # LightningCLI warns about pytest's own argv otherwise
        cli = build_cli(["fit", "--config", str(config)])
    assert cli.model.updates == 4
    (ckpt,) = (root / "logs" / "fit" / "checkpoints").glob("*.ckpt")
    yield Fitted(config, ckpt, root / "logs" / "fit", set(cli.trainer.callback_metrics))


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given and ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])


def _trained_agent(ckpt: Path) -> LLMDPDModule:
    """The checkpoint's module with its EMA actor attached, as ``llmdpd test`` restores it."""
    module = LLMDPDModule.load_from_checkpoint(ckpt, map_location="cpu")
    ema = ActorEMA()
    ema.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]["ActorEMA"])
    ema.setup(None, module, "test")  # type: ignore[arg-type]
    return module


def test_fit_logs_eval_metrics_every_n_updates(fitted: Fitted) -> None:
    # callback_metrics is what ModelCheckpoint(monitor="eval/unseen/success") reads.
    assert {"eval/seen/success", "eval/unseen/success"} <= fitted.callback_metrics
    with (fitted.log_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval/seen/success")]
    # Updates 2 and 4 of 4, at the step Lightning gives that batch's train metrics (batches before it).
    # Not multiples of log_every_n_steps (50): logged through Lightning, these rows would be dropped.
    assert [int(r["step"]) for r in evals] == [1, 3], evals
    tasks = [(t, "seen") for t in SEEN] + [(t, "unseen") for t in UNSEEN]
    for r in evals:  # each split's mean is the mean of its tasks' rates (floats written as repr: exact)
        for split in ("seen", "unseen"):
            rates = [float(r[f"eval/{s}/{t}/success"]) for t, s in tasks if s == split]
            assert float(r[f"eval/{split}/success"]) == pytest.approx(sum(rates) / len(rates), abs=1e-12)
    # The last evaluation ran the weights the checkpoint holds: the same episodes (layouts 0 and 1,
    # action noise seeded by seed + updates = 4) rerun here give the logged numbers exactly.
    module = _trained_agent(fitted.ckpt)
    assert module.updates == 4
    policy = module_policy(module, prompt_index=0, seed=4)
    for task, split in tasks:
        counts = run_episodes(policy, task, [0, 1], num_envs=1, seed=0, max_steps=EVAL_STEPS)
        want = TaskResult.from_counts(task, split, "agent", counts)
        assert float(evals[-1][f"eval/{split}/{task}/success"]) == want.success_rate, task
        assert float(evals[-1][f"eval/{split}/{task}/return"]) == want.mean_return, task


def test_fit_records_videos_at_each_evaluation(fitted: Fitted) -> None:
    videos = fitted.log_dir / "videos"
    expected = {f"update{u}/{split}/{task}_ep0.gif" for u in (2, 4)
                for split, tasks in (("seen", SEEN), ("unseen", UNSEEN)) for task in tasks}
    assert {p.relative_to(videos).as_posix() for p in videos.rglob("*.gif")} == expected
    with Image.open(videos / "update4" / "unseen" / "box-close_ep0.gif") as gif:
        assert gif.size == (64, 64)
        assert 1 < gif.n_frames <= VIDEO_FRAMES  # Pillow merges identical consecutive frames


TABLE_ROW = re.compile(  # task split policy eps success% [ci_low, ci_high] return [± std] length t_succ
    r"^(?P<task>\S+) +(?P<split>seen|unseen|target) +(?P<policy>\S+) +(?P<episodes>\d+) +"
    r"(?P<success>[\d.]+)% +\[(?P<ci_low>[\d.]+), (?P<ci_high>[\d.]+)\] +"
    r"(?P<mean_return>-?[\d.]+)(?: ± [\d.]+)? +(?P<mean_length>\d+) +(?P<t_succ>\S+)"
)


def _table_rows(stdout: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """(task, split, policy) → the printed fields of that row of the results table."""
    matches = (TABLE_ROW.match(line) for line in stdout.splitlines())
    return {(m["task"], m["split"], m["policy"]): m.groupdict() for m in matches if m}


def _as_printed(row: dict[str, Any]) -> dict[str, str]:
    """A results-JSON row in the table's format (percentages and return to 0.1, length to 1)."""
    t_succ = row["mean_steps_to_success"]
    pct = {k: f"{100 * row[k]:.1f}" for k in ("ci_low", "ci_high")}
    return {"task": row["task"], "split": row["split"], "policy": row["policy"],
            "episodes": str(row["episodes"]), "success": f"{100 * row['success_rate']:.1f}", **pct,
            "mean_return": f"{row['mean_return']:.1f}", "mean_length": f"{row['mean_length']:.0f}",
            "t_succ": "-" if t_succ is None else f"{t_succ:.0f}"}


def test_llmdpd_test_end_to_end(
    fitted: Fitted, tmp_path: Path, capsys: pytest.CaptureFixture[str], plain_argv: None
) -> None:
    """The printed table and the JSON agree row for row, and the scripted expert succeeds on reach.

    Test episodes last 60 steps here (the fit's 20 are too short for any success): reach's expert first
    succeeds by step 60 on layouts 0-2 (measured: steps 46-51).
    """
    config = yaml.safe_load(fitted.config.read_text())
    callbacks = config["trainer"]["callbacks"]
    evaluation = next(c for c in callbacks if c["class_path"].endswith("RolloutEvaluation"))
    evaluation["init_args"]["max_steps"] = TEST_STEPS
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    config_path, ckpt, output = tmp_path / "config.yaml", fitted.ckpt, tmp_path / "r.json"
    capsys.readouterr()
    main(["test", "--config", str(config_path), "--ckpt_path", str(ckpt), "--episodes", "3",
          "--expert", "true", "--output", str(output), "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--videos", "0"])  # the config records 1 a task
    stdout, stderr = capsys.readouterr()
    assert "eval:" not in stderr  # no progress bar when the trainer has none

    expected = {(t, "seen", p) for t in SEEN for p in ("agent", "expert")}
    expected |= {(t, "unseen", p) for t in UNSEEN for p in ("agent", "expert")}
    table = _table_rows(stdout)
    assert set(table) == expected, stdout
    assert stdout.strip().splitlines()[-1] == str(output)  # the JSON path is the last line printed

    data = json.loads(output.read_text())
    assert {(r["task"], r["split"], r["policy"]) for r in data["results"]} == expected
    assert [r["episodes"] for r in data["results"]] == [3] * len(expected)
    for row in data["results"]:
        key = (row["task"], row["split"], row["policy"])
        assert table[key] == _as_printed(row), key
        successes = round(3 * row["success_rate"])
        assert successes == pytest.approx(3 * row["success_rate"], abs=1e-9)  # a whole number of episodes
        assert (row["ci_low"], row["ci_high"]) == wilson_interval(successes, 3), key
        assert row["mean_length"] == TEST_STEPS  # Meta-World episodes end by time limit only
    means = {line.split()[1]: line.split()[2] for line in stdout.splitlines() if line.startswith("mean ")}
    for split in ("seen", "unseen"):  # the agent's mean success per split, printed
        rates = [r["success_rate"] for r in data["results"] if r["split"] == split and r["policy"] == "agent"]
        assert means[split] == f"{100 * sum(rates) / len(rates):.1f}%", split
    expert = {r["task"]: r for r in data["results"] if r["policy"] == "expert"}
    assert expert["reach"]["success_rate"] == 1.0 and expert["reach"]["mean_steps_to_success"] < TEST_STEPS
    assert data["meta"]["episodes_per_task"] == 3
    assert data["meta"]["ckpt_path"] == str(ckpt) and data["meta"]["updates"] == 4
    assert data["meta"]["max_steps"] == TEST_STEPS and data["meta"]["world_size"] == 1
    # The run's identity: the code, the resolved config, the training seed and wall time.
    assert data["meta"]["train_seconds"] > 0 and data["meta"]["model_seed"] == 0
    assert data["meta"]["config"]["model"]["hidden_dim"] == 32
    assert data["meta"]["config"]["ckpt_path"] == str(ckpt)
    commit = data["meta"]["commit"]
    assert commit is None or len(commit.removesuffix("+dirty")) == 40
    # Where the checkpoint came from: the fit's commit, config, seeds and package versions.
    (segment,) = data["meta"]["train_provenance"]
    assert data["meta"]["train_commit"] == segment["commit"] == commit  # trained and tested by this checkout
    assert segment["config"]["model"]["hidden_dim"] == 32 and segment["model_seed"] == 0
    assert segment["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert set(segment["versions"]) == {"torch", "lightning", "metaworld", "transformers", "gymnasium",
                                        "mujoco"}  # fmt: skip
    assert "videos" not in data and not (tmp_path / "videos").exists()  # --videos 0 overrides the config


def test_llmdpd_test_videos(
    fitted: Fitted, tmp_path: Path, capsys: pytest.CaptureFixture[str], plain_argv: None
) -> None:
    # The fit config with a TensorBoard logger; `--videos` 0 and 1 on otherwise identical runs.
    config = yaml.safe_load(fitted.config.read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path), "name": "tb"}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    results = {}
    for videos in (0, 1):
        main(["test", "--config", str(config_path), "--ckpt_path", str(fitted.ckpt), "--episodes", "2",
              "--expert", "false", "--trainer.enable_progress_bar", "false", "--videos", str(videos),
              "--trainer.logger.init_args.version", f"videos{videos}"])
        results[videos] = json.loads((tmp_path / "tb" / f"videos{videos}" / "test_results.json").read_text())
    stdout = capsys.readouterr().out

    assert results[1]["results"] == results[0]["results"]  # the scores do not see the videos
    log_dir = tmp_path / "tb" / "videos1"
    tasks = [(t, "seen") for t in SEEN] + [(t, "unseen") for t in UNSEEN]
    entries = results[1]["videos"]
    assert [(e["task"], e["split"], e["episode"]) for e in entries] == [(t, s, 0) for t, s in tasks]
    for e in entries:
        path = Path(e["path"])
        assert path == log_dir / "videos" / "test" / e["split"] / f"{e['task']}_ep0.gif"
        assert e["frames"] == VIDEO_FRAMES and e["length"] == EVAL_STEPS and isinstance(e["success"], bool)
        with Image.open(path) as gif:
            assert gif.size == (64, 64)
            assert 1 < gif.n_frames <= VIDEO_FRAMES  # Pillow merges identical consecutive frames
    assert not list(log_dir.rglob("*.tmp"))  # written atomically
    assert f"videos: {log_dir / 'videos' / 'test'}" in stdout.splitlines()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"test/{s}/{t}/video_ep0" for t, s in tasks)
    for e in entries:
        (image,) = events.Images(f"test/{e['split']}/{e['task']}/video_ep0")
        assert (image.step, image.width, image.height) == (4, 64, 64)  # at the checkpoint's update count
        assert image.encoded_image_string == Path(e["path"]).read_bytes()
    no_videos = EventAccumulator(str(tmp_path / "tb" / "videos0"), size_guidance={"images": 0})
    no_videos.Reload()
    assert no_videos.Tags()["images"] == [] and "videos" not in results[0]


def test_llmdpd_test_rejects_zero_episodes(
    fitted: Fitted, tmp_path: Path, capsys: pytest.CaptureFixture[str], plain_argv: None
) -> None:
    config, ckpt = fitted.config, fitted.ckpt
    output = tmp_path / "r.json"
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--episodes", "0",
              "--output", str(output), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    message = str(info.value) + capsys.readouterr().err
    assert "episodes" in message and "0" in message
    assert not output.exists()


def test_llmdpd_test_rejects_negative_videos(
    fitted: Fitted, tmp_path: Path, plain_argv: None, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "r.json"
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(fitted.config), "--ckpt_path", str(fitted.ckpt), "--videos", "-1",
              "--output", str(output), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith("error: videos: must be >= 0 (got -1)")
    assert not output.exists()


# ------------------------------------------------------------------------------- prompts at test time
def _test(fitted: Fitted, root: Path, *extra: str) -> tuple[Any, dict]:
    """``llmdpd test`` of the shared checkpoint, 2 episodes a task, no expert: the CLI and its JSON."""
    output = root / "r.json"
    cli = build_cli(["test", "--config", str(fitted.config), "--ckpt_path", str(fitted.ckpt),
                     "--episodes", "2", "--expert", "false", "--output", str(output),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(root), "--videos", "0", *extra])  # fmt: skip
    return cli, json.loads(output.read_text())


def _bank(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("task_bank.") and isinstance(v, torch.Tensor)}


def test_llmdpd_test_runs_a_task_the_checkpoint_never_saw(
    fitted: Fitted, dataset_copy: DatasetSpec, tmp_path: Path, plain_argv: None
) -> None:
    """door-lock is in no training config: its prompts, given at test time, condition the policy."""
    cli, data = _test(fitted, tmp_path, "--data.unseen_tasks", "[door-lock]",
                      "--data.dataset.root", dataset_copy.root)  # its prompt trajectories are collected here
    rows = {(r["task"], r["split"]) for r in data["results"]}
    assert rows == {("reach", "seen"), ("push", "seen"), ("door-lock", "unseen")}
    bank = cli.model.task_bank
    assert bank.task_names == ("reach", "push", "door-lock")
    assert data["meta"]["tasks"]["door-lock"]["prompt_text"] == bank.texts[2]
    assert "door" in bank.texts[2].lower()
    # What training learned stays: the observation statistics are the checkpoint's, not the defaults.
    trained = _bank(fitted.ckpt)
    assert torch.equal(bank.obs_mean, trained["task_bank.obs_mean"])
    assert torch.equal(bank.obs_std, trained["task_bank.obs_std"])
    assert not torch.equal(bank.obs_std, torch.ones_like(bank.obs_std))


def test_a_text_override_at_test_time_is_the_embedding_that_conditions(
    fitted: Fitted, model_data: ModelData, tmp_path: Path, plain_argv: None
) -> None:
    prompt = {"task": "Close the box", "objective": "Put the lid on the box.", "constraints": "Gently."}
    cli, data = _test(fitted, tmp_path, "--data.prompts", json.dumps({"box-close": prompt}))
    dm = cli.datamodule
    text = render_prompt(load_prompts({"box-close": prompt})["box-close"], dm.llm.instruction)
    want, _ = embed_texts({"box-close": text}, dm.llm, model_data.cache_dir)
    row = cli.model.task_bank.task_names.index("box-close")
    assert torch.equal(cli.model.task_bank.text_bank[row], want["box-close"])
    assert not torch.equal(cli.model.task_bank.text_bank[row], _bank(fitted.ckpt)["task_bank.text_bank"][row])
    assert data["meta"]["tasks"]["box-close"]["prompt_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_prompts_from_checkpoint_keeps_the_training_banks_bit_for_bit(
    fitted: Fitted, tmp_path: Path, plain_argv: None
) -> None:
    prompt = {"task": "Close the box", "objective": "Lid on.", "constraints": "None."}
    cli, data = _test(fitted, tmp_path, "--prompts_from", "checkpoint",
                      "--data.prompts", json.dumps({"box-close": prompt}))  # ignored: the banks are kept
    trained = _bank(fitted.ckpt)
    got = {f"task_bank.{k}": v for k, v in cli.model.task_bank.named_buffers()}
    assert got.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(got[key], value), key
    assert data["meta"]["prompts_from"] == "checkpoint"


def test_prompts_from_checkpoint_names_the_tasks_it_lacks(
    fitted: Fitted, dataset_copy: DatasetSpec, tmp_path: Path, plain_argv: None
) -> None:
    with pytest.raises(ValueError, match=r"prompts_from: the checkpoint's task banks lack \['door-lock'\]"):
        _test(fitted, tmp_path, "--prompts_from", "checkpoint", "--data.unseen_tasks", "[door-lock]",
              "--data.dataset.root", dataset_copy.root)


def test_a_different_llm_at_test_time_is_refused(
    fitted: Fitted, tiny_llama_dir: Path, tmp_path: Path, plain_argv: None
) -> None:
    with pytest.raises(ValueError, match=r"data\.llm\.model: .*trained with 'minilm'.*test with the LLM"):
        _test(fitted, tmp_path, "--data.llm.model", str(tiny_llama_dir))
    with pytest.raises(ValueError, match=r"data\.llm\.instruction: .*trained with"):
        _test(fitted, tmp_path, "--data.llm.instruction", "Embed this.")


def test_conflicting_model_keys_at_test_time(
    fitted: Fitted, tmp_path: Path, plain_argv: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"model\.hidden_dim: the checkpoint's is 32, .*\(got 64\)"):
        _test(fitted, tmp_path, "--model.hidden_dim", "64")
    with pytest.raises(ValueError, match=r"model\.prompts: the checkpoint's is 'both', .*\(got 'none'\)"):
        _test(fitted, tmp_path, "--model.prompts", "none")
    capsys.readouterr()
    cli, data = _test(fitted, tmp_path, "--model.action_selection", "sample", "--model.eta", "0.5")
    err = capsys.readouterr().err
    assert "model.action_selection: given 'sample', the checkpoint's is 'q_softmax'; applied" in err
    assert "model.eta: given 0.5, the checkpoint's is 1.0; not used by llmdpd test" in err
    assert cli.model.hparams.action_selection == "sample" and data["meta"]["action_selection"] == "sample"
    assert cli.model.hparams.eta == 1.0  # the checkpoint's


def test_prompt_index_all_runs_the_episodes_round_robin(
    fitted: Fitted, tmp_path: Path, plain_argv: None
) -> None:
    cli, data = _test(fitted, tmp_path, "--prompt_index", "all")
    n_prompts = cli.model.task_bank.n_prompts
    assert n_prompts > 1
    assert data["meta"]["prompt_index"] == "all"
    assert data["meta"]["episode_prompt_index"] == "episode i uses trajectory i mod P"
    assert data["meta"]["tasks"]["reach"]["trajectory_prompt_index"] == list(range(n_prompts))


def test_targets_are_their_own_split_and_always_evaluated() -> None:
    dm = SimpleNamespace(seen_tasks=["reach", "push", "box-close"], target_tasks=["box-close"],
                         unseen_tasks=["door-lock"])  # fmt: skip
    trainer = SimpleNamespace(datamodule=dm)
    cb = RolloutEvaluation()
    assert cb._tasks(trainer, seen=True) == [("reach", "seen"), ("push", "seen"), ("box-close", "target"),
                                             ("door-lock", "unseen")]  # fmt: skip
    assert cb._tasks(trainer, seen=False) == [("box-close", "target"), ("door-lock", "unseen")]


def test_prompt_sensitivity_matrix(fitted: Fitted, tmp_path: Path, plain_argv: None) -> None:
    """Rows = env task, columns = prompt source; the diagonal is the plain test, episode for episode."""
    cli, data = _test(fitted, tmp_path, "--prompt_swap", "both")
    matrix = json.loads((tmp_path / "prompt_matrix.json").read_text())
    tasks = list(SEEN + UNSEEN)
    assert matrix["tasks"] == tasks and matrix["swap"] == "both"
    assert [len(row) for row in matrix["success"]] == [3, 3, 3]
    assert matrix["meta"]["episodes_per_cell"] == 2 and matrix["meta"]["ckpt_path"] == str(fitted.ckpt)
    cells = {(c["task"], c["prompt_source"]): c for c in matrix["cells"]}
    assert set(cells) == {(t, u) for t in tasks for u in tasks}
    plain = {r["task"]: r for r in data["results"]}
    for t in tasks:  # same env layouts and action noise, own prompts: the plain test's episodes exactly
        assert cells[(t, t)]["mean_return"] == plain[t]["mean_return"], t
        assert cells[(t, t)]["success_rate"] == plain[t]["success_rate"], t
    # Another task's prompts change the untrained policy's actions, hence its returns.
    assert any(cells[(t, u)]["mean_return"] != cells[(t, t)]["mean_return"] for t in tasks for u in tasks)
    assert (tmp_path / "prompt_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.trainer.callbacks and any(getattr(cb, "matrix", None) == matrix["success"]
                                         for cb in cli.trainer.callbacks)  # fmt: skip
