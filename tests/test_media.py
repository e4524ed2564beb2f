"""Figures and videos reach every logger: an offline Weights & Biases run of ``llmdpd fit`` and ``llmdpd
test`` (the real ``wandb`` package, ``WANDB_MODE=offline``) holds the scalars, the rollout videos and the
prompt-sensitivity matrix's figure. TensorBoard's route is tested in ``tests/test_video.py`` and
``tests/callbacks/test_rollout_evaluation.py``.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmdpd_pl.cli import main
from tests.model_fixtures import ModelData, model_data, one_thread, write_config

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

wandb = pytest.importorskip("wandb")  # the `wandb` extra; `make install` installs it with `dev`


def _records(path: Path) -> Iterator[Any]:
    """The protobuf records of a run's ``.wandb`` file, after its 7-byte header: LevelDB's log format, 32 KiB
    blocks of chunks, each with a 7-byte header (checksum, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)
    """
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (left := block - pos % block) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _history_keys(run: Path) -> set[str]:
    (path,) = run.glob("run-*.wandb")
    history = (r.history for r in _records(path) if r.WhichOneof("record_type") == "history")
    return {item.key or "/".join(item.nested_key) for h in history for item in h.item}


def test_an_offline_wandb_run_holds_scalars_videos_and_the_matrix(
    model_data: ModelData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    evaluation = {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation",
                  "init_args": {"max_steps": 10, "num_envs": 1, "episodes": 1, "test_episodes": 1,
                                "every_n_updates": 2, "video_episodes": 1, "video_size": 32}}
    ema = {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
           "init_args": {"decay": 0.9, "start": 1, "every": 1}}  # fmt: skip
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(tmp_path), "project": "llmdpd-test", "offline": True}}
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path,  # fit saves config.yaml
                          trainer={"max_steps": 4, "log_every_n_steps": 1, "callbacks": [ema, evaluation],
                                   "logger": logger})  # fmt: skip
    main(["fit", "--config", str(config)])
    wandb.finish()  # as the end of the process would: `llmdpd test` starts its own run
    (fit_run,) = (tmp_path / "wandb").glob("offline-run-*")
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--expert", "false", "--videos", "1",
          "--prompt_swap", "text", "--output", str(tmp_path / "results.json")])  # fmt: skip
    wandb.finish()
    (test_run,) = set((tmp_path / "wandb").glob("offline-run-*")) - {fit_run}

    scalars = {"train/critic/loss", "train/actor/bc_loss", "grad_norm/denoiser", "eval/seen/success"}
    videos = {f"{split}/{task}/video_ep0/videos" for split, task in
              [("seen", "reach"), ("seen", "push"), ("unseen", "box-close")]}  # fmt: skip
    assert scalars | {f"eval/{v}" for v in videos} <= _history_keys(fit_run)
    assert {"test/unseen/success", "test/prompt_matrix/text/filenames"} | {f"test/{v}" for v in videos} <= (
        _history_keys(test_run)
    )
    fit_videos = fit_run / "files" / "media" / "videos"
    assert len(list(fit_videos.rglob("*.gif"))) == 3  # the evaluation at update 2
    test_media = test_run / "files" / "media"
    assert len(list((test_media / "videos").rglob("*.gif"))) == 3
    (matrix,) = (test_media / "images").rglob("*.png")
    assert "prompt_matrix" in matrix.as_posix()
