"""The ``llmdpd`` command: ``collect | fit | test`` through one LightningCLI, and ``report | export``.

``llmdpd collect --config C`` builds the config's datasets and embeds its prompts
(``PromptedOfflineDataModule.prepare_data``) without training. Dimensions are declared once, on the
datamodule, and linked into the model.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningCLI

from llmdpd_pl.callbacks.provenance import Provenance, train_record
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.embeddings import LLMSpec, check_same_llm, llm_identity
from llmdpd_pl.errors import ConfigError, at_least, reporting_user_errors
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.preflight import preflight, quiet_known_noise
from llmdpd_pl.utils import git_commit


class LLMDPDTrainer(L.Trainer):
    """A ``Trainer`` with the ``collect`` subcommand and rollout options on ``test``.

    It always has a ``Timer`` (``max_time`` adds one with a limit), so every checkpoint records its
    training wall time, and ``llmdpd test`` reports it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, Timer) for cb in self.callbacks):
            self.callbacks.append(Timer())

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
        evaluators = [cb for cb in self.callbacks if isinstance(cb, RolloutEvaluation)]
        if not evaluators:
            evaluators = [RolloutEvaluation()]
            self.callbacks.append(evaluators[0])
        for cb in evaluators:
            cb.test_episodes = cb.test_episodes if episodes is None else episodes
            cb.video_episodes = cb.video_episodes if videos is None else videos
            cb.prompt_index = cb.prompt_index if prompt_index is None else prompt_index
            cb.prompts_from = prompts_from or cb.prompts_from
            cb.prompt_swap = prompt_swap or cb.prompt_swap
            cb.test_seen = cb.test_seen if seen is None else seen
            cb.expert_reference = cb.expert_reference if expert is None else expert
            cb.output = output or cb.output
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule)


#: ``model`` keys that shape the network or its inputs: ``llmdpd test`` takes them from the checkpoint only.
ARCHITECTURE_KEYS = frozenset({
    "obs_dim", "act_dim", "text_embed_dim", "traj_prompt_len", "prompts", "text_source", "text_seed",
    "prompt_dim", "n_diffusion_steps", "beta_schedule", "hidden_dim", "traj_d_model", "traj_layers",
    "traj_heads", "conditioning",
})  # fmt: skip
#: ``model`` keys whose value may change, but not whether it is 0: a lever that adds parameters when on.
SWITCH_KEYS = frozenset({"prompt_dropout", "align_weight"})
#: ``model`` keys that only change how a trained policy acts: ``llmdpd test`` applies the given value.
EVALUATION_KEYS = frozenset({"action_selection", "n_action_candidates", "compile", "guidance"})


