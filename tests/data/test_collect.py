"""Tests for llmdpd_pl.data.collect: Minari datasets read back with plain Minari, the sidecar metadata,
determinism, reuse, and the guarantee that an interrupted run never leaves a dataset that passes as complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import minari
import numpy as np
import pytest

from llmdpd_pl.data.collect import collect, format_table, summarize
from llmdpd_pl.data.spec import (
    METADATA_FILE,
    DatasetSpec,
    QualityLevel,
    corruption,
    is_complete,
    read_metadata,
)
from llmdpd_pl.envs import ACT_DIM, OBS_DIM
from tests.conftest import EPISODE_STEPS, SEEN_TASKS, UNSEEN_TASKS, Collected

ALL_TASKS = SEEN_TASKS + UNSEEN_TASKS


def _quiet_collect(
    spec: DatasetSpec, train: list[str] | tuple[str, ...], prompts: list[str] | tuple[str, ...]
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari's author_email / eval_env advice
        return collect(spec, train, prompts, progress=False)


def _episodes(spec: DatasetSpec, task: str, kind: str) -> list:
    return list(minari.MinariDataset(spec.path(task, kind) / "data").iterate_episodes())


def _mtimes(root: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------- read back
@pytest.mark.parametrize(
    ("kind", "tasks", "n_episodes"), [("train", SEEN_TASKS, 3), ("prompts", ALL_TASKS, 2)]
)
def test_datasets_read_back_with_plain_minari(
    collected: Collected, monkeypatch: pytest.MonkeyPatch, kind: str, tasks: tuple[str, ...], n_episodes: int
) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", collected.spec.root)
    for task in tasks:
        dataset = minari.load_dataset(collected.spec.dataset_id(task, kind))
        assert dataset.total_episodes == n_episodes
        assert dataset.total_steps == n_episodes * EPISODE_STEPS  # no early termination
        for ep in dataset.iterate_episodes():
            T = len(ep.actions)
            assert T == EPISODE_STEPS
            assert ep.observations.shape == (T + 1, OBS_DIM)
            assert ep.actions.shape == (T, ACT_DIM) and ep.actions.dtype == np.float32
            assert np.all(np.abs(ep.actions) <= 1.0)
            assert ep.rewards.shape == (T,) and np.isfinite(ep.rewards).all()
            assert np.asarray(ep.infos["success"]).shape == (T + 1,)  # like observations
            assert not ep.terminations.any()
            assert ep.truncations[-1] and not ep.truncations[:-1].any()  # the time limit


def test_no_staging_folders_are_left_behind(collected: Collected) -> None:
    assert [p.name for p in Path(collected.spec.root).iterdir()] == ["llmdpd"]


def test_sidecar_metadata_matches_the_episodes(collected: Collected) -> None:
    spec = collected.spec
    for task, kind, levels in [
        ("reach", "train", ["expert", "expert", "random"]),
        ("box-close", "prompts", ["prompt"] * 2),
    ]:
        meta = read_metadata(spec.path(task, kind))
        assert meta["task"] == task and meta["kind"] == kind
        assert meta["recipe"] == spec.recipe(kind, task)
        episodes = _episodes(spec, task, kind)
        assert [m["level"] for m in meta["episodes"]] == levels
        for m, ep in zip(meta["episodes"], episodes, strict=True):
            assert {"task", "level", "success", "return", "length"} <= set(m)
            assert m["task"] == task
            assert m["length"] == len(ep.actions)
            # Python's left-to-right sum vs NumPy's pairwise sum of the same 60 float64s.
            assert m["return"] == pytest.approx(float(np.sum(ep.rewards)), rel=1e-12)
            assert m["success"] == bool(np.asarray(ep.infos["success"]).max() > 0)


def test_episodes_differ_within_and_across_datasets(collected: Collected) -> None:
    spec = collected.spec
    first, second, _ = _episodes(spec, "reach", "train")
    assert not np.array_equal(first.observations[0], second.observations[0])  # a new layout per reset
    assert not np.array_equal(first.actions, second.actions)
    prompt = _episodes(spec, "reach", "prompts")[0]
    assert not np.array_equal(first.observations[0], prompt.observations[0])  # own env seed per kind


# ----------------------------------------------------------------------------------------------- summary
def test_summary_rows_report_success_rate(collected: Collected) -> None:
    rows = {(r["task"], r["kind"], r["level"]): r for r in collected.rows}
    expected = {(t, "train", lv) for t in SEEN_TASKS for lv in ("expert", "random")}
    expected |= {(t, "prompts", "prompt") for t in ALL_TASKS}
    assert set(rows) == expected
    for task, kind in [(t, "train") for t in SEEN_TASKS] + [(t, "prompts") for t in ALL_TASKS]:
        episodes = read_metadata(collected.spec.path(task, kind))["episodes"]
        for level in {e["level"] for e in episodes}:
            eps = [e for e in episodes if e["level"] == level]
            row = rows[(task, kind, level)]
            assert row["episodes"] == len(eps)
            assert row["transitions"] == len(eps) * EPISODE_STEPS
            assert row["success_rate"] == pytest.approx(np.mean([e["success"] for e in eps]))
    # The noisy expert solves reach within 60 steps, uniform random actions do not.
    assert (
        rows[("reach", "train", "expert")]["success_rate"]
        > rows[("reach", "train", "random")]["success_rate"]
    )


def test_format_table_shows_success_as_percent() -> None:
    episodes = [
        {"task": "reach", "level": "expert", "success": True, "return": 10.0, "length": 5},
        {"task": "reach", "level": "expert", "success": False, "return": 14.5, "length": 7},
    ]
    rows = summarize(episodes, "train")
    assert rows == [
        {
            "task": "reach",
            "kind": "train",
            "level": "expert",
            "episodes": 2,
            "transitions": 12,
            "success_rate": 0.5,
            "mean_return": 12.25,
        }
    ]
    lines = format_table(rows).splitlines()
    assert "success" in lines[0] and "return" in lines[0]
    assert lines[2].split() == ["reach", "train", "expert", "2", "12", "50.0%", "12.2"]
    long = format_table([{**rows[0], "task": "button-press-topdown-wall"}]).splitlines()[2]
    assert long.split()[:2] == ["button-press-topdown-wall", "train"]  # the column fits the longest name


def test_collect_table_lists_every_dataset(collected: Collected) -> None:
    table = format_table(collected.rows)
    assert len(table.splitlines()) == 2 + len(collected.rows)
    assert "box-close" in table and "%" in table


# ------------------------------------------------------------------------------------- determinism, reuse
def test_same_seed_gives_identical_arrays(collected: Collected, tmp_path: Path) -> None:
    # One worker here, two in the session's collection: the worker count must not matter either.
    spec = dataclasses.replace(collected.spec, root=str(tmp_path), workers=1)
    _quiet_collect(spec, ["reach"], [])
    again, reference = _episodes(spec, "reach", "train"), _episodes(collected.spec, "reach", "train")
    assert len(again) == len(reference) == 3
    for a, b in zip(again, reference, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        np.testing.assert_array_equal(a.infos["success"], b.infos["success"])
    assert read_metadata(spec.path("reach", "train")) == read_metadata(collected.spec.path("reach", "train"))


def test_second_collect_reuses_complete_datasets(collected: Collected) -> None:
    before = _mtimes(collected.spec.root)
    rows = _quiet_collect(collected.spec, SEEN_TASKS, ALL_TASKS)
    assert _mtimes(collected.spec.root) == before  # nothing rewritten, nothing added
    assert rows == collected.rows


def test_a_folder_without_sidecar_is_never_reused(dataset_copy: DatasetSpec) -> None:
    # What an interrupted run or a staging folder moved by hand looks like: Minari files, no llmdpd.json.
    path = dataset_copy.path("reach", "train")
    (path / METADATA_FILE).unlink()
    with pytest.raises(ValueError, match="missing or incomplete.*llmdpd collect"):
        read_metadata(path)
    with pytest.raises(ValueError, match="missing or incomplete"):
        is_complete(dataset_copy, "reach", "train")
    _quiet_collect(dataset_copy, ["reach"], [])  # rebuilds it: a corrupt dataset is never reused
    assert json.loads((path / METADATA_FILE).read_text())["task"] == "reach"
    assert corruption(path) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "corrupt llmdpd.json"),
        ('{"task": "reach"}', "lacks 'recipe'/'episodes'"),
        ("[1, 2]", "lacks"),
    ],
    ids=["garbage", "no-recipe", "not-a-dict"],
)
def test_a_corrupt_sidecar_is_reported(dataset_copy: DatasetSpec, content: str, message: str) -> None:
    path = dataset_copy.path("reach", "train")
    (path / METADATA_FILE).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_metadata(path)


def test_missing_dataset_is_not_complete(tmp_path: Path) -> None:
    spec = DatasetSpec(root=str(tmp_path))
    assert not is_complete(spec, "reach", "train")


@pytest.mark.parametrize(
    "change",
    [
        {"levels": {"expert": QualityLevel(3, noise_std=0.1)}},
        {"seed": 1},
        {"max_episode_steps": 61},
    ],
    ids=["levels", "seed", "episode-steps"],
)
def test_spec_mismatch_at_the_same_version_mentions_version(collected: Collected, change: dict) -> None:
    spec = dataclasses.replace(collected.spec, **change)
    with pytest.raises(ValueError, match="different spec.*data.dataset.version"):
        is_complete(spec, "reach", "train")
    before = _mtimes(collected.spec.root)
    with pytest.raises(ValueError, match="version"):
        _quiet_collect(spec, ["reach"], [])
    assert _mtimes(collected.spec.root) == before


def test_prompt_spec_mismatch_is_detected(collected: Collected) -> None:
    assert is_complete(collected.spec, "box-close", "prompts")
    spec = dataclasses.replace(collected.spec, prompt_noise_std=0.3)
    with pytest.raises(ValueError, match="version"):
        is_complete(spec, "box-close", "prompts")
    # Training levels are not part of the prompt datasets' recipe.
    other_levels = dataclasses.replace(collected.spec, levels={"expert": QualityLevel(9)})
    assert is_complete(other_levels, "box-close", "prompts")


def test_bumping_the_version_asks_for_a_new_dataset(collected: Collected) -> None:
    spec = dataclasses.replace(collected.spec, version=1, levels={"expert": QualityLevel(3)})
    assert spec.dataset_id("reach", "train") == "llmdpd/reach/train-v1"
    assert not is_complete(spec, "reach", "train")


# ----------------------------------------------------------------------------------------------- kill -9
_KILL_SPEC = {"levels": {"expert": QualityLevel(100, 0.1)}, "prompt_episodes": 1, "max_episode_steps": 5}
_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.filterwarnings("ignore")
    from llmdpd_pl.data.collect import collect
    from llmdpd_pl.data.spec import DatasetSpec, QualityLevel
    spec = DatasetSpec(root=sys.argv[1], levels={"expert": QualityLevel(100, 0.1)}, prompt_episodes=1,
                       max_episode_steps=5, workers=1)
    collect(spec, ["reach"], [], progress=False)
    """
)


