"""Tests for llmdpd_pl.data.datamodule: batches, prompts, the no-LLM second run, resumption of the batch
stream through a real Trainer, and clear errors for bad configs and bad data.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import lightning as L
import minari
import numpy as np
import pytest
import torch

from llmdpd_pl.data.batches import Batch
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.embeddings import EmbedStats, LLMSpec, TextEncoder, embed_texts
from llmdpd_pl.data.spec import DatasetSpec
from llmdpd_pl.envs import ACT_DIM, OBS_DIM
from llmdpd_pl.errors import ConfigError
from tests.conftest import EPISODE_STEPS, SEEN_TASKS, UNSEEN_TASKS, Collected

BATCH = 64
STEPS_PER_EPOCH = 5
# 60-step prompt episodes sampled every 20 steps: 0, 20, 40, then the last step (59) repeated.
TRAJ_LEN, STRIDE = 5, 20
PROMPT_STEPS = [0, 20, 40, 59, 59]
TRAIN_ROWS = 3 * EPISODE_STEPS  # per seen task: 3 episodes


def make_dm(spec: DatasetSpec, cache_dir: Path, seen=SEEN_TASKS, unseen=UNSEEN_TASKS, **kwargs: Any):
    options = {
        "batch_size": BATCH,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "traj_prompt_len": TRAJ_LEN,
        "traj_prompt_stride": STRIDE,
        **kwargs,
    }
    return PromptedOfflineDataModule(
        list(seen), list(unseen), dataset=spec, cache_dir=str(cache_dir), **options
    )


def _episodes(spec: DatasetSpec, task: str, kind: str) -> list:
    return list(minari.MinariDataset(spec.path(task, kind) / "data").iterate_episodes())


@dataclass(frozen=True)
class Prepared:
    """A datamodule after its first ``prepare_data`` (fresh embedding cache) and ``setup``."""

    dm: PromptedOfflineDataModule
    cache_dir: Path
    first_stats: EmbedStats
    first_total_passes: int


@pytest.fixture(scope="module")
def prepared(collected: Collected, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    cache_dir = tmp_path_factory.mktemp("embeddings")
    dm = make_dm(collected.spec, cache_dir)
    before = TextEncoder.total_forward_passes
    dm.prepare_data(progress=False)
    total = TextEncoder.total_forward_passes - before
    assert dm.embed_stats is not None
    dm.setup("fit")
    return Prepared(dm, cache_dir, dm.embed_stats, total)


@pytest.fixture
def first_batch(prepared: Prepared) -> Batch:
    batch = next(iter(prepared.dm.train_dataloader()))
    assert isinstance(batch, Batch)
    return batch


# ----------------------------------------------------------------------------------------------- prepare_data
def test_first_prepare_data_embeds_and_a_second_runs_no_llm(
    prepared: Prepared, collected: Collected, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prepared.first_stats.misses == 3 and prepared.first_stats.forward_passes > 0
    assert prepared.first_total_passes > 0
    mtimes = {p: p.stat().st_mtime_ns for p in Path(collected.spec.root).rglob("*") if p.is_file()}
    dm = make_dm(collected.spec, prepared.cache_dir)
    before = TextEncoder.total_forward_passes
    dm.prepare_data(progress=True)
    assert dm.embed_stats == EmbedStats(hits=3, misses=0, forward_passes=0)
    assert TextEncoder.total_forward_passes == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing re-collected
    table = capsys.readouterr().out
    assert "success" in table and all(task in table for task in SEEN_TASKS + UNSEEN_TASKS)


def test_dimensions_and_index_maps_before_setup(collected: Collected, tmp_path: Path) -> None:
    dm = make_dm(collected.spec, tmp_path)
    assert (dm.obs_dim, dm.act_dim, dm.text_embed_dim) == (OBS_DIM, ACT_DIM, 384)
    assert dm.task_names == ("reach", "push", "box-close")  # seen first
    assert dm.task_index == {"reach": 0, "push": 1, "box-close": 2}
    assert dm.transitions is None
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------------------------- batches
def test_batch_shapes_and_dtypes(first_batch: Batch) -> None:
    b = first_batch
    expected = {
        "obs": ((BATCH, OBS_DIM), torch.float32),
        "action": ((BATCH, ACT_DIM), torch.float32),
        "reward": ((BATCH,), torch.float32),
        "next_obs": ((BATCH, OBS_DIM), torch.float32),
        "not_done": ((BATCH,), torch.float32),
        "task_id": ((BATCH,), torch.int64),
    }
    for name, (shape, dtype) in expected.items():
        value = getattr(b, name)
        assert (tuple(value.shape), value.dtype) == (shape, dtype), name
        if dtype.is_floating_point:
            assert torch.isfinite(value).all(), name
    assert b.action.abs().max() <= 1.0


def test_batches_mix_the_seen_tasks(first_batch: Batch, prepared: Prepared) -> None:
    assert set(first_batch.task_id.tolist()) == {0, 1}  # both seen tasks, never the unseen one
    loader = prepared.dm.train_dataloader()
    assert loader is prepared.dm.stream and len(loader) == STEPS_PER_EPOCH


def test_transitions_are_the_collected_episodes(prepared: Prepared, collected: Collected) -> None:
    data = prepared.dm.transitions
    assert len(data.obs) == 2 * TRAIN_ROWS
    assert data.sizes.tolist() == [TRAIN_ROWS, TRAIN_ROWS] and data.offsets.tolist() == [0, TRAIN_ROWS]
    assert data.task_id.tolist() == [0] * TRAIN_ROWS + [1] * TRAIN_ROWS
    row = TRAIN_ROWS  # the first row of push
    for ep in _episodes(collected.spec, "push", "train"):
        rows = slice(row, row + len(ep.actions))
        torch.testing.assert_close(
            data.obs[rows], torch.from_numpy(ep.observations[:-1]).float(), rtol=0, atol=0
        )
        torch.testing.assert_close(
            data.next_obs[rows], torch.from_numpy(ep.observations[1:]).float(), rtol=0, atol=0
        )
        torch.testing.assert_close(data.action[rows], torch.from_numpy(ep.actions), rtol=0, atol=0)
        torch.testing.assert_close(data.reward[rows], torch.from_numpy(ep.rewards).float(), rtol=0, atol=0)
        row += len(ep.actions)


def test_not_done_is_one_for_time_limit_truncations(prepared: Prepared, collected: Collected) -> None:
    episodes = _episodes(collected.spec, "reach", "train")
    assert all(ep.truncations[-1] for ep in episodes)  # every episode ends in a truncation...
    assert torch.all(prepared.dm.transitions.not_done == 1.0)  # ...which is not a terminal state


def test_not_done_is_zero_only_at_a_terminal_state(dataset_copy: DatasetSpec, prepared: Prepared) -> None:
    with h5py.File(dataset_copy.path("reach", "train") / "data" / "main_data.hdf5", "r+") as f:
        f["episode_0/terminations"][-1] = True
        f["episode_0/truncations"][-1] = False
    dm = make_dm(dataset_copy, prepared.cache_dir, seen=["reach"], unseen=[])
    dm.setup()
    not_done = dm.transitions.not_done
    assert not_done[EPISODE_STEPS - 1] == 0.0
    assert not_done.sum() == len(not_done) - 1


def test_reward_scale_multiplies_rewards(prepared: Prepared, collected: Collected) -> None:
    dm = make_dm(collected.spec, prepared.cache_dir, reward_scale=2.5)
    dm.setup()
    # float64 × 2.5, then rounded to float32, vs rounded then × 2.5: one rounding apart.
    torch.testing.assert_close(dm.transitions.reward, 2.5 * prepared.dm.transitions.reward, rtol=1e-6, atol=0)
    assert not torch.equal(dm.transitions.reward, prepared.dm.transitions.reward)


def test_observation_statistics(prepared: Prepared, collected: Collected) -> None:
    dm, obs = prepared.dm, prepared.dm.transitions.obs
    torch.testing.assert_close(dm.obs_mean, obs.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(dm.obs_std, obs.std(0).clamp_min(1e-3), rtol=0, atol=0)
    assert dm.obs_std.min() >= 1e-3  # constant dims (the hidden goal) are not divided by zero
    raw = make_dm(collected.spec, prepared.cache_dir, normalize_obs=False)
    raw.setup()
    assert torch.equal(raw.obs_mean, torch.zeros(OBS_DIM)) and torch.equal(raw.obs_std, torch.ones(OBS_DIM))


# ----------------------------------------------------------------------------------------------- prompts
def test_task_prompts_shapes_seen_tasks_first(prepared: Prepared) -> None:
    tp = prepared.dm.task_prompts
    assert tp.names == ("reach", "push", "box-close")
    assert tp.text_embedding.shape == (3, 384) and tp.text_embedding.dtype == torch.float32
    assert tp.traj_obs.shape == (3, 2, TRAJ_LEN, OBS_DIM)
    assert tp.traj_act.shape == (3, 2, TRAJ_LEN, ACT_DIM)
    assert torch.isfinite(tp.traj_obs).all() and torch.isfinite(tp.traj_act).all()


def test_task_prompts_hold_the_right_data(prepared: Prepared, collected: Collected) -> None:
    tp, dm = prepared.dm.task_prompts, prepared.dm
    for t, task in enumerate(tp.names):
        for p, ep in enumerate(_episodes(collected.spec, task, "prompts")):
            want_obs = torch.from_numpy(ep.observations[PROMPT_STEPS]).float()
            torch.testing.assert_close(tp.traj_obs[t, p], want_obs, rtol=0, atol=0)
            torch.testing.assert_close(
                tp.traj_act[t, p], torch.from_numpy(ep.actions[PROMPT_STEPS]), rtol=0, atol=0
            )
    embeddings, _ = embed_texts(dm.prompt_texts(), dm.llm, prepared.cache_dir)
    for t, task in enumerate(tp.names):
        assert torch.equal(tp.text_embedding[t], embeddings[task])
    assert not torch.allclose(tp.text_embedding[0], tp.text_embedding[1])


def test_prompt_windows_cut_each_episode_into_consecutive_prompts(
    prepared: Prepared, collected: Collected
) -> None:
    # 4 steps every 5 cover 20 of the 60: windows at steps 0-15, 20-35 and 40-55, episode-major.
    dm = make_dm(collected.spec, prepared.cache_dir, traj_prompt_len=4, traj_prompt_stride=5,
                 traj_prompt_windows=3)  # fmt: skip
    dm.setup()
    tp = dm.task_prompts
    assert tp.traj_obs.shape == (3, 2 * 3, 4, OBS_DIM) and tp.traj_act.shape == (3, 2 * 3, 4, ACT_DIM)
    for t, task in enumerate(tp.names):
        for e, ep in enumerate(_episodes(collected.spec, task, "prompts")):
            for w in range(3):
                steps = [20 * w + 5 * k for k in range(4)]
                torch.testing.assert_close(tp.traj_obs[t, 3 * e + w],
                                           torch.from_numpy(ep.observations[steps]).float(), rtol=0, atol=0)
                torch.testing.assert_close(tp.traj_act[t, 3 * e + w], torch.from_numpy(ep.actions[steps]),
                                           rtol=0, atol=0)  # fmt: skip


def test_a_window_past_the_episode_is_refused(prepared: Prepared, collected: Collected) -> None:
    dm = make_dm(collected.spec, prepared.cache_dir, traj_prompt_len=4, traj_prompt_stride=5,
                 traj_prompt_windows=4)  # fmt: skip
    room = r"data\.traj_prompt_windows: .* a 60-step episode, room for 3 windows of 4 steps every 5 \(got 4\)"
    with pytest.raises(ValueError, match=room):
        dm.setup()


# -------------------------------------------------------------------------------------------- batch counting
def test_transfer_hook_counts_only_training_batches(prepared: Prepared, first_batch: Batch) -> None:
    before = prepared.dm.stream.consumed
    prepared.dm.on_before_batch_transfer(first_batch, 0)  # no trainer attached: not training
    assert prepared.dm.stream.consumed == before


# ----------------------------------------------------------------------------------------------- Lightning
class _Recorder(L.LightningModule):
    """Records each training batch; the optimiser is a no-op so only the data path is exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(OBS_DIM, 1)
        self.seen: list[tuple[float, tuple[int, ...]]] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch.obs.sum().item(), tuple(batch.task_id.tolist())))
        return self.layer(batch.obs).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(
    spec: DatasetSpec,
    cache_dir: Path,
    max_steps: int,
    ckpt_in: Path | None = None,
    ckpt_out: Path | None = None,
) -> tuple[list, int]:
    dm = make_dm(spec, cache_dir, batch_size=8, steps_per_epoch=4)
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return model.seen, dm.stream.consumed


