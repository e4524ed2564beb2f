"""``llmdpd export --ckpt_path P --out DIR [--results R]``: a checkpoint's trained policy as a folder that
:func:`llmdpd_pl.load_policy` reads, with no pickle in it:

- ``model.safetensors``: :func:`~llmdpd_pl.pretrained.exported_state`, the EMA actor with its prompt encoders,
  the task bank's buffers and, with ``q_softmax``, the target critics and the prompt encoders whose z
  conditions them;
- ``config.json``: the module's hyperparameters (the policy spec and the action selection), the task bank's
  task names, texts and LLM identity, the observation statistics (for reading: the tensors are what is
  loaded) and the provenance (the checkpoint, its SHA-256 and updates, the training segments, the commit);
- ``README.md``: a model card, with the results JSON's table if given ``--results``.

The folder is written beside DIR and renamed into place, so DIR is never a partial export. An existing DIR is
replaced only if it is empty or an earlier export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmdpd_pl import __version__
from llmdpd_pl.callbacks.provenance import train_record
from llmdpd_pl.errors import ConfigError, check_writable
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.pretrained import (
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS,
    checkpoint_module,
    exported_state,
    init_args,
)
from llmdpd_pl.rollouts import TaskResult, format_results, read_json
from llmdpd_pl.utils import git_commit, umask

CARD = "README.md"


def export_config(module: LLMDPDModule, checkpoint: Mapping[str, Any], ckpt_path: Path) -> dict[str, Any]:
    """``config.json``: what :func:`~llmdpd_pl.pretrained.folder_module` rebuilds the module from, and what
    a reader wants to know about it."""
    bank = module.task_bank
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": init_args(checkpoint["hyper_parameters"]),
        "policy_spec": asdict(module.policy.spec),
        "action_selection": {
            "mode": module.hparams["action_selection"],
            "n_action_candidates": module.hparams["n_action_candidates"],
        },
        "task_bank": bank.get_extra_state(),  # task names, seen count, LLM identity, texts
        "observation_statistics": {"mean": bank.obs_mean.tolist(), "std": bank.obs_std.tolist()},
        "provenance": {
            "checkpoint": str(ckpt_path.absolute()),
            "checkpoint_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
            "updates": module.updates,
            "exported_by": {"llmdpd_pl": __version__, "commit": git_commit()},
            **train_record(dict(checkpoint)),
        },
    }


def model_card(
    config: Mapping[str, Any], results: Sequence[TaskResult] = (), source: Path | None = None
) -> str:
    """``README.md``: what the policy was trained on and how it acts, and the results table of ``source``."""
    bank, model, prov = config["task_bank"], config["model"], config["provenance"]
    names, seen = bank["task_names"], bank["n_seen"]
    selection = config["action_selection"]
    acting = f"`{selection['mode']}`" + (
        f" over {selection['n_action_candidates']} candidates" if selection["mode"] == "q_softmax" else ""
    )
    llm = bank.get("llm") or {}
    lines = [
        "# LLMDPD policy",
        "",
        f"Exported by `llmdpd export` from `{prov['checkpoint']}` after {prov['updates']} updates "
        f"(training commit `{prov.get('train_commit')}`).",
        "",
        f"- Trained on (seen tasks): {', '.join(names[:seen]) or '-'}.",
        f"- Other tasks with prompts, never trained on: {', '.join(names[seen:]) or '-'}.",
        f"- Prompts: `{model.get('prompts')}`; text source `{model.get('text_source')}`; action selection "
        f"{acting}; the EMA actor.",
        f"- LLM: `{llm.get('model')}` (weights fingerprint `{str(llm.get('weights'))[:12]}`).",
        "",
        "```python",
        "from llmdpd_pl import load_policy",
        "",
        'policy = load_policy("<this folder>")',
        f'actions = policy.act(observations, "{names[0] if names else "<task>"}")  # (N, S) -> (N, A)',
        "```",
    ]
    if results:
        lines += ["", "## Results", "", f"From `{source}`:", "", "```text", format_results(results), "```"]
    return "\n".join(lines) + "\n"


def _is_replaceable(out: Path) -> bool:
    """An empty folder or an earlier export."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_folder(out: Path, files: Mapping[str, bytes], key: str = "out") -> Path:
    """Write ``files`` (name → bytes) into a new folder beside ``out`` and rename it to ``out``."""
    if out.exists() and not _is_replaceable(out):
        raise ConfigError(key, "exists and is neither empty nor an llmdpd export: choose another folder", out)
    check_writable(key, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o777 & ~umask())  # a plain mkdir's mode, not mkdtemp's 0700
        if out.exists():
            old = tmp.with_suffix(".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(ckpt_path: str | Path, out: str | Path, results: str | Path | None = None) -> Path:
    """Export the policy of checkpoint ``ckpt_path`` to the folder ``out`` (module docstring); return it."""
    from safetensors.torch import save

    ckpt_path, out = Path(ckpt_path), Path(out)
    module, checkpoint = checkpoint_module(ckpt_path, key="ckpt_path")
    rows: list[TaskResult] = []
    if results is not None:
        try:
            rows = [TaskResult(**row) for row in read_json(results, "results")["results"]]
        except TypeError as err:  # a row without every field
            raise ConfigError("results", f"a results row lacks fields ({err})", Path(results)) from None
    config = export_config(module, checkpoint, ckpt_path)
    files = {
        WEIGHTS: save(exported_state(module), metadata={"format": "pt"}),
        CONFIG: json.dumps(config, indent=2, default=str).encode(),
        CARD: model_card(config, rows, None if results is None else Path(results)).encode(),
    }
    return write_folder(out, files)


def main(argv: Sequence[str] | None = None) -> None:
    """``llmdpd export``: prints the folder written."""
    p = argparse.ArgumentParser(prog="llmdpd export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt_path", type=Path, required=True, help="the Lightning checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--results", type=Path, default=None, help="a results JSON of llmdpd test, for the card")
    args = p.parse_args(argv)
    print(export(args.ckpt_path, args.out, args.results))


__all__ = ["export", "export_config", "main", "model_card", "write_folder"]
