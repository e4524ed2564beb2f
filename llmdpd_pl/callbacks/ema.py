"""Actor EMA: an ``AveragedModel`` of the policy and its prompt encoders (not the critics, not the LLM).

Diffusion-QL draws its Q-target actions from its EMA actor; so does this module. Two departures from the
official Diffusion-QL code (``docs/decisions.md``, "Departures"): acting (``llmdpd test``) draws its
candidate actions from this EMA actor, where Diffusion-QL's ``sample_action`` uses the online actor; and
before ``start`` updates the EMA is a plain copy of the policy, where Diffusion-QL's ``step_ema`` returns
early and leaves its EMA at its initial copy. Afterwards every ``every`` updates θ_EMA ← decay·θ_EMA +
(1 − decay)·θ (:func:`~llmdpd_pl.averaging.ema_update`), counted in the module's own ``updates``, not
Lightning's ``global_step`` (which counts both optimizers' steps). The averaged weights are saved in the
checkpoint and restored on resume. After every write it calls ``pl_module.ema_updated()``, so the module
can drop what it computed from the old weights.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel

from llmdpd_pl.averaging import ema_update
from llmdpd_pl.errors import ConfigError, at_least


class ActorEMA(L.Callback):
    """Exponential moving average of ``pl_module.policy``.

    Args:
        decay: EMA decay (Diffusion-QL: 0.995).
        start: Updates before averaging begins; until then the EMA copies the policy (Diffusion-QL also
            waits 1000 updates, but keeps its EMA at the initial copy meanwhile).
        every: Average every ``every`` updates (Diffusion-QL: 5).
    """

    def __init__(self, decay: float = 0.995, start: int = 1000, every: int = 5) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError("ActorEMA.decay", "must be in [0, 1)", decay)
        at_least("ActorEMA.start", start, 0)
        at_least("ActorEMA.every", every, 1)
        self.decay, self.start, self.every = decay, start, every
        self.averaged: AveragedModel | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.averaged is None:
            self.averaged = AveragedModel(pl_module.policy, use_buffers=True)  # holds it; ema_update averages
            self.averaged.requires_grad_(False)
            # It starts as a copy of the policy. Count that copy as the first average: AveragedModel's first
            # update_parameters() is otherwise a plain copy, which would delay averaging to start + every.
            self.averaged.n_averaged.fill_(1)
        if self._pending is not None:
            self.averaged.load_state_dict(self._pending)
            self._pending = None
        pl_module.attach_ema(self.averaged.module)

    def _to_device(self, pl_module: L.LightningModule) -> None:
        assert self.averaged is not None
        self.averaged.to(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.averaged is not None
        updates = pl_module.updates
        if updates < self.start:
            torch._foreach_copy_(list(self.averaged.module.parameters()), list(pl_module.policy.parameters()))
        elif (updates - self.start) % self.every == 0:  # the policy's buffers are constants: not averaged
            ema_update(self.averaged.module.parameters(), pl_module.policy.parameters(), self.decay)
            self.averaged.n_averaged += 1  # AveragedModel's count, saved with it
        else:
            return
        pl_module.ema_updated()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.averaged is None else self.averaged.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.averaged is None:
            self._pending = state_dict
        else:
            self.averaged.load_state_dict(state_dict)
