"""The ``llmdpd`` command: ``fit | validate | test | collect`` through one LightningCLI.

``llmdpd collect --config C`` builds the config's datasets and embeds its prompts
(``PromptedOfflineDataModule.prepare_data``) without training. Dimensions are declared once, on the
datamodule, and linked into the model.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.module import LLMDPDModule


class LLMDPDTrainer(L.Trainer):
    """A ``Trainer`` with the ``collect`` subcommand and rollout options on ``test``."""

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
        """
        from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation

        evaluators = [cb for cb in self.callbacks if isinstance(cb, RolloutEvaluation)]
        if not evaluators:
            evaluators = [RolloutEvaluation()]
            self.callbacks.append(evaluators[0])
        for cb in evaluators:
            if episodes is not None:
                if episodes < 1:
                    raise ValueError(f"--episodes must be >= 1, got {episodes}")
                cb.test_episodes = episodes
            if videos is not None:
                if videos < 0:
                    raise ValueError(f"--videos must be >= 0, got {videos}")
                cb.video_episodes = videos
            cb.test_seen = cb.test_seen if seen is None else seen
            cb.expert_reference = cb.expert_reference if expert is None else expert
            cb.output = output or cb.output
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule)


class LLMDPDCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "collect": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        for attr in ("obs_dim", "act_dim", "text_embed_dim"):
            parser.link_arguments(f"data.{attr}", f"model.{attr}", apply_on="instantiate")
        parser.link_arguments("data.traj_prompt_len", "model.traj_prompt_len")
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"],
            default="highest",
            help="torch.set_float32_matmul_precision for the run: 'high' lets float32 matmuls use TF32 on "
            "NVIDIA GPUs from Ampere on (several times faster, 10-bit mantissa inputs); 'medium' allows "
            "lower precision still. 'highest', the default, keeps full float32. The frozen LLM always "
            "runs at 'highest' (its embeddings are cached).",
        )

    def before_instantiate_classes(self) -> None:
        torch.set_float32_matmul_precision(self._get(self.config, "float32_matmul_precision"))

    def after_test(self) -> None:
        """The results JSON's path is the last line ``llmdpd test`` prints."""
        from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation

        for cb in self.trainer.callbacks:
            if isinstance(cb, RolloutEvaluation) and cb.json_path is not None:
                print(cb.json_path)


def build_cli(args: list[str] | None = None) -> LLMDPDCLI:
    """Parse ``args`` (``sys.argv`` if None), instantiate, and run the subcommand."""
    return LLMDPDCLI(
        LLMDPDModule,
        PromptedOfflineDataModule,
        trainer_class=LLMDPDTrainer,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``llmdpd``; tests call ``main(["fit", "--config", ...])`` in-process."""
    build_cli(args)


if __name__ == "__main__":
    main()