def _kill_when(proc: subprocess.Popen, ready) -> str:
    """Poll every 2 ms until ``ready()`` or the process ends, then SIGKILL it; return its stderr."""
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.002)
    finally:
        proc.kill()  # SIGKILL: no finally blocks, no cleanup in the child
        _, stderr = proc.communicate(timeout=30)
    return stderr.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["staging-appears", "final-appears"])
def test_kill_9_never_leaves_a_dataset_that_passes_as_complete(tmp_path: Path, moment: str) -> None:
    """Kill the collector (a) while it writes into its staging folder, (b) the instant the final folder
    appears. (a) must leave no final folder; (b) must find it already complete (the move is atomic)."""
    root = tmp_path / "minari"
    spec = DatasetSpec(root=str(root), workers=1, **_KILL_SPEC)
    final = spec.path("reach", "train")

    def staging() -> list[Path]:
        return [p for p in root.iterdir() if p.name.startswith(".staging-")] if root.is_dir() else []

    # 100 short episodes: the HDF5 write (between staging and the move) lasts ~0.2 s.
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if moment == "staging-appears":
        stderr = _kill_when(proc, lambda: bool(staging()))
        assert proc.returncode == -9, f"collect ended by itself before the kill:\n{stderr}"
        assert staging(), "killed before a staging folder appeared"
        assert not final.exists()
        assert not is_complete(spec, "reach", "train")
        assert [p.name for p in root.iterdir()] == [p.name for p in staging()]  # only the leftover
    else:
        stderr = _kill_when(proc, final.exists)
        # The collector may also have exited by itself in the instant after the move: both are fine.
        assert proc.returncode in (-9, 0), stderr
        assert final.exists(), f"the final folder never appeared:\n{stderr}"
        assert is_complete(spec, "reach", "train")
        assert minari.MinariDataset(final / "data").total_episodes == 100

    rows = _quiet_collect(spec, ["reach"], [])
    assert is_complete(spec, "reach", "train")
    assert rows[0]["episodes"] == 100 and rows[0]["transitions"] == 500
    assert len(read_metadata(final)["episodes"]) == 100