def reconcile_with_checkpoint(
    given: dict[str, Any], trained: dict[str, Any], resume: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """``model`` values for ``llmdpd test`` (the checkpoint's, except evaluation keys, which are the given
    ones) or for resuming ``llmdpd fit`` (``resume``: the given ones). Returns them and one note per key
    whose given value differs from the checkpoint's; a :class:`ConfigError` names the first architecture
    key that differs."""
    values, notes = dict(trained), []
    for key, value in given.items():
        if value is None or key not in trained or trained[key] == value:
            continue
        line = f"model.{key}: given {value!r}, the checkpoint's is {trained[key]!r}"
        if resume and key in SWITCH_KEYS and bool(value) != bool(trained[key]):
            raise ConfigError(f"model.{key}", f"the checkpoint's is {trained[key]!r}; turning this lever on "
                              "or off changes the architecture: train anew", value)  # fmt: skip
        if key in ARCHITECTURE_KEYS:
            raise ConfigError(f"model.{key}", f"the checkpoint's is {trained[key]!r}, and a checkpoint's "
                              "architecture is fixed: match it in the config and --model.*, or train anew",
                              value)  # fmt: skip
        if resume or key in EVALUATION_KEYS:
            values[key] = value
            notes.append(f"{line}; applied from this resume on" if resume
                         else f"{line}; applied (it changes only how the trained policy acts)")
        else:
            notes.append(f"{line}; not used by llmdpd test (a training setting)")
    return values, notes


class LLMDPDCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands a user runs here (``validate`` and ``predict`` have nothing to do)."""
        lightning = LightningCLI.subcommands()
        return {"collect": {"model", "datamodule"}, "fit": lightning["fit"], "test": lightning["test"]}

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

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, and keep ``llmdpd test``'s own model values: the checkpoint's hyperparameters replace them
        next, and :meth:`before_instantiate_classes` reconciles the two."""
        super().parse_arguments(parser, args)
        if subcommand := self.config.get("subcommand"):
            preflight(subcommand, self.config[subcommand].clone().as_dict())  # before any work
        if subcommand in ("test", "fit"):  # before the checkpoint's hyperparameters replace them
            self._given_model = self.config[subcommand].model.clone().as_dict()

    def before_instantiate_classes(self) -> None:
        torch.set_float32_matmul_precision(self._get(self.config, "float32_matmul_precision"))
        if self.config.get("subcommand") == "test" and self.config.test.get("ckpt_path"):
            trained = torch.load(self.config.test.ckpt_path, map_location="cpu", weights_only=True)
            bank = trained.get("state_dict", {}).get("task_bank._extra_state") or {}
            if bank.get("llm") and trained.get("hyper_parameters", {}).get("prompts") in ("both", "text"):
                llm = self.config.test.data.get("llm")  # before the model is built for the test LLM's width
                check_same_llm(bank["llm"], llm_identity(LLMSpec(**(llm.as_dict() if llm else {}))))
            values, notes = reconcile_with_checkpoint(self._given_model, trained.get("hyper_parameters", {}))
            timer = trained.get("callbacks", {}).get("Timer", {})
            self._run = {"train_seconds": timer.get("time_elapsed", {}).get("train"), **train_record(trained)}
            for key in EVALUATION_KEYS & values.keys():
                self.config.test.model[key] = values[key]
            for note in notes:
                print(note, file=sys.stderr)

        if self.config.get("subcommand") == "fit" and self.config.fit.get("ckpt_path"):
            self._resume(torch.load(self.config.fit.ckpt_path, map_location="cpu", weights_only=True))

    def _resume(self, trained: dict[str, Any]) -> None:
        """Resuming fit: a changed architecture key is an error; any other changed ``model`` value applies,
        with a note; a changed learning rate is an error (the optimizers' states are restored)."""
        hparams = trained.get("hyper_parameters", {})
        values, notes = reconcile_with_checkpoint(self._given_model, hparams, resume=True)
        for key, value in values.items():
            if key in self._given_model:
                self.config.fit.model[key] = value
        for i, name in enumerate(("critic_optimizer", "actor_optimizer")):  # configure_optimizers' order
            given = (self._given_model.get(name) or {}).get("init_args", {}).get("lr")
            groups = trained.get("optimizer_states", [{}] * 2)[i].get("param_groups", [{}])
            restored = groups[0].get("initial_lr", groups[0].get("lr"))
            if given is not None and restored is not None and given != restored:
                raise ConfigError(f"model.{name}.init_args.lr", f"the checkpoint's is {restored}; resuming "
                                  "restores the optimizer's state, its learning rate included: train anew to "
                                  "change it", given)  # fmt: skip
        for note in notes:
            print(note, file=sys.stderr)

    def before_fit(self) -> None:
        """Every checkpoint records the training commit, config, seeds and package versions."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        self.trainer.callbacks.append(Provenance(config.get("fit", config)))

    def before_test(self) -> None:
        """The results JSON records the code's commit, the resolved config, the training wall time and
        the checkpoint's provenance (:mod:`llmdpd_pl.callbacks.provenance`)."""
        from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation

        config = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        run = {"commit": git_commit(), **getattr(self, "_run", {}), "config": config.get("test", config)}
        if not any(isinstance(cb, RolloutEvaluation) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(RolloutEvaluation())
        for cb in self.trainer.callbacks:
            if isinstance(cb, RolloutEvaluation):
                cb.run_info = run

    def after_test(self) -> None:
        """The results JSON's path is the last line ``llmdpd test`` prints."""
        from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation

        for cb in self.trainer.callbacks:
            if isinstance(cb, RolloutEvaluation) and cb.json_path is not None:
                print(cb.json_path)


DESCRIPTION = (
    "Train one offline-RL diffusion policy on many tasks, conditioned on text and trajectory prompts "
    "(LLM-Driven Policy Diffusion), and test it on tasks it never trained on. Subcommands: collect (build "
    "the config's datasets, embed its text prompts), fit (train; --ckpt_path resumes), test (roll out a "
    "checkpoint; writes a results JSON), report (results JSONs over seeds and arms: tables, verdicts, plot; "
    "llmdpd report --help), export (a checkpoint's policy as safetensors + JSON for llmdpd_pl.load_policy; "
    "llmdpd export --help)."
)


def build_cli(args: list[str] | None = None) -> LLMDPDCLI:
    """Parse ``args`` (``sys.argv`` if None), instantiate, and run the subcommand."""
    return LLMDPDCLI(
        LLMDPDModule,
        PromptedOfflineDataModule,
        trainer_class=LLMDPDTrainer,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False,  # main() prints parser errors as one line
                       "description": DESCRIPTION},  # fmt: skip
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``llmdpd``; tests call ``main(["fit", "--config", ...])`` in-process.

    ``llmdpd report`` (:mod:`llmdpd_pl.report`) summarises results JSONs, ``llmdpd export``
    (:mod:`llmdpd_pl.export`) writes a checkpoint's policy as safetensors and JSON; the other subcommands
    are LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else args
    quiet_known_noise()
    with reporting_user_errors():
        if argv[:1] == ["report"]:
            from llmdpd_pl.report import main as report

            return report(argv[1:])
        if argv[:1] == ["export"]:
            from llmdpd_pl.export import main as export

            return export(argv[1:])
        build_cli(args)


if __name__ == "__main__":
    main()
