"""Shared helpers for the model tests (test_module, test_acting, callbacks/test_ema, test_cli, ...): a tiny
real dataset, tiny models.

The data is conftest's session collection (``collected``); this adds an embedding cache for it. Import
the fixtures into a test file (``from tests.model_fixtures import model_data, one_thread``); pytest then
registers them for that file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from llmdpd_pl.data.batches import Batch, Transitions
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.spec import DatasetSpec
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.task_bank import TaskPrompts

SEEN = ["reach", "push"]  # as in conftest's session collection
UNSEEN = ["box-close"]
TRAJ_PROMPT_LEN = 5
TRAJ_PROMPT_STRIDE = 8
BATCH_SIZE = 16
STEPS_PER_EPOCH = 4  # small, so that short runs cross epoch boundaries
# Tiny networks: every test runs in about a second on one shared core.
TINY = dict(hidden_dim=32, prompt_dim=8, traj_d_model=16, traj_layers=1, traj_heads=2, n_action_candidates=8)


@dataclass(frozen=True)
class ModelData:
    """The session's collected datasets (conftest's ``collected``) and an embedding cache filled for them."""

    spec: DatasetSpec
    cache_dir: Path


_MODEL_DATA: ModelData | None = None


@pytest.fixture(scope="session")
def model_data(collected: Any, tmp_path_factory: pytest.TempPathFactory) -> ModelData:
    """Reuses conftest's tiny Meta-World collection (reach, push seen; box-close unseen) and embeds the
    three text prompts with the bundled MiniLM once (cached in a module global: this fixture is imported
    by several test files, each of which would otherwise hold its own session instance)."""
    global _MODEL_DATA
    if _MODEL_DATA is None or _MODEL_DATA.spec != collected.spec:
        data = ModelData(collected.spec, tmp_path_factory.mktemp("embeddings"))
        make_datamodule(data).prepare_data(progress=False)
        _MODEL_DATA = data
    return _MODEL_DATA


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on 2 shared cores, two threads make these tiny matmuls ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_datamodule(data: ModelData, **overrides: Any) -> PromptedOfflineDataModule:
    kwargs: dict[str, Any] = dict(
        seen_tasks=SEEN,
        unseen_tasks=UNSEEN,
        dataset=data.spec,
        cache_dir=str(data.cache_dir),
        batch_size=BATCH_SIZE,
        steps_per_epoch=STEPS_PER_EPOCH,
        traj_prompt_len=TRAJ_PROMPT_LEN,
        traj_prompt_stride=TRAJ_PROMPT_STRIDE,
    )
    kwargs.update(overrides)
    return PromptedOfflineDataModule(**kwargs)


def make_module(dm: PromptedOfflineDataModule, lr: float = 1e-3, **overrides: Any) -> LLMDPDModule:
    kwargs: dict[str, Any] = dict(
        TINY,
        actor_optimizer=partial(torch.optim.Adam, lr=lr, fused=True),
        critic_optimizer=partial(torch.optim.Adam, lr=lr, fused=True),
    )
    kwargs.update(overrides)
    return LLMDPDModule(dm.obs_dim, dm.act_dim, dm.text_embed_dim, dm.traj_prompt_len, **kwargs)


def make_trainer(root: Path, updates: int, **overrides: Any) -> L.Trainer:
    """A quiet CPU trainer for ``updates`` updates (``max_steps = 2 × updates``: two optimizers)."""
    kwargs: dict[str, Any] = dict(
        max_steps=2 * updates,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def bank_module(data: ModelData, **overrides: Any) -> tuple[LLMDPDModule, PromptedOfflineDataModule]:
    """A tiny module with the real task bank, without a trainer (for direct calls)."""
    dm = make_datamodule(data)
    dm.setup("fit")
    module = make_module(dm, **overrides)
    assert dm.task_prompts is not None
    module.task_bank.fill(dm.task_prompts, dm.obs_mean, dm.obs_std, len(dm.seen_tasks))
    return module, dm


def fit(model_data: ModelData, tmp_path: Path, updates: int, module_kw: dict[str, Any] | None = None,
        callbacks: list[L.Callback] | None = None, seed: int = 0) -> tuple[LLMDPDModule, L.Trainer]:
    """Seeds, then fits a tiny module on the tiny data for ``updates`` updates."""
    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(model_data)
    module = make_module(dm, **(module_kw or {}))
    trainer = make_trainer(tmp_path, updates, callbacks=callbacks or [])
    trainer.fit(module, datamodule=dm)
    return module, trainer


def normalized(module: LLMDPDModule, batch: Batch) -> Batch:
    """``batch`` with its states normalized by the module's task bank, as the update sees them."""
    bank = module.task_bank
    return dataclasses.replace(batch, obs=bank.normalize(batch.obs), next_obs=bank.normalize(batch.next_obs))


