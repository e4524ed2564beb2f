"""Tests for llmdpd_pl.callbacks.ema: ``ActorEMA`` is a copy before ``start`` and decays after, is
checkpointed, and serves the Q targets."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.objectives import critic_objective, draw
from tests.model_fixtures import (
    ModelData,
    bank_module,
    make_datamodule,
    make_module,
    make_trainer,
    max_abs_diff,
    model_data,
    one_thread,
)

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest


def _params(module: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class _EMAHistory(L.Callback):
    """After every update (placed after ``ActorEMA``): the online policy and the EMA policy."""

    def __init__(self, ema: ActorEMA) -> None:
        self.ema = ema
        self.ema0: dict[str, Tensor] = {}
        self.policy: list[dict[str, Tensor]] = []
        self.averaged: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        assert self.ema.averaged is not None
        self.ema0 = _params(self.ema.averaged.module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        assert self.ema.averaged is not None
        self.policy.append(_params(pl_module.policy))
        self.averaged.append(_params(self.ema.averaged.module))


def _fit_with_ema(model_data: ModelData, root: Path, updates: int, ema: ActorEMA, *extra: L.Callback,
                  seed: int = 0) -> tuple[Any, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(model_data)
    module = make_module(dm)
    trainer = make_trainer(root, updates, callbacks=[ema, *extra])
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_ema_copies_before_start_then_follows_decay(model_data: ModelData, tmp_path: Path) -> None:
    decay, start, every = 0.9, 3, 2
    ema = ActorEMA(decay=decay, start=start, every=every)
    history = _EMAHistory(ema)
    module, _ = _fit_with_ema(model_data, tmp_path, 7, ema, history)
    assert module.ema_policy is ema.averaged.module  # type: ignore[union-attr]
    assert len(history.policy) == 7
    previous = history.ema0
    for update, (policy, averaged) in enumerate(zip(history.policy, history.averaged, strict=True), start=1):
        if update < start:  # a plain copy of the policy
            expected = policy
        elif (update - start) % every == 0:  # θ_EMA ← decay·θ_EMA + (1 − decay)·θ
            expected = {k: decay * previous[k] + (1 - decay) * policy[k] for k in policy}
        else:  # untouched between averaging updates
            expected = previous
        # float32 a·x + b·y against torch's lerp: a few ulps of weights of order 1.
        assert max_abs_diff(averaged, expected) < 1e-6, f"update {update}"
        if update >= start:
            # Adam steps of lr 1e-3 keep the policy ~1e-3 away from its average: 1e-4 is far above rounding.
            assert max_abs_diff(averaged, policy) > 1e-4, f"update {update}: EMA is not averaging"
        previous = averaged


def test_ema_state_is_checkpointed_and_restored(model_data: ModelData, tmp_path: Path) -> None:
    ema = ActorEMA(decay=0.5, start=1, every=1)
    module, trainer = _fit_with_ema(model_data, tmp_path, 3, ema)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    assert ema.averaged is not None
    saved = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    # decay 0.5 over Adam steps of lr 1e-3: the average lags the policy by ~1e-3, far above rounding.
    assert max_abs_diff(_params(ema.averaged.module), _params(module.policy)) > 1e-4

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    stored = checkpoint["callbacks"][ema.state_key]
    assert stored.keys() == saved.keys()
    assert max_abs_diff(stored, saved) == 0.0

    # Resume (no further update: max_steps already reached) into a fresh module with other initial weights.
    fresh = ActorEMA(decay=0.5, start=1, every=1)
    L.seed_everything(1, verbose=False)
    dm = make_datamodule(model_data)
    resumed = make_module(dm)
    make_trainer(tmp_path, 3, callbacks=[fresh]).fit(resumed, datamodule=dm, ckpt_path=path)
    assert fresh.averaged is not None
    assert max_abs_diff(fresh.averaged.state_dict(), saved) == 0.0
    assert resumed.ema_policy is fresh.averaged.module


def test_q_targets_come_from_the_ema_actor(model_data: ModelData) -> None:
    module, dm = bank_module(model_data)
    assert module.ema_policy is module.policy  # no callback attached: the online actor
    ema_copy = make_module(dm).policy
    ema_copy.load_state_dict(module.policy.state_dict())
    module.attach_ema(ema_copy)
    assert module.ema_policy is ema_copy

    assert dm.stream is not None
    raw, bank = dm.stream.sample(0), module.task_bank
    batch = replace(raw, obs=bank.normalize(raw.obs), next_obs=bank.normalize(raw.next_obs))
    index = torch.zeros(bank.n_seen, dtype=torch.long)
    prompts = bank.prompts(torch.arange(bank.n_seen), index)

    def target() -> Tensor:
        module.ema_updated()  # the weights below change in place, not through ActorEMA
        draws = draw(module.policy.diffusion, batch.action, 1, torch.Generator().manual_seed(0))
        z, ema_z = module.policy.encode_prompts(*prompts), module.ema_prompt_embeddings(index)
        args = (module.critic, module.critic_target, module.ema_policy, batch, z, ema_z, draws, 0.99)
        return critic_objective(*args).target_mean

    base = target()
    with torch.no_grad():  # change the online denoiser only: the target must not move
        for p in module.policy.denoiser.parameters():
            p.add_(0.5)
    assert torch.equal(target(), base)
    with torch.no_grad():  # change the EMA prompt encoder: the EMA's z, hence the target, moves
        for p in ema_copy.traj_encoder.parameters():
            p.mul_(1.5)
    moved = target()
    assert not torch.equal(moved, base)
    with torch.no_grad():  # change the EMA denoiser: the target moves
        for p in ema_copy.denoiser.parameters():
            p.add_(0.5)
    assert not torch.equal(target(), moved)


def test_update_draws_q_targets_from_the_attached_ema(model_data: ModelData) -> None:
    """Through ``LLMDPDModule.update`` with an ``ActorEMA`` attached: a' ~ π_EMA(· | s', z_EMA).

    The same update (batch, noise, weights) is rerun with one network changed at a time. The online
    denoiser only acts in the actor step, so the TD target must not see it; the EMA's denoiser draws a',
    and the EMA's prompt encoders give z_EMA, so each must move the target.
    """
    module, dm = bank_module(model_data)
    ema = ActorEMA(decay=0.5, start=0, every=1)
    ema.setup(None, module, "fit")  # type: ignore[arg-type]
    assert ema.averaged is not None and dm.stream is not None
    averaged = ema.averaged.module
    assert module.ema_policy is averaged and averaged is not module.policy
    batch = dm.stream.sample(0)
    module_state, ema_state = copy.deepcopy(module.state_dict()), copy.deepcopy(averaged.state_dict())

    def target(changed: torch.nn.Module | None = None) -> Tensor:
        module.load_state_dict(module_state)
        averaged.load_state_dict(ema_state)
        module.updates = 0  # the update's noise is seeded by (seed, rank, updates)
        if changed is not None:
            with torch.no_grad():
                for p in changed.parameters():
                    p.mul_(1.5).add_(0.1)
        module.ema_updated()  # as ActorEMA does after each write
        opts = (torch.optim.Adam(module.critic.parameters()), torch.optim.Adam(module.policy.parameters()))
        return module.update(batch, *opts, backward=lambda loss: loss.backward()).critic.target_mean

    base = target()
    assert torch.equal(target(), base)  # the rerun is exact
    assert torch.equal(target(module.policy.denoiser), base), "the online actor drew the target actions"
    assert not torch.equal(target(averaged.denoiser), base), "the EMA actor did not draw a'"
    for encoder in (averaged.text_head, averaged.traj_encoder):
        assert encoder is not None
        assert not torch.equal(target(encoder), base), "a' was not conditioned on the EMA's z"


def test_ema_prompt_embeddings_are_recomputed_exactly_when_the_ema_changes(model_data: ModelData) -> None:
    """The cached table of the EMA's z equals a fresh encoding, before and after each write it is told of."""
    module, dm = bank_module(model_data)
    ema = make_module(dm).policy
    ema.load_state_dict(module.policy.state_dict())
    module.attach_ema(ema)
    n_prompts = module.task_bank.n_prompts
    assert n_prompts > 1
    seen = torch.arange(module.task_bank.n_seen)

    def check(index: Tensor) -> Tensor:
        got = module.ema_prompt_embeddings(index)
        with torch.no_grad():
            want = ema.encode_prompts(*module.task_bank.prompts(seen, index))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return got

    first = torch.zeros(module.task_bank.n_seen, dtype=torch.long)
    last = torch.full((module.task_bank.n_seen,), n_prompts - 1)
    check(first)
    table = module._ema_z
    check(last)
    assert module._ema_z is table  # no write in between: gathered from the same table
    with torch.no_grad():  # an EMA write (as ActorEMA's copy or average), then ActorEMA's notice
        torch._foreach_lerp_(list(ema.parameters()), [p + 1.0 for p in ema.parameters()], 0.5)
    module.ema_updated()
    assert table is not None and not torch.equal(check(last), table[seen, last])
    ema.load_state_dict(module.policy.state_dict())  # a checkpoint-style load, then its notice
    module.ema_updated()
    check(first)


