"""``UpdatesBar``: one progress bar over the whole fit, counted in updates, with the logged losses beside it.

Lightning's default bars count the batches of each epoch, and Rich's reads ``Epoch 2/-2`` when ``max_steps``
sets the run's length. An epoch means nothing here (``steps_per_epoch`` only sets how often the data is
reshuffled), and one update is two of Lightning's optimizer steps: this bar counts updates to
``max_steps / 2``. It refreshes live on a terminal and every 10 s in a log file, on rank 0 only.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from llmdpd_pl.utils import PROGRESS_INTERVAL


class UpdatesBar(ProgressBar):
    """The fit's progress in updates (``pl_module.updates``), continuing from a resumed checkpoint's count."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        total = trainer.max_steps // 2 if trainer.max_steps > 0 else None  # two optimizer steps per update
        self.bar = tqdm(total=total, initial=pl_module.updates, desc="fit", unit="update", leave=True,
                        disable=not (self._enabled and trainer.is_global_zero), dynamic_ncols=True,
                        mininterval=PROGRESS_INTERVAL)  # fmt: skip

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.bar is None or self.bar.disable:
            return
        if pl_module.updates % trainer.log_every_n_steps == 0:  # the metrics change only when logged
            metrics = self.get_metrics(trainer, pl_module)
            self.bar.set_postfix({k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k != "v_num"},
                                 refresh=False)  # fmt: skip
        self.bar.update(pl_module.updates - self.bar.n)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.on_train_end(trainer, pl_module)


__all__ = ["UpdatesBar"]
