"""Checkpoints of two-update fits through ``llmdpd fit``, for test_pretrained and test_export.

Import ``trained`` (and ``model_data``, ``one_thread``) into a test file; the fits run once per session (a
module global, as ``model_data``), about a second each.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmdpd_pl.cli import main
from tests.model_fixtures import ModelData, write_config

#: name → (model.prompts, model.action_selection)
ARMS = {"both": ("both", "q_softmax"), "text": ("text", "sample")}
#: ``llmdpd test``'s evaluation: one 20-step episode per task in one env, seed 0.
EVALUATION = {"max_steps": 20, "num_envs": 1, "test_episodes": 1, "seed": 0}


@dataclass(frozen=True)
class Trained:
    """A fit's config and checkpoint."""

    config: Path
    ckpt: Path


_TRAINED: dict[str, Trained] | None = None


@pytest.fixture(scope="session")
def trained(model_data: ModelData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """name → a two-update fit, whose EMA (decay 0.9 from update 0) differs from the actor."""
    global _TRAINED
    if _TRAINED is None:
        root = tmp_path_factory.mktemp("pretrained")
        ema = {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
               "init_args": {"decay": 0.9, "start": 0, "every": 1}}  # fmt: skip
        evaluation = {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation",
                      "init_args": EVALUATION}  # fmt: skip
        made = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["llmdpd"])  # LightningCLI warns about pytest's own argv otherwise
            for name, (prompts, selection) in ARMS.items():
                config = write_config(root / f"{name}.yaml", model_data, root / name,
                                      trainer={"max_steps": 4, "callbacks": [ema, evaluation]},
                                      model={"prompts": prompts, "action_selection": selection})  # fmt: skip
                main(["fit", "--config", str(config)])
                (ckpt,) = (root / name / "checkpoints").glob("*.ckpt")
                made[name] = Trained(config, ckpt)
        _TRAINED = made
    return _TRAINED
