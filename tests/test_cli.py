"""End-to-end tests of the ``llmdpd`` CLI: fit, resume, collect, config errors, ablations, 2-process DDP."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmdpd_pl.cli import main
from llmdpd_pl.data.embeddings import TextEncoder
from llmdpd_pl.data.spec import DatasetSpec, QualityLevel
from tests.model_fixtures import ModelData, max_abs_diff, model_data, one_thread, write_config

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given and ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])


def test_fit_writes_checkpoint_and_resumes(model_data: ModelData, tmp_path: Path) -> None:
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config)])  # max_steps 6: 3 updates
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    ckpt = _load(checkpoints[0])
    assert ckpt["global_step"] == 6 and ckpt["llmdpd"]["updates"] == 3
    bank = ckpt["state_dict"]["task_bank._extra_state"]
    assert bank["task_names"] == ["reach", "push", "box-close"] and bank["n_seen"] == 2
    assert bank["llm"]["model"] == "minilm" and len(bank["llm"]["weights"]) == 64  # the LLM's identity
    assert "ActorEMA" in ckpt["callbacks"]
    stream_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert stream_state == [{"consumed": 3, "seed": 0, "rank": 0}]
    assert "model:" in (tmp_path / "config.yaml").read_text()  # the resolved config, saved by the CLI

    # Resume from it for 2 more updates (max_steps counts both optimizers' steps).
    main(["fit", "--config", str(config), "--ckpt_path", str(checkpoints[0]), "--trainer.max_steps", "10",
          "--trainer.default_root_dir", str(tmp_path / "resumed")])
    (resumed,) = (tmp_path / "resumed" / "checkpoints").glob("*.ckpt")
    ckpt = _load(resumed)
    assert ckpt["global_step"] == 10 and ckpt["llmdpd"]["updates"] == 5


@pytest.mark.parametrize("override", [["--model.prompts", "trajectory"], ["--model.prompts", "none"],
                                      ["--model.text_source", "random"]])
def test_ablations_are_config_only(model_data: ModelData, tmp_path: Path, override: list[str]) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2", *override])
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    ckpt = _load(path)
    assert ckpt["hyper_parameters"][override[0].removeprefix("--model.")] == override[1]
    weights = ckpt["state_dict"]
    has_text = any(k.startswith("policy.text_head.") for k in weights)
    has_traj = any(k.startswith("policy.traj_encoder.") for k in weights)
    expected = {"trajectory": (False, True), "none": (False, False), "random": (True, True)}[override[1]]
    assert (has_text, has_traj) == expected
    assert ckpt["llmdpd"]["updates"] == 1


def test_collect_builds_datasets_and_embeddings_once(tmp_path: Path, model_data: ModelData) -> None:
    spec = DatasetSpec(root=str(tmp_path / "minari"), levels={"expert": QualityLevel(1, noise_std=0.1)},
                       prompt_episodes=1, max_episode_steps=10, workers=1)
    data = {"seen_tasks": ["reach"], "unseen_tasks": ["push"], "dataset": dataclasses.asdict(spec),
            "cache_dir": str(tmp_path / "embeddings")}
    config = write_config(tmp_path / "collect.yaml", model_data, tmp_path, data=data)
    passes = TextEncoder.total_forward_passes
    main(["collect", "--config", str(config)])
    made = sorted(p.relative_to(spec.root).as_posix() for p in Path(spec.root).glob("llmdpd/*/*/llmdpd.json"))
    assert made == ["llmdpd/push/prompts-v0/llmdpd.json", "llmdpd/reach/prompts-v0/llmdpd.json",
                    "llmdpd/reach/train-v0/llmdpd.json"]
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 2  # one text prompt per task
    assert TextEncoder.total_forward_passes > passes
    stamps = {p: p.stat().st_mtime_ns for p in Path(spec.root).rglob("*") if p.is_file()}

    passes = TextEncoder.total_forward_passes
    main(["collect", "--config", str(config)])  # everything present: nothing rebuilt, no LLM pass
    assert TextEncoder.total_forward_passes == passes
    assert {p: p.stat().st_mtime_ns for p in Path(spec.root).rglob("*") if p.is_file()} == stamps


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_float32_matmul_precision_is_set_for_the_run(
    model_data: ModelData, tmp_path: Path, precision: str
) -> None:
    """The option reaches torch (TF32 on NVIDIA GPUs with ``high``) and the saved config."""
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    before = torch.get_float32_matmul_precision()
    try:
        main(["fit", "--config", str(config), "--trainer.max_steps", "2",
              "--float32_matmul_precision", precision])
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert f"float32_matmul_precision: {precision}" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        (["--model.prompts", "bogus"], ["model.prompts", "bogus"]),  # rejected by the parser (Literal)
        (["--data.seen_tasks", "[box-clos]"], ["data.seen_tasks", "box-clos", "box-close"]),  # with a hint
        (["--model.tau", "2"], ["model.tau", "2"]),
        (["--data.batch_size", "0"], ["data.batch_size", "0"]),
        (["--float32_matmul_precision", "tf32"], ["float32_matmul_precision", "tf32"]),
    ],
)
def test_bad_config_value_names_the_field(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: list[str],
    names: list[str],
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", str(config), *override])
    message = str(info.value) + capsys.readouterr().err
    for name in names:
        assert name in message
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_weights(model_data: ModelData, tmp_path: Path) -> None:
    """Plain ``ddp`` fails here (two backward passes on disjoint parameter sets, DESIGN §5)."""
    callbacks = [
        {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
         "init_args": {"decay": 0.9, "start": 1, "every": 1}},
        {"class_path": "tests.model_fixtures.RankStateDump", "init_args": {"out_dir": str(tmp_path)}},
    ]
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, trainer={"callbacks": callbacks})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "llmdpd_pl.cli", "fit", "--config", str(config), "--trainer.accelerator",
           "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = _load(tmp_path / "rank0.pt"), _load(tmp_path / "rank1.pt")
    for r in (rank0, rank1):
        assert (r["world_size"], r["updates"], r["global_step"]) == (2, 3, 6)
    # Each rank trained on its own batches, so equal weights come from the gradient all-reduce.
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
    # Same all-reduced gradients, same float32 ops on both ranks: bit-identical.
    assert max_abs_diff(rank0["state"], rank1["state"]) == 0.0
