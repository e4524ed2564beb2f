"""The ``llmdpd`` command: ``collect | fit | test`` through one LightningCLI, and ``report | export``.

``llmdpd collect --config C`` builds the config's datasets and embeds its prompts
(``PromptedOfflineDataModule.prepare_data``) without training. Dimensions are declared once, on the
datamodule, and linked into the model.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmdpd_pl.callbacks.provenance import Provenance
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.embeddings import LLMSpec, check_same_llm, llm_identity
from llmdpd_pl.errors import ConfigError, reporting_user_errors
from llmdpd_pl.module import ARCHITECTURE_KEYS, SWITCHED_BY, LLMDPDModule
from llmdpd_pl.preflight import preflight, quiet_known_noise
from llmdpd_pl.trainer import LLMDPDTrainer

#: ``model`` keys whose value may change, but not whether it is 0: a lever that adds parameters when on.
SWITCH_KEYS = frozenset(SWITCHED_BY.values())
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
        """Parse, and keep the ``model`` values the user gave (in a ``--config`` file or as ``--model.*``):
        the checkpoint's hyperparameters replace them next, and :meth:`before_instantiate_classes`
        reconciles the two. A default the user did not write is not "given"."""
        super().parse_arguments(parser, args)
        if subcommand := self.config.get("subcommand"):
            preflight(subcommand, self.config[subcommand].clone().as_dict())  # before any work
        if subcommand in ("test", "fit"):  # before the checkpoint's hyperparameters replace them
            written = given_model_keys(sys.argv[1:] if args is None else list(args))
            model = self.config[subcommand].model.clone().as_dict()
            self._given_model = {k: v for k, v in model.items() if k in written}

    def before_instantiate_classes(self) -> None:
        precision = self.config.get(str(self.subcommand), self.config).float32_matmul_precision
        torch.set_float32_matmul_precision(precision)
        if self.config.get("subcommand") == "test" and self.config.test.get("ckpt_path"):
            trained = torch.load(self.config.test.ckpt_path, map_location="cpu", weights_only=True)
            bank = trained.get("state_dict", {}).get("task_bank._extra_state") or {}
            if bank.get("llm") and trained.get("hyper_parameters", {}).get("prompts") in ("both", "text"):
                llm = self.config.test.data.get("llm")  # before the model is built for the test LLM's width
                check_same_llm(bank["llm"], llm_identity(LLMSpec(**(llm.as_dict() if llm else {}))))
            values, notes = reconcile_with_checkpoint(self._given_model, trained.get("hyper_parameters", {}))
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
        """The results JSON records the resolved config with the checkpoint's provenance
        (:func:`llmdpd_pl.callbacks.provenance.run_record`)."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        self.trainer.callbacks.append(Provenance(config.get("test", config)))  # restores the checkpoint's

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
    argv = yaml_spelling(sys.argv[1:] if args is None else args)
    if args is None:
        sys.argv[1:] = argv
    quiet_known_noise()
    with reporting_user_errors(), exit_status_of_sigterm():
        for path in (b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"):
            check_yaml("--config", path)
        if argv[:1] == ["report"]:
            from llmdpd_pl.report import main as report

            return report(argv[1:])
        if argv[:1] == ["export"]:
            from llmdpd_pl.export import main as export

            return export(argv[1:])
        build_cli(None if args is None else argv)


@contextmanager
def exit_status_of_sigterm() -> Iterator[None]:
    """A run stopped by SIGTERM exits with 143 (128 + 15), as a process killed by it would: Lightning's
    ``SIGTERMException`` carries no status, so it would exit with 0, which schedulers read as success."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None


def given_model_keys(argv: list[str]) -> set[str]:
    """The ``model`` keys that ``argv`` writes: in each ``--config`` file's ``model`` section, and as
    ``--model.KEY`` (or ``--model.KEY.sub``)."""
    keys: set[str] = set()
    for arg, nxt in zip(argv, [*argv[1:], ""], strict=True):
        if arg == "--config" and Path(nxt).is_file():
            model = (yaml.safe_load(Path(nxt).read_text()) or {}).get("model")
            keys |= set(model) if isinstance(model, dict) else set()
        elif arg.startswith("--model."):
            keys.add(arg.removeprefix("--model.").partition("=")[0].split(".")[0])
    return keys


#: Non-finite numbers as a shell user writes them, and as YAML (hence jsonargparse) reads them.
_NON_FINITE = {"inf": ".inf", "+inf": ".inf", "-inf": "-.inf", "nan": ".nan"}


def yaml_spelling(argv: list[str]) -> list[str]:
    """``--key inf`` (or ``=inf``, ``-inf``, ``nan``) as ``--key .inf``: YAML's spelling, which the parser
    reads as a float; it reads ``inf`` as a string and rejects it."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if eq and value.lower() in _NON_FINITE:
            arg = f"{key}={_NON_FINITE[value.lower()]}"
        elif out and out[-1].startswith("--") and "=" not in out[-1] and arg.lower() in _NON_FINITE:
            arg = f"{out.pop()}={_NON_FINITE[arg.lower()]}"  # one token: argparse reads -.inf as an option
        out.append(arg)
    return out


def check_yaml(key: str, path: str) -> None:
    """A :class:`ConfigError` naming the file, line and column of a YAML syntax error in ``path``."""
    try:
        yaml.safe_load(Path(path).read_text())
    except OSError:
        return  # the parser's own message names a missing file
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(key, f"not valid YAML: {problem}{where}", Path(path)) from None


if __name__ == "__main__":
    main()