@pytest.mark.slow
def test_trainer_resume_mid_epoch_sees_the_uninterrupted_batches(
    prepared: Prepared, collected: Collected, tmp_path: Path
) -> None:
    full, consumed = _fit(collected.spec, prepared.cache_dir, 10)
    assert consumed == 10 and len(full) == 10  # the hook counts consumed, not prefetched, batches
    ckpt = tmp_path / "mid-epoch.ckpt"
    head, consumed = _fit(collected.spec, prepared.cache_dir, 6, ckpt_out=ckpt)  # 1.5 epochs of 4
    assert consumed == 6
    tail, consumed = _fit(collected.spec, prepared.cache_dir, 10, ckpt_in=ckpt)
    assert consumed == 10
    assert head + tail == full


# ----------------------------------------------------------------------------------------------- bad config
def test_unknown_task_lists_close_matches(collected: Collected, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.seen_tasks: unknown task 'reachh'.*'reach'"):
        make_dm(collected.spec, tmp_path, seen=["reachh"], unseen=[])
    with pytest.raises(ValueError, match=r"data\.unseen_tasks: .*'door-unlock'"):
        make_dm(collected.spec, tmp_path, seen=["reach"], unseen=["door-unlok"])


def test_unseen_tasks_overlapping_seen_tasks_are_refused(collected: Collected, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.unseen_tasks: \['reach'\].*leak the test set"):
        make_dm(collected.spec, tmp_path, seen=["reach", "push"], unseen=["box-close", "reach"])


def test_target_tasks_must_be_seen(collected: Collected, tmp_path: Path) -> None:
    split = {"seen": ["reach", "push"], "unseen": ["box-close"]}
    assert make_dm(collected.spec, tmp_path, **split, target_tasks=["push"]).target_tasks == ["push"]
    with pytest.raises(ValueError, match=r"data\.target_tasks: \['box-close'\] are not in data\.seen_tasks"):
        make_dm(collected.spec, tmp_path, **split, target_tasks=["box-close"])


def test_no_seen_task_is_refused(collected: Collected, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.seen_tasks: at least one"):
        make_dm(collected.spec, tmp_path, seen=[], unseen=["box-close"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"steps_per_epoch": 0}, "data.steps_per_epoch"),
        ({"traj_prompt_len": 0}, "data.traj_prompt_len"),
        ({"traj_prompt_stride": -1}, "data.traj_prompt_stride"),
        ({"traj_prompt_windows": 0}, "data.traj_prompt_windows"),
        ({"reward_scale": 0.0}, "data.reward_scale"),
        ({"reward_scale": -1.0}, "data.reward_scale"),
        ({"reward_scale": float("nan")}, "data.reward_scale"),
        ({"reward_scale": float("inf")}, "data.reward_scale"),
    ],
)
def test_bad_numbers_name_the_field(collected: Collected, tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_dm(collected.spec, tmp_path, **kwargs)


# ----------------------------------------------------------------------------------------------- bad data
def _setup_error(spec: DatasetSpec, cache_dir: Path) -> ValueError:
    dm = make_dm(spec, cache_dir, seen=["reach"], unseen=["box-close"])
    with pytest.raises(ValueError) as err:
        dm.setup()
    assert err.value.__cause__ is None  # the message says it all; no h5py/minari traceback chained
    return err.value


@pytest.mark.parametrize(("task", "kind"), [("reach", "train"), ("box-close", "prompts")])
def test_missing_dataset_says_to_run_collect(
    dataset_copy: DatasetSpec, prepared: Prepared, task: str, kind: str
) -> None:
    shutil.rmtree(dataset_copy.path(task, kind))
    message = str(_setup_error(dataset_copy, prepared.cache_dir))
    assert f"{task}/{kind}-v0" in message and "`llmdpd collect`" in message


def test_empty_data_root_says_to_run_collect(
    collected: Collected, prepared: Prepared, tmp_path: Path
) -> None:
    spec = dataclasses.replace(collected.spec, root=str(tmp_path / "nothing-here"))
    assert "`llmdpd collect`" in str(_setup_error(spec, prepared.cache_dir))


def test_corrupt_hdf5_is_a_clear_error(dataset_copy: DatasetSpec, prepared: Prepared) -> None:
    (dataset_copy.path("reach", "train") / "data" / "main_data.hdf5").write_bytes(b"not an hdf5 file" * 64)
    message = str(_setup_error(dataset_copy, prepared.cache_dir))
    assert "'reach'" in message and "corrupt" in message and "`llmdpd collect`" in message


@pytest.mark.parametrize(
    ("task", "kind", "field", "index"),
    [
        ("reach", "train", "rewards", (7,)),
        ("reach", "train", "observations", (7, 3)),
        ("reach", "train", "actions", (7, 1)),
        ("box-close", "prompts", "observations", (20, 0)),
        ("box-close", "prompts", "actions", (40, 2)),
    ],
)
def test_nan_in_the_data_names_task_and_field(
    dataset_copy: DatasetSpec, prepared: Prepared, task: str, kind: str, field: str, index: tuple
) -> None:
    with h5py.File(dataset_copy.path(task, kind) / "data" / "main_data.hdf5", "r+") as f:
        values = f[f"episode_1/{field}"][()]
        values[index] = np.nan
        f[f"episode_1/{field}"][()] = values
    error = _setup_error(dataset_copy, prepared.cache_dir)
    assert isinstance(error, ConfigError) and error.key == "data.dataset.root"  # one line, no traceback
    message = str(error)
    assert f"{kind} dataset of '{task}'" in message and field in message and "non-finite" in message


@pytest.mark.parametrize(
    ("task", "kind", "expected"), [("reach", "train", "(T+1, 39)"), ("box-close", "prompts", "(T, 39)")]
)
def test_wrong_observation_width_names_the_expected_shape(
    dataset_copy: DatasetSpec, prepared: Prepared, task: str, kind: str, expected: str
) -> None:
    with h5py.File(dataset_copy.path(task, kind) / "data" / "main_data.hdf5", "r+") as f:
        narrow = f["episode_0/observations"][:, : OBS_DIM - 1]
        del f["episode_0/observations"]
        f["episode_0/observations"] = narrow
    message = str(_setup_error(dataset_copy, prepared.cache_dir))
    assert f"'{task}'" in message and "38)" in message and expected in message


def test_datamodule_default_llm_is_minilm(collected: Collected, tmp_path: Path) -> None:
    assert make_dm(collected.spec, tmp_path).llm == LLMSpec()