def test_staging_folders_of_dead_runs_are_removed_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "minari"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    (root / f".staging-{dead}-abc" / "llmdpd").mkdir(parents=True)  # left by a run that has died
    (root / ".staging-old").mkdir()  # a name without a pid: from a dead run too
    (root / f".staging-{os.getpid()}-live").mkdir()  # a live run's (this process's) work in progress
    spec = DatasetSpec(root=str(root), workers=1, **_KILL_SPEC)
    with caplog.at_level(logging.WARNING):
        _quiet_collect(spec, ["reach"], [])
    (line,) = [r.getMessage() for r in caplog.records if "staging" in r.getMessage()]
    assert line == ("collect: removed 2 staging folders of runs that died: "
                    f"['.staging-{dead}-abc', '.staging-old']")
    assert sorted(p.name for p in root.glob(".staging-*")) == [f".staging-{os.getpid()}-live"]


_PARENT_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.filterwarnings("ignore")
    from llmdpd_pl.data.collect import collect
    from llmdpd_pl.data.spec import DatasetSpec, QualityLevel
    spec = DatasetSpec(root=sys.argv[1], levels={"expert": QualityLevel(2000, 0.1)}, prompt_episodes=1,
                       max_episode_steps=50, workers=2)
    collect(spec, ["reach", "push"], [], progress=False)
    """
)


def _children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("signal_", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_the_collector_dies(tmp_path: Path, signal_: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _PARENT_SCRIPT, str(tmp_path / "minari")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline:  # the pool's workers
        time.sleep(0.1)
    assert len(workers) >= 2 and proc.poll() is None, "the workers never started"
    proc.send_signal(signal_)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived its parent"
    assert not list((tmp_path / "minari").glob("llmdpd/*/train-v0"))  # 2000 episodes each: none finished


_MIDDLE_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = "import sys, time; from llmdpd_pl.data.collect import _init_worker; "
    child += "_init_worker(int(sys.argv[1]), None); print('ready', flush=True); time.sleep(60)"
    worker = subprocess.Popen([sys.executable, "-c", child, str(os.getpid())], stdout=subprocess.PIPE,
                              text=True)
    assert worker.stdout.readline().strip() == "ready"
    print(worker.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_worker_exits_within_a_second_of_its_parents_death() -> None:
    """A collection worker busy with a long job (here: sleeping) notices its parent's SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c", _MIDDLE_SCRIPT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())  # once the worker has started its watch
    assert _alive(worker)
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived its parent"


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"version": -1}, "data.dataset.version"),
        ({"prompt_episodes": 0}, "data.dataset.prompt_episodes"),
        ({"max_episode_steps": 0}, "data.dataset.max_episode_steps"),
        ({"max_episode_steps": 501}, "data.dataset.max_episode_steps"),
        ({"workers": 0}, "data.dataset.workers"),
        ({"levels": {"expert": QualityLevel(0)}}, "data.dataset.levels"),
        ({"levels": {}}, "data.dataset.levels"),
    ],
)
def test_bad_dataset_spec_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DatasetSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"episodes": -1}, r"data\.dataset\.levels\.medium\.episodes: must be >= 0 \(got -1\)"),
        ({"episodes": 1, "noise_std": -0.1}, r"data\.dataset\.levels\.medium\.noise_std: .*\(got -0\.1\)"),
        ({"episodes": 1, "random_prob": 1.5}, r"data\.dataset\.levels\.medium\.random_prob: .*\(got 1\.5\)"),
    ],
)
def test_bad_quality_level_names_the_field(kwargs: dict, message: str) -> None:
    """A level is checked by the spec that holds it, which knows the level's key."""
    with pytest.raises(ValueError, match=message):
        DatasetSpec(levels={"expert": QualityLevel(1), "medium": QualityLevel(**kwargs)})


def test_collect_checks_task_names_before_writing(tmp_path: Path) -> None:
    spec = DatasetSpec(root=str(tmp_path / "minari"))
    with pytest.raises(ValueError, match="train_tasks.*'push'"):
        collect(spec, ["puhs"], [], progress=False)
    with pytest.raises(ValueError, match="prompt_tasks.*'box-close'"):
        collect(spec, [], ["box-clos"], progress=False)
    assert not (tmp_path / "minari").exists()


def test_copy_fixture_is_independent(dataset_copy: DatasetSpec, collected: Collected) -> None:
    # Guards the other tests: damaging the copy must never touch the shared collection.
    shutil.rmtree(dataset_copy.path("push", "train"))
    assert collected.spec.path("push", "train").exists()
    assert json.loads((collected.spec.path("push", "train") / METADATA_FILE).read_text())["task"] == "push"
