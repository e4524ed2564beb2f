"""Tests for ``llmdpd_pl.errors`` (and ``llmdpd_pl.preflight``), through the ``llmdpd`` CLI's ``main``.

A user error is one line on stderr, ``error: <key>: <what is wrong> (got <value>)``, and exit status 2,
with no traceback and nothing written; a bug keeps its traceback. Corrupt datasets are rebuilt, equal to
a fresh collection. A prompt longer than the LLM's maximum length is warned about once. A normal run
prints no third-party warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from llmdpd_pl.cli import main, yaml_spelling
from llmdpd_pl.data.embeddings import LLMSpec, embed_texts, resolve_model_path
from llmdpd_pl.data.prompts import load_prompts, render_prompt
from llmdpd_pl.data.spec import METADATA_FILE, DatasetSpec, QualityLevel
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.preflight import NOISE
from tests.conftest import Collected
from tests.model_fixtures import SEEN, UNSEEN, ModelData, model_data, one_thread, write_config

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given and ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    monkeypatch.delenv("LLMDPD_DEBUG", raising=False)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``llmdpd args``: it must exit with status 2 and print one error line and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert err.rstrip().endswith(line)  # the last thing printed
    return line


# ------------------------------------------------------------------------------ one line per user error
@pytest.mark.parametrize(
    ("override", "line"),
    [
        (["--model.n_diffusion_steps", "0"], "error: model.n_diffusion_steps: must be >= 1 (got 0)"),
        (["--data.dataset.levels", "{expert: {episodes: -1}}"],  # raised while jsonargparse builds it
         "error: data.dataset.levels.expert.episodes: must be >= 0 (got -1)"),
        (["--data.batch_size", "0"], "error: data.batch_size: must be >= 1 (got 0)"),
        (["--data.unseen_tasks", "[reach]"], "error: data.unseen_tasks: ['reach'] also appear in "
         "data.seen_tasks; training on them would leak the test set (got ['reach'])"),
        (["--model.prompts", "bogus"],  # rejected by the parser
         "error: model.prompts: expected a typing.Literal['both', 'text', 'trajectory', 'none'] (got bogus)"),
        (["--data.llm.dtype", "float64"],  # rejected by the parser, inside an optional dataclass
         "error: data.llm.dtype: expected a typing.Literal['float32', 'float16', 'bfloat16'] (got float64)"),
    ],
)  # fmt: skip
def test_a_bad_config_value_is_one_line_naming_the_key_and_value(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: list[str], line: str
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    assert _fails(["fit", "--config", str(config), *override], capsys) == line
    assert _tree(tmp_path) == {"config.yaml"}


def test_an_unknown_task_is_one_line_with_close_matches(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    line = _fails(["fit", "--config", str(config), "--data.seen_tasks", "[reach, box-clos]"], capsys)
    assert line.startswith("error: data.seen_tasks: unknown task 'box-clos'. Did you mean 'box-close'")
    assert line.endswith("(got ['reach', 'box-clos'])")


def test_a_task_without_a_text_prompt_is_named_under_the_key_that_lists_it_with_a_hint(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    line = _fails(["fit", "--config", str(config), "--data.unseen_tasks", "[Swimmer-v5]"], capsys)
    assert line == ("error: data.unseen_tasks: no text prompt for ['Swimmer-v5']; give one with "
                    "--data.prompts '{Swimmer-v5: {task: ..., objective: ..., constraints: ...}}' "
                    "(got ['Swimmer-v5'])")
    assert _tree(tmp_path) == {"config.yaml"}


def test_a_typo_in_a_prompt_override_is_one_line_with_close_matches(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    text = "{task: Box, objective: Close it., constraints: Gently.}"
    line = _fails(["fit", "--config", str(config), "--data.prompts", f"{{box-clsoe: {text}}}"], capsys)
    assert line.startswith("error: data.prompts: unknown task 'box-clsoe'. Did you mean 'box-close'")
    assert _tree(tmp_path) == {"config.yaml"}
    with caplog.at_level(logging.WARNING):  # a real task that is not in this run: its text is unused
        main(["fit", "--config", str(config), "--data.prompts", f"{{door-lock: {text}}}",
              "--trainer.max_steps", "2"])  # fmt: skip
    assert "data.prompts: ['door-lock'] are not tasks of this run; their texts are unused" in caplog.text


def test_llmdpd_debug_shows_the_traceback(model_data: ModelData, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LLMDPD_DEBUG", "1")
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", str(config), "--model.n_diffusion_steps", "0"])
    assert (err.value.key, err.value.value) == ("model.n_diffusion_steps", 0)


class BrokenCallback(L.Callback):
    """A callback with a bug: its constructor divides by zero."""

    def __init__(self, divisor: int = 0) -> None:
        self.ratio = 1 / divisor


def test_a_bug_keeps_its_traceback(model_data: ModelData, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    broken = {"class_path": "tests.test_errors.BrokenCallback"}
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, trainer={"callbacks": [broken]})
    with pytest.raises(Exception) as err:  # noqa: B017 -- whatever jsonargparse wraps it in
        main(["fit", "--config", str(config)])
    chain: list[BaseException] = [err.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert isinstance(chain[-1], ZeroDivisionError), chain
    assert "error:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ fail fast, write nothing
def _checkpoint(path: Path, damage: str) -> Path:
    """A real ``torch.save`` file, then truncated or with bytes overwritten in the middle of its data."""
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", ["data_root", "cache_dir", "log_dir", "no_checkpoint", "truncated",
                                  "overwritten"])  # fmt: skip
def test_an_unusable_path_fails_before_any_work(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    blocker = tmp_path / "blocker"  # a file where a folder would have to be
    blocker.write_text("")
    under = blocker / "sub"
    root, cache_dir = (under if case == c else tmp_path / c for c in ("data_root", "cache_dir"))
    data = {"dataset": dataclasses.asdict(dataclasses.replace(model_data.spec, root=str(root))),
            "cache_dir": str(cache_dir)}  # fmt: skip
    trainer = {"default_root_dir": str(under if case == "log_dir" else tmp_path / "logs")}
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, data=data, trainer=trainer)
    ckpt = tmp_path / "model.ckpt"
    if case in ("truncated", "overwritten"):
        _checkpoint(ckpt, case)
    before = _tree(tmp_path)
    command = "collect" if case == "data_root" else "fit" if case in ("cache_dir", "log_dir") else "test"
    args = [command, "--config", str(config)] + (["--ckpt_path", str(ckpt)] if command == "test" else [])
    line = _fails(args, capsys)
    key = {"data_root": "data.dataset.root", "cache_dir": "data.cache_dir",
           "log_dir": "trainer.default_root_dir"}  # fmt: skip
    if case in key:
        assert line == f"error: {key[case]}: cannot be a folder: {blocker} is a file (got {under})"
    else:
        problem = {"no_checkpoint": "no such file", "truncated": "not a readable checkpoint (BadZipFile)",
                   "overwritten": "corrupt checkpoint: model/data/0 fails its CRC check"}[case]  # fmt: skip
        assert line == f"error: ckpt_path: {problem} (got {ckpt})"
    assert _tree(tmp_path) == before  # no file, no folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder: none is read-only to it")
def test_a_read_only_data_root_fails_before_any_work(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    spec = dataclasses.replace(model_data.spec, root=str(locked / "minari"))
    data = {"dataset": dataclasses.asdict(spec)}
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, data=data)
    line = _fails(["collect", "--config", str(config)], capsys)
    assert line == f"error: data.dataset.root: cannot be written: {locked} is not writable (got {spec.root})"
    assert _tree(locked) == set()


# ------------------------------------------------------------------------------ integrity
def _damage(spec: DatasetSpec, task: str, how: str) -> None:
    path = spec.path(task, "train")
    if how == "sidecar":
        (path / METADATA_FILE).write_text("{not json")
        return
    if how == "legacy":  # a sidecar without checksums: rebuilt, as a corrupt one
        meta = json.loads((path / METADATA_FILE).read_text())
        del meta["sha256"]
        (path / METADATA_FILE).write_text(json.dumps(meta))
    hdf5 = path / "data" / "main_data.hdf5"
    hdf5.write_bytes(hdf5.read_bytes()[: hdf5.stat().st_size // 2])


def _files(path: Path) -> dict[str, bytes]:
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(("command", "how"), [("collect", "checksum"), ("collect", "legacy"),
                                              ("collect", "sidecar"), ("fit", "checksum")])  # fmt: skip
def test_a_corrupt_dataset_is_rebuilt_equal_to_a_fresh_one(
    model_data: ModelData, collected: Collected, dataset_copy: DatasetSpec, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, command: str, how: str,
) -> None:
    _damage(dataset_copy, "push", how)
    data = {"dataset": dataclasses.asdict(dataset_copy)}
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, data=data, trainer={"max_steps": 2})
    with caplog.at_level(logging.WARNING, logger="llmdpd_pl.data.collect"):
        main([command, "--config", str(config)])
    (record,) = [r.getMessage() for r in caplog.records if r.name == "llmdpd_pl.data.collect"]
    path = dataset_copy.path("push", "train")
    assert record.startswith(f"collect: dataset llmdpd/push/train-v0 at {path} is corrupt (")
    assert record.endswith("); rebuilding it") and "run `llmdpd collect`" not in record
    assert _files(path) == _files(collected.spec.path("push", "train"))  # data and sidecar, byte for byte
    if command == "fit":
        assert len(list((tmp_path / "checkpoints").glob("*.ckpt"))) == 1


# ------------------------------------------------------------------------------ truncation
def test_a_prompt_longer_than_the_max_length_is_warned_once(
    model_data: ModelData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    max_length = 16
    data = {"cache_dir": str(tmp_path / "embeddings"), "llm": {"max_length": max_length}}
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, data=data)
    with caplog.at_level(logging.WARNING, logger="llmdpd_pl.data.embeddings"):
        main(["collect", "--config", str(config)])
        main(["collect", "--config", str(config)])  # cached: not embedded, not warned again
    warned = [r.getMessage() for r in caplog.records if r.name == "llmdpd_pl.data.embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
    prompts = load_prompts()
    expected = []
    for task in SEEN + UNSEEN:
        count = len(tokenizer(render_prompt(prompts[task]))["input_ids"])
        assert count > max_length
        expected.append(f"the text prompt of {task!r} has {count} tokens, more than data.llm.max_length = "
                        f"{max_length}: the LLM reads only its first {max_length}")  # fmt: skip
    assert warned == expected


# ------------------------------------------------------------------------------ quiet runs
@pytest.fixture(scope="module")
def quiet_run(model_data: ModelData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """collect (a new dataset), fit (checkpoints every update) and test, recording every warning and every
    Lightning log line."""
    root = tmp_path_factory.mktemp("quiet")
    spec = DatasetSpec(root=str(root / "minari"), levels={"expert": QualityLevel(1, noise_std=0.1)},
                       prompt_episodes=1, max_episode_steps=10, workers=1)  # fmt: skip
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 2, "save_last": True}}
    evaluation = {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation",
                  "init_args": {"max_steps": 10, "num_envs": 1, "test_episodes": 1}}  # fmt: skip
    data = {"dataset": dataclasses.asdict(spec), "seen_tasks": ["reach"], "unseen_tasks": ["push"]}
    config = write_config(root / "input.yaml", model_data, root, data=data,  # fit saves config.yaml
                          trainer={"max_steps": 4, "callbacks": [checkpoint, evaluation]})  # fmt: skip
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    lightning_loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        mp.setattr(sys, "argv", ["llmdpd"])
        warnings.simplefilter("always")
        for lg in lightning_loggers:
            lg.addHandler(handler)
        try:
            main(["collect", "--config", str(config)])
            main(["fit", "--config", str(config)])
            ckpt = root / "checkpoints" / "last.ckpt"
            main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--expert", "false",
                  "--trainer.default_root_dir", str(root / "tested")])  # fmt: skip
        finally:
            for lg in lightning_loggers:
                lg.removeHandler(handler)
    yield {"warnings": [f"{w.category.__name__}: {w.message}" for w in caught], "logged": logged,
           "config": config, "ckpt": ckpt, "root": root}  # fmt: skip


def test_a_normal_collect_fit_and_test_print_no_third_party_noise(quiet_run: dict[str, Any]) -> None:
    patterns = [p for _, p in NOISE] + ["`author_email` is set to None", "`eval_env` is set to None",
                                        "callbacks used to create the checkpoint need to be provided"]
    noisy = [w for w in quiet_run["warnings"] if any(re.search(p, w) for p in patterns)]
    assert noisy == []
    assert [line for line in quiet_run["logged"] if "Tip" in line] == []
    assert (quiet_run["root"] / "tested" / "test_results.json").is_file()  # the run did happen


def test_a_checkpoint_mismatch_is_one_line(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["test", "--config", str(quiet_run["config"]), "--ckpt_path", str(quiet_run["ckpt"]),
            "--trainer.default_root_dir", str(tmp_path / "logs"), "--model.hidden_dim", "64"]  # fmt: skip
    assert _fails(args, capsys) == (
        "error: model.hidden_dim: the checkpoint's is 32, and a checkpoint's architecture is fixed: match it "
        "in the config and --model.*, or train anew (got 64)"
    )
    assert _tree(tmp_path) == set()


def test_a_report_without_results_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(tmp_path / "nothing*.json")
    line = _fails(["report", "--arm", "both", pattern, "--out", str(tmp_path / "report")], capsys)
    assert line == f"error: --arm: no results JSON matches this pattern (got {pattern!r})"
    assert _tree(tmp_path) == set()



# ------------------------------------------------------------------------------ mistakes that were tracebacks
def _test_args(quiet_run: dict[str, Any], tmp_path: Path, *extra: str) -> list[str]:
    return ["test", "--config", str(quiet_run["config"]), "--expert", "false",
            "--trainer.default_root_dir", str(tmp_path / "logs"), *extra]  # fmt: skip


def test_a_zip_that_is_not_a_checkpoint_and_a_folder_are_one_line(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "hello")
    line = _fails(_test_args(quiet_run, tmp_path, "--ckpt_path", str(archive)), capsys)
    assert line == (
        f"error: ckpt_path: a zip archive, but not a checkpoint (no torch.save data.pkl) (got {archive})"
    )
    folder = quiet_run["ckpt"].parent
    line = _fails(_test_args(quiet_run, tmp_path, "--ckpt_path", str(folder)), capsys)
    assert line.startswith("error: ckpt_path: is a folder, not a checkpoint file") and str(folder) in line
    assert _tree(tmp_path) == {"notes.zip"}


def test_a_checkpoint_of_another_network_is_one_line(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The checkpoint of a network with one more state input, as another suite's (its width is linked from
    # the data when the model is built, so no config key can catch it before the weights load).
    checkpoint = torch.load(quiet_run["ckpt"], weights_only=True)
    weight = checkpoint["state_dict"]["critic.layers.0.weight"]  # (2, H, S + A + C)
    checkpoint["state_dict"]["critic.layers.0.weight"] = torch.cat([weight, weight[..., :1]], dim=-1)
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    line = _fails(_test_args(quiet_run, tmp_path, "--ckpt_path", str(other)), capsys)
    assert line.startswith("error: ckpt_path: its weights do not fit the network this config builds (size")
    assert line.endswith(f"test it with the suite and tasks it was trained on (got {str(other)!r})")


def test_a_prompt_index_past_the_prompts_is_one_line(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _test_args(quiet_run, tmp_path, "--ckpt_path", str(quiet_run["ckpt"]), "--prompt_index", "9",
                      "--output", str(tmp_path / "out" / "results.json"))  # fmt: skip
    assert _fails(args, capsys) == (
        "error: prompt_index: this run has 1 prompt trajectories per task: 0 to 0, or all (got 9)"
    )
    assert not (tmp_path / "out" / "results.json").exists()


def test_negative_max_steps_is_one_line_before_any_work(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", str(quiet_run["config"]), "--trainer.max_steps", "-5",
            "--trainer.default_root_dir", str(tmp_path / "logs")]  # fmt: skip
    assert _fails(args, capsys) == "error: trainer.max_steps: must be -1 (no limit) or >= 0 (got -5)"
    assert _tree(tmp_path) == set()


@pytest.mark.parametrize(("content", "reason"), [("{", "JSONDecodeError"), ('{"a": 1}', "KeyError")])
def test_a_results_file_that_is_not_a_results_json_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    path = tmp_path / "seed0.json"
    path.write_text(content)
    line = _fails(["report", "--arm", "a", str(path), "--out", str(tmp_path / "report")], capsys)
    assert line.startswith(f"error: --arm: not a results JSON of llmdpd test ({reason}")
    assert line.endswith(f"(got {path})")
    assert _tree(tmp_path) == {"seed0.json"}


def test_corrupt_llm_weights_are_one_line(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "llm"
    shutil.copytree(resolve_model_path("minilm"), folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    data = {"llm": {"model": str(folder)}, "cache_dir": str(tmp_path / "cache")}
    config = write_config(tmp_path / "c.yaml", model_data, tmp_path / "run", data=data)
    line = _fails(["collect", "--config", str(config)], capsys)
    assert line.startswith(f"error: data.llm.model: cannot load the model in {folder} (")
    assert not (tmp_path / "cache").exists() or _tree(tmp_path / "cache") == set()


def test_a_cache_entry_of_the_wrong_width_is_recomputed(tmp_path: Path) -> None:
    texts, spec = {"reach": "Task: reach."}, LLMSpec()
    first, _ = embed_texts(texts, spec, tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    saved = torch.load(entry, weights_only=True)
    wide = torch.cat([saved["embedding"], saved["embedding"]])  # a self-consistent entry of twice the width
    checksum = hashlib.sha256(wide.numpy().tobytes()).hexdigest()
    torch.save({**saved, "embedding": wide, "sha256": checksum}, entry)
    again, stats = embed_texts(texts, spec, tmp_path)
    assert stats.misses == 1 and torch.equal(again["reach"], first["reach"])


def test_a_user_error_after_the_logger_starts_leaves_no_log_folder(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "runs"
    args = _test_args(quiet_run, tmp_path, "--ckpt_path", str(quiet_run["ckpt"]), "--prompt_index", "9",
                      "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                      "--trainer.logger.save_dir", str(logs), "--trainer.logger.name", "tested")  # fmt: skip
    assert _fails(args, capsys).startswith("error: prompt_index: this run has 1 prompt trajectories")
    assert not (logs / "tested" / "version_0").exists()  # the next run is version_0 again


# ------------------------------------------------------------------------------ messages that misled
def test_nan_and_inf_on_the_command_line_are_numbers(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "c.yaml", model_data, tmp_path / "run")
    assert _fails(["fit", "--config", str(config), "--model.eta", "nan"], capsys) == (
        "error: model.eta: must be >= 0 (got nan)"
    )
    assert _fails(["fit", "--config", str(config), "--model.gamma=inf"], capsys) == (
        "error: model.gamma: must be in [0.0, 1.0] (got inf)"
    )
    spelled = yaml_spelling(["--a", "-inf", "--b=INF", "--c", "nan", "inf"])
    assert spelled == ["--a=-.inf", "--b=.inf", "--c=.nan", "inf"]
    assert _tree(tmp_path) == {"c.yaml"}


def test_a_yaml_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  eta: [1,\n")
    assert _fails(["fit", "--config", str(bad)], capsys) == (
        f"error: --config: not valid YAML: expected the node content, but found '<stream end>' at line 3, "
        f"column 1 (got {bad})"
    )


def test_test_takes_the_checkpoints_value_of_a_key_the_user_did_not_write(
    quiet_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    config = yaml.safe_load(quiet_run["config"].read_text())
    trained = config["model"].pop("n_action_candidates")  # the module's default (50) differs
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "results.json"
    main(["test", "--config", str(tmp_path / "c.yaml"), "--ckpt_path", str(quiet_run["ckpt"]), "--expert",
          "false", "--trainer.default_root_dir", str(tmp_path / "logs"), "--output", str(out)])  # fmt: skip
    assert "n_action_candidates" not in capsys.readouterr().err
    assert json.loads(out.read_text())["meta"]["config"]["model"]["n_action_candidates"] == trained
    main(["test", "--config", str(tmp_path / "c.yaml"), "--ckpt_path", str(quiet_run["ckpt"]), "--expert",
          "false", "--trainer.default_root_dir", str(tmp_path / "logs"), "--output", str(out),
          "--model.n_action_candidates", "3"])  # fmt: skip
    assert "model.n_action_candidates: given 3" in capsys.readouterr().err
    assert json.loads(out.read_text())["meta"]["config"]["model"]["n_action_candidates"] == 3


# ------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("command", ["fit", "test"])
def test_sigterm_stops_a_run_with_its_exit_status(
    quiet_run: dict[str, Any], tmp_path: Path, command: str
) -> None:
    """Lightning's SIGTERM handler only sets a flag, read between batches: a test's rollouts read it
    between steps. Either run exits with a SIGTERM's status (Lightning's own exception would exit with 0),
    and a test writes no results file."""
    import signal
    import subprocess
    import time

    out, log = tmp_path / "results.json", tmp_path / "stderr.log"
    if command == "test":
        extra = ["--ckpt_path", str(quiet_run["ckpt"]), "--episodes", "100000", "--output", str(out)]
        args = _test_args(quiet_run, tmp_path, *extra)
    else:
        args = ["fit", "--config", str(quiet_run["config"]), "--trainer.max_steps", "1000000",
                "--trainer.default_root_dir", str(tmp_path / "logs")]  # fmt: skip
    args = [sys.executable, "-m", "llmdpd_pl.cli", *args, "--trainer.enable_progress_bar", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = "eval:" if command == "test" else "update/s"
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 240
            while started not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None, log.read_text()[-2000:]  # still running: 100,000 episodes or updates
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-2000:]
        finally:
            proc.kill()
    assert not out.exists()