def test_actor_ema_tells_the_module_when_it_writes(model_data: ModelData) -> None:
    """Between ActorEMA's writes the module's table of the EMA's z stays; after one it is fresh."""
    module, _ = bank_module(model_data)
    ema = ActorEMA(decay=0.5, start=0, every=2)
    ema.setup(None, module, "fit")  # type: ignore[arg-type]
    assert ema.averaged is not None and module.ema_policy is ema.averaged.module
    index = torch.zeros(module.task_bank.n_seen, dtype=torch.long)
    before = module.ema_prompt_embeddings(index)
    table = module._ema_z
    with torch.no_grad():
        for p in module.policy.traj_encoder.parameters():  # type: ignore[union-attr]
            p.mul_(1.5)
    module.updates = 1  # (1 - start) % every != 0: no write
    ema.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
    assert module._ema_z is table
    module.updates = 2  # a write: the EMA moves halfway to the changed policy
    ema.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
    after = module.ema_prompt_embeddings(index)
    seen = torch.arange(module.task_bank.n_seen)
    with torch.no_grad():
        want = ema.averaged.module.encode_prompts(*module.task_bank.prompts(seen, index))
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(after, before)


@pytest.mark.parametrize(("kwargs", "field"), [({"decay": 1.0}, "decay"), ({"start": -1}, "start"),
                                                ({"every": 0}, "every")])
def test_ema_rejects_bad_arguments(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ActorEMA(**kwargs)


@pytest.mark.parametrize("with_ema", [False, True])
def test_fitting_without_actor_ema_says_so(model_data: ModelData, tmp_path: Path, with_ema: bool) -> None:
    dm = make_datamodule(model_data)
    callbacks = [ActorEMA(decay=0.5, start=0, every=1)] if with_ema else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, 1, callbacks=callbacks).fit(make_module(dm), datamodule=dm)
    assert any("without the ActorEMA callback" in str(w.message) for w in caught) != with_ema
