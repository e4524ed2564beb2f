"""``LLMDPDTrainer``: Lightning's ``Trainer`` with the ``collect`` subcommand, rollout options on ``test``,
a training clock in every checkpoint, and no partial log folder after a user error."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, Timer

from llmdpd_pl.callbacks.progress import UpdatesBar
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.errors import ConfigError, at_least, user_error_line


class LLMDPDTrainer(L.Trainer):
    """A ``Trainer`` with the ``collect`` subcommand and rollout options on ``test``.

    It always has a ``Timer`` (``max_time`` adds one with a limit), so every checkpoint records its
    training wall time, and ``llmdpd test`` reports it. Its progress bar counts updates
    (:class:`~llmdpd_pl.callbacks.progress.UpdatesBar`) unless another is given or bars are disabled.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = list(kwargs.get("callbacks") or [])
        bar_given = any(isinstance(c, ProgressBar) for c in callbacks)
        if kwargs.get("enable_progress_bar") is not False and not bar_given:
            kwargs["callbacks"] = [*callbacks, UpdatesBar()]
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, Timer) for cb in self.callbacks):
            self.callbacks.append(Timer())

    def fit(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 (Trainer.fit)
        with self._no_partial_log_dir():
            super().fit(*args, **kwargs)

    @contextmanager
    def _no_partial_log_dir(self) -> Iterator[None]:
        """A run stopped by a user error leaves no log folder of its own (``version_N/``) behind, so the
        next run gets the version number this one would have had."""
        log_dir = self.logger.log_dir if self.logger is not None else None
        folder = Path(log_dir) if log_dir and self.is_global_zero else None
        existed = folder is None or folder.exists()
        try:
            yield
        except Exception as err:
            if user_error_line(err) is not None and not existed and folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def collect(self, model: L.LightningModule, datamodule: PromptedOfflineDataModule) -> None:
        """Collect missing datasets and embed missing prompts (rank 0 work of ``prepare_data``)."""
        datamodule.prepare_data()

    def test(  # type: ignore[override]
        self,
        model: L.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: L.LightningDataModule | None = None,
        episodes: int | None = None,
        seen: bool | None = None,
        expert: bool | None = None,
        output: str | None = None,
        videos: int | None = None,
        prompt_index: int | Literal["all"] | None = None,
        prompts_from: Literal["config", "checkpoint"] | None = None,
        prompt_swap: Literal["text", "trajectory", "both"] | None = None,
    ) -> Any:
        """Evaluate a checkpoint by rollouts on the config's unseen (and optionally seen) tasks.

        Args:
            model: The module.
            dataloaders: Unused by rollouts; kept for Lightning.
            ckpt_path: Checkpoint to evaluate.
            verbose: Print Lightning's metric table too.
            datamodule: The datamodule (task lists, prompts).
            episodes: Episodes per task (overrides the config's ``RolloutEvaluation.test_episodes``).
            seen: Evaluate the seen tasks too.
            expert: Add the scripted expert's reference row per task.
            output: Path of the results JSON.
            videos: Episodes per task to record as GIFs (``<log_dir>/videos/test/``) and TensorBoard
                images, besides the scored ones (overrides ``RolloutEvaluation.video_episodes``; 0: none).
            prompt_index: The prompt trajectory that conditions each task, or ``all`` (round robin over
                the episodes).
            prompts_from: ``config`` (default): the config's prompts, for any task; ``checkpoint``: the
                training-time prompt banks, exactly.
            prompt_swap: Also run the prompt-sensitivity matrix, swapping the ``text``, ``trajectory`` or
                ``both`` prompts between tasks (JSON and PNG in the log dir, a TensorBoard image).
        """
        from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation

        given = {"episodes": (episodes, 1), "videos": (videos, 0), "prompt_index": (prompt_index, 0)}
        for key, (value, low) in given.items():
            if isinstance(value, int):  # not None (the callback's value) nor "all"
                at_least(key, value, low)
        evaluator = next((cb for cb in self.callbacks if isinstance(cb, RolloutEvaluation)), None)
        if evaluator is None:
            evaluator = RolloutEvaluation()
            self.callbacks.append(evaluator)
        asked = {"episodes": episodes, "seen": seen, "expert": expert, "output": output, "videos": videos,
                 "prompt_index": prompt_index, "prompts_from": prompts_from, "prompt_swap": prompt_swap}
        options = replace(evaluator.test_options, **{k: v for k, v in asked.items() if v is not None})
        try:
            with self._no_partial_log_dir(), evaluator.testing(options):
                return super().test(model, dataloaders, ckpt_path, verbose, datamodule)
        except RuntimeError as err:  # a strict load_state_dict: another suite's or task set's checkpoint
            if "Error(s) in loading state_dict" not in str(err):
                raise
            first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
            raise ConfigError("ckpt_path", f"its weights do not fit the network this config builds "
                              f"({first[:160]}); test it with the suite and tasks it was trained on",
                              ckpt_path) from None  # fmt: skip


__all__ = ["LLMDPDTrainer"]
