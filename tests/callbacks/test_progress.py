"""The fit's progress bar counts updates over the whole run, from a resumed checkpoint's count on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmdpd_pl.cli import main
from tests.model_fixtures import ModelData, model_data, write_config

__all__ = ["model_data"]  # a fixture imported for pytest


def test_bar_counts_updates_to_max_steps_and_continues_on_resume(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "true"])  # 6 steps: 3 updates
    err = capsys.readouterr().err
    assert "fit: 100%" in err and "3/3" in err and "update" in err
    assert "Epoch" not in err  # Lightning's bars count each epoch's batches: "Epoch 2/-2" with max_steps
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "true", "--ckpt_path", str(ckpt),
          "--trainer.max_steps", "10", "--trainer.default_root_dir", str(tmp_path / "resumed")])
    err = capsys.readouterr().err
    assert "3/5" in err and "5/5" in err and "0/5" not in err
