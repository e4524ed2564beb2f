"""Tests for llmdpd_pl.export: ``llmdpd export`` writes safetensors, JSON and a model card, no pickle; the
exported folder acts exactly as its checkpoint, also after ``add_task``; bad input is one line, exit 2."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmdpd_pl import load_policy
from llmdpd_pl.cli import main
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.rollouts import TaskResult, write_json
from tests.model_fixtures import ModelData, model_data, one_thread
from tests.pretrained_fixtures import Trained, trained

__all__ = ["model_data", "one_thread", "trained"]  # fixtures imported for pytest

TASKS = ("reach", "push", "box-close")
PICKLE = b"\x80"  # the first byte of a pickle (protocol >= 2)


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out), *extra])
    return out


def _actions(policy: object, states: np.ndarray, task: str, seed: int = 0) -> np.ndarray:
    return policy.act(states, task, torch.Generator().manual_seed(seed))  # type: ignore[attr-defined]


@pytest.mark.parametrize("arm", ["both", "text"])
def test_the_export_acts_as_its_checkpoint(trained: dict[str, Trained], model_data: ModelData,
                                           tmp_path: Path, arm: str) -> None:  # fmt: skip
    """Every task, two generator seeds, two prompt trajectories, a task added to both: equal bit for bit."""
    folder = _export(trained[arm].ckpt, tmp_path / "policy")
    ckpt, exported = (load_policy(p, cache_dir=model_data.cache_dir) for p in (trained[arm].ckpt, folder))
    assert exported.tasks == ckpt.tasks == TASKS
    assert exported.action_selection == ckpt.action_selection
    bank = ckpt.module.task_bank
    states = bank.traj_obs_bank[:, 0].reshape(-1, bank.traj_obs_bank.shape[-1]).double().numpy()  # (15, S)
    for task in TASKS:
        for seed in (0, 1):
            assert np.array_equal(_actions(exported, states, task, seed), _actions(ckpt, states, task, seed))
        generators = [torch.Generator().manual_seed(0) for _ in range(2)]
        pairs = zip((ckpt, exported), generators, strict=True)
        one, other = (p.act(states, task, g, prompt_index=1) for p, g in pairs)
        assert np.array_equal(one, other), task
    for policy in (ckpt, exported):
        trajectory = (bank.traj_obs_bank[2].numpy(), bank.traj_act_bank[2].numpy())
        policy.add_task("shut-the-box", text="Lower the lid onto the box to close it.", trajectory=trajectory)
    new = [_actions(p, states, "shut-the-box") for p in (ckpt, exported)]
    assert np.array_equal(*new)
    assert not np.array_equal(new[0], _actions(ckpt, states, "box-close"))


def test_an_export_holds_no_pickle(trained: dict[str, Trained], tmp_path: Path) -> None:
    results = write_json([TaskResult("reach", "seen", "agent", 1, 1.0, 0.2, 1.0, 12.5, 20.0, 3.0)],
                         tmp_path / "r.json", {})  # fmt: skip
    folder = _export(trained["both"].ckpt, tmp_path / "policy", "--results", str(results))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for path in folder.iterdir():
        assert not zipfile.is_zipfile(path) and not path.read_bytes().startswith(PICKLE), path.name
    tensors = load_file(folder / "model.safetensors")  # safetensors: no code runs on load
    assert any(k.startswith("ema_policy.") for k in tensors) and "task_bank.text_bank" in tensors
    assert any(k.startswith("critic_target.") for k in tensors)  # q_softmax scores with them
    config = json.loads((folder / "config.json").read_text())
    assert config["action_selection"] == {"mode": "q_softmax", "n_action_candidates": 8}
    assert config["task_bank"]["task_names"] == list(TASKS)
    assert config["task_bank"]["llm"]["model"] == "minilm"
    assert config["observation_statistics"]["mean"] == tensors["task_bank.obs_mean"].tolist()
    assert config["provenance"]["updates"] == 2 and config["provenance"]["train_provenance"]
    card = (folder / "README.md").read_text()
    assert "reach, push" in card and "box-close" in card and "100.0%" in card  # the results table

    sample = load_file(_export(trained["text"].ckpt, tmp_path / "sample") / "model.safetensors")
    assert not any(k.startswith(("critic_target.", "policy.")) for k in sample)  # `sample` needs no critic


def test_an_export_replaces_only_an_export(trained: dict[str, Trained], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder = _export(trained["text"].ckpt, tmp_path / "policy")
    _export(trained["both"].ckpt, folder)  # over an earlier export: replaced whole
    assert load_policy(folder).action_selection == "q_softmax"
    assert [p.name for p in tmp_path.iterdir()] == ["policy"], "a temporary folder was left behind"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    ckpt, missing, x = str(trained["both"].ckpt), str(tmp_path / "missing.ckpt"), str(tmp_path / "x")
    for args, key in ((["--ckpt_path", ckpt, "--out", str(tmp_path / "mine")], "out"),
                      (["--ckpt_path", missing, "--out", x], "ckpt_path"),
                      (["--ckpt_path", ckpt, "--out", x, "--results", str(tmp_path / "mine" / "notes.txt")],
                       "results")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["export", *args])
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), lines
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "x").exists()


def test_a_damaged_export_is_one_config_error(trained: dict[str, Trained], tmp_path: Path) -> None:
    folder = _export(trained["both"].ckpt, tmp_path / "policy")
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ConfigError, match="version"):
        load_policy(folder)
    sample = {**config["model"], "action_selection": "sample"}  # would need fewer tensors
    (folder / "config.json").write_text(json.dumps({**config, "model": sample}))
    with pytest.raises(ConfigError, match="does not hold the tensors"):
        load_policy(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError) as info:
        load_policy(folder)
    assert info.value.key == "path" and len(tensors) > 0