def bandit_data(n: int = 1000, good_fraction: float = 0.2, seed: int = 1) -> Transitions:
    """One-step bandit: constant 2-d state; 1-d action -0.5 (bad, r = 0) or +0.5 (good, r = 1); terminal."""
    gen = torch.Generator().manual_seed(seed)
    good = torch.rand(n, generator=gen) < good_fraction  # (n,)
    action = torch.where(good, 0.5, -0.5)[:, None]  # (n, 1)
    obs = torch.zeros(n, 2)
    task = torch.zeros(n, dtype=torch.long)
    return Transitions(obs, action, good.float(), obs.clone(), torch.zeros(n), task)


def bandit_prompts(text_dim: int = 8, traj_len: int = 3) -> TaskPrompts:
    """One task's prompts built from tensors (obs dim 2, action dim 1)."""
    return TaskPrompts(
        names=("reach",),
        text_embedding=torch.randn(1, text_dim, generator=torch.Generator().manual_seed(0)),
        traj_obs=torch.zeros(1, 1, traj_len, 2),
        traj_act=torch.zeros(1, 1, traj_len, 1),
    )


def trained_state(module: LLMDPDModule) -> dict[str, Tensor]:
    """Everything training changes in the module (weights, target critics), detached CPU clones."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if isinstance(v, Tensor)}


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a − b| over all entries of two dicts of tensors with the same keys (float64 arithmetic)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a) if x.numel()]
    return max(diffs, default=0.0)


def write_config(path: Path, source: ModelData, root: Path, **sections: dict[str, Any]) -> Path:
    """A smoke-like YAML config for ``llmdpd`` with every path under ``root``; ``sections`` update it."""
    import yaml

    spec = dataclasses.asdict(source.spec)
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,  # 3 updates
            "logger": False,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
                    "init_args": {"decay": 0.9, "start": 1, "every": 1},
                }
            ],
        },
        "model": {
            **TINY,
            "actor_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3, "fused": True}},
            "critic_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3, "fused": True}},
        },
        "data": {
            "seen_tasks": SEEN,
            "unseen_tasks": UNSEEN,
            "dataset": spec,
            "cache_dir": str(source.cache_dir),
            "batch_size": BATCH_SIZE,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "traj_prompt_len": TRAJ_PROMPT_LEN,
            "traj_prompt_stride": TRAJ_PROMPT_STRIDE,
        },
    }
    for name, update in sections.items():
        config[name] = {**config.get(name, {}), **update}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def state_with_ema(module: LLMDPDModule) -> dict[str, Tensor]:
    """:func:`trained_state` plus the EMA actor's weights (``ema.*``)."""
    state = trained_state(module)
    state.update({f"ema.{k}": v.detach().cpu().clone() for k, v in module.ema_policy.state_dict().items()})
    return state


class RankStateDump(L.Callback):
    """Saves each rank's initial and trained state and its batches to ``out_dir/rank<r>.pt`` at the end
    of training.

    Used by the DDP test through the CLI config (it must be importable in the launched processes).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.initial: dict[str, Tensor] = {}
        self.batches: list[Batch] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.initial = state_with_ema(pl_module)  # after DDP's broadcast of rank 0's weights

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        fields = {f.name: getattr(batch, f.name).cpu().clone() for f in dataclasses.fields(batch)}
        self.batches.append(Batch(**fields))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.save(
            {
                "initial": self.initial,
                "state": state_with_ema(pl_module),
                "updates": pl_module.updates,
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
                "batches": self.batches,
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )
