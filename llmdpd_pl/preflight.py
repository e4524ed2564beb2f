"""What ``llmdpd`` does before a run starts: check every path the run will read or write, and silence the
third-party warnings a normal run triggers.

:func:`preflight` runs on the parsed config, before anything is instantiated, loaded or collected: a
missing checkpoint or an unwritable folder is a one-line error within seconds, not a traceback after
minutes of collection, and nothing is created on the way.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from llmdpd_pl.data.spec import DatasetSpec
from llmdpd_pl.errors import ConfigError, check_checkpoint, check_writable

#: (category, message regex) of warnings that a normal run triggers and that ask nothing of the user.
NOISE: tuple[tuple[type[Warning], str], ...] = (
    # Lightning's own pytree helper uses a torch class that torch deprecates; nothing to do on our side.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Our checkpoints are taken between updates, with the weights every update ends on: the state we want.
    (UserWarning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps"),
    # `llmdpd test` writes to a new log dir: the checkpoint's best-k bookkeeping is of no use there.
    (UserWarning, r"The dirpath has changed from"),
)
#: Lightning's advertisements, logged at INFO on every run.
_TIP = "💡 Tip:"


def quiet_known_noise() -> None:
    """Filter :data:`NOISE`, Lightning's tips and transformers' weight-loading bar, and nothing else."""
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith(_TIP))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the frozen LLM's "Loading weights" bar


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


def _init_args(value: Any) -> list[dict[str, Any]]:
    """The ``init_args`` of a ``class_path`` value, or of each in a list of them ({} for other values)."""
    items = value if isinstance(value, list) else [value]
    return [(item.get("init_args") or {}) if isinstance(item, dict) else {} for item in items]


def preflight(subcommand: str, config: dict[str, Any]) -> None:
    """A :class:`~llmdpd_pl.errors.ConfigError` unless every input path of ``subcommand`` exists and every
    folder it writes can be written: the checkpoint, the data root, the embedding cache and, except for
    ``collect``, the log dirs and the results JSON's folder.

    Args:
        subcommand: ``collect``, ``fit`` or ``test``.
        config: The subcommand's parsed config, as a dict (not yet instantiated).
    """
    if ckpt_path := config.get("ckpt_path"):
        check_checkpoint("ckpt_path", ckpt_path)
    check_writable("data.dataset.root", _get(config, "data.dataset.root") or DatasetSpec.root)
    check_writable("data.cache_dir", _get(config, "data.cache_dir") or "data/embeddings")
    if subcommand == "collect":
        return
    for key in ("max_steps", "max_epochs"):  # Lightning's own message comes as a traceback, after the data
        if (value := _get(config, f"trainer.{key}")) is not None and value < -1:
            raise ConfigError(f"trainer.{key}", "must be -1 (no limit) or >= 0", value)
    check_writable("trainer.default_root_dir", _get(config, "trainer.default_root_dir") or os.getcwd())
    for args in _init_args(_get(config, "trainer.logger")):
        if args.get("save_dir"):
            check_writable("trainer.logger.init_args.save_dir", args["save_dir"])
    for i, args in enumerate(_init_args(_get(config, "trainer.callbacks"))):
        if args.get("dirpath"):
            check_writable(f"trainer.callbacks[{i}].init_args.dirpath", args["dirpath"])
    if output := config.get("output"):
        check_writable("output", Path(output).parent)
