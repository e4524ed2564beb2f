"""Tests for ``RolloutEvaluation``: rows and the reduce, evaluation during fit, ``llmdpd test`` end to end.

One tiny fit (4 updates, evaluating every 2) is shared by the module: its logged metrics are checked,
and its checkpoint is what ``llmdpd test`` evaluates. Episodes last 20 steps and each task gets one env
(building a Meta-World env costs ~0.6 s; stepping is cheap), so the tiny random agent's success rates
mean nothing: these tests check plumbing (rows, counts, metrics, files), not performance.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import pytest

from llmdpd_pl.callbacks.evaluation import RolloutEvaluation
from llmdpd_pl.cli import build_cli, main
from llmdpd_pl.evaluation import TaskResult, expert_policy, run_episodes
from tests.model_fixtures import ModelData, model_data, one_thread, write_config

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

SEEN, UNSEEN = ("reach", "push"), ("box-close",)  # conftest's session collection
EVAL_STEPS = 20


def _evaluation(**overrides: object) -> dict:
    init = {"max_steps": EVAL_STEPS, "num_envs": 1, "episodes": 2, "test_episodes": 2, **overrides}
    return {"class_path": "llmdpd_pl.callbacks.evaluation.RolloutEvaluation", "init_args": init}


# ------------------------------------------------------------------------------- evaluate()
def test_constructor_rejects_non_positive_counts() -> None:
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        RolloutEvaluation(num_envs=0)
    with pytest.raises(ValueError, match="test_episodes"):
        RolloutEvaluation(test_episodes=0)


def test_evaluate_on_one_rank_equals_run_episodes(tmp_path: Path) -> None:
    # The whole path of the callback (shard → run_episodes → strategy.reduce → rows) on a real CPU
    # trainer with world size 1; exact sharding across ranks is tested in tests/test_evaluation.py.
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    cb = RolloutEvaluation(num_envs=3, max_steps=50, seed=0)
    rows = cb.evaluate(trainer, {"expert": expert_policy()}, [("reach", "seen")], episodes=7)
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
    metrics_csv: Path
    callback_metrics: set[str]


@pytest.fixture(scope="module")
def fitted(model_data: ModelData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fitted]:
    """Fit 4 updates with RolloutEvaluation(every_n_updates=2) and a CSV logger.

    The config holds the RolloutEvaluation that ``llmdpd
    test`` uses too.
    """
    root = tmp_path_factory.mktemp("fit")
    callbacks = [{"class_path": "llmdpd_pl.callbacks.ema.ActorEMA", "init_args": {"decay": 0.9, "start": 1,
                                                                                 "every": 1}},
                 _evaluation(every_n_updates=2)]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(root), "name": "logs", "version": "fit"}}
    config = write_config(root / "config.yaml", model_data, root,
                          trainer={"max_steps": 8, "callbacks": callbacks, "logger": logger})  # 4 updates
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["llmdpd"])  # LightningCLI warns about pytest's own argv otherwise
        cli = build_cli(["fit", "--config", str(config)])
    assert cli.model.updates == 4
    (ckpt,) = (root / "logs" / "fit" / "checkpoints").glob("*.ckpt")
    yield Fitted(config, ckpt, root / "logs" / "fit" / "metrics.csv", set(cli.trainer.callback_metrics))


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given and ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])


def test_fit_logs_eval_metrics_every_n_updates(fitted: Fitted) -> None:
    # callback_metrics is what ModelCheckpoint(monitor="eval/unseen/success") reads.
    assert {"eval/seen/success", "eval/unseen/success"} <= fitted.callback_metrics
    with fitted.metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval/seen/success")]
    # Updates 2 and 4 of 4, at the step Lightning gives that batch's train metrics (batches before it).
    # Not multiples of log_every_n_steps (50): logged through Lightning, these rows would be dropped.
    assert [int(r["step"]) for r in evals] == [1, 3], evals
    for r in evals:
        for key in ("eval/seen/success", "eval/unseen/success", "eval/seen/reach/success",
                    "eval/seen/push/success", "eval/unseen/box-close/success"):
            assert 0.0 <= float(r[key]) <= 1.0, (key, r[key])
        assert float(r["eval/unseen/box-close/return"]) >= 0.0  # Meta-World rewards are in [0, 10]


def _table_rows(stdout: str) -> dict[tuple[str, str, str], int]:
    """(task, split, policy) → episodes, from the results table's task rows."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in SEEN + UNSEEN and parts[1] in ("seen", "unseen"):
            rows[(parts[0], parts[1], parts[2])] = int(parts[3])
    return rows


def test_llmdpd_test_end_to_end(
    fitted: Fitted, tmp_path: Path, capsys: pytest.CaptureFixture[str], plain_argv: None
) -> None:
    config, ckpt = fitted.config, fitted.ckpt
    output = tmp_path / "r.json"
    capsys.readouterr()
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--episodes", "3", "--expert", "true",
          "--output", str(output), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    stdout = capsys.readouterr().out

    expected = {(t, "seen", p) for t in SEEN for p in ("agent", "expert")}
    expected |= {(t, "unseen", p) for t in UNSEEN for p in ("agent", "expert")}
    table = _table_rows(stdout)
    assert set(table) == expected, stdout
    assert set(table.values()) == {3}
    assert any(line.startswith("mean seen") for line in stdout.splitlines())
    assert any(line.startswith("mean unseen") for line in stdout.splitlines())
    assert stdout.strip().splitlines()[-1] == str(output)  # the JSON path is the last line printed

    data = json.loads(output.read_text())
    assert {(r["task"], r["split"], r["policy"]) for r in data["results"]} == expected
    assert [r["episodes"] for r in data["results"]] == [3] * len(expected)
    assert data["meta"]["episodes_per_task"] == 3
    assert data["meta"]["ckpt_path"] == str(ckpt) and data["meta"]["updates"] == 4
    assert data["meta"]["max_steps"] == EVAL_STEPS and data["meta"]["world_size"] == 1


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
