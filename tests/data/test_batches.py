"""Tests for llmdpd_pl.data.batches: the batch stream's seeding, resumption and task sampling.

The transitions are synthetic: row i holds the value i, so two batches are equal exactly when they drew
the same rows. Resumption through a real Trainer is tested with the datamodule (test_datamodule.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmdpd_pl.data.batches import Batch, BatchStream, Transitions
from llmdpd_pl.envs import ACT_DIM, OBS_DIM

BATCH = 64
STEPS_PER_EPOCH = 5
SIZES = [150, 200, 180]  # rows per seen task


def _synthetic(sizes: list[int]) -> Transitions:
    n = sum(sizes)
    row = torch.arange(n, dtype=torch.float32)[:, None]
    task = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return Transitions(
        row.expand(n, OBS_DIM),
        torch.zeros(n, ACT_DIM),
        row[:, 0],
        row.expand(n, OBS_DIM),
        torch.ones(n),
        task,
    )


def _stream(data: Transitions, seed: int = 0, rank: int = 0, sampling: str = "balanced") -> BatchStream:
    return BatchStream(data, BATCH, STEPS_PER_EPOCH, seed, rank, sampling)  # type: ignore[arg-type]


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Batch))


def _consume(stream: BatchStream, iterator, k: int) -> list[Batch]:
    """Take k batches, counting each one consumed as the datamodule's transfer hook does."""
    out = []
    for _ in range(k):
        out.append(next(iterator))
        stream.consumed += 1
    return out


def test_same_seed_same_batches_other_seed_or_rank_other_batches() -> None:
    data = _synthetic(SIZES)
    a, b = list(_stream(data)), list(_stream(data))
    assert len(a) == STEPS_PER_EPOCH
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not _same(a[0], a[1])  # batches within a stream differ
    assert not _same(a[0], _stream(data, seed=1).sample(0))
    assert not _same(a[0], _stream(data, rank=1).sample(0))


def test_resume_continues_like_an_uninterrupted_stream() -> None:
    data = _synthetic(SIZES)
    uninterrupted = _stream(data)
    first_epoch = _consume(uninterrupted, iter(uninterrupted), STEPS_PER_EPOCH)
    it = iter(uninterrupted)
    _consume(uninterrupted, it, 2)  # stop mid-epoch, 7 batches consumed
    state = uninterrupted.state_dict()
    assert state == {"consumed": 7, "seed": 0, "rank": 0}

    resumed = _stream(data)
    resumed.load_state_dict(state)
    remainder = list(resumed)  # exactly the rest of the epoch
    assert len(remainder) == STEPS_PER_EPOCH - 2
    expected = _consume(uninterrupted, it, STEPS_PER_EPOCH - 2)
    assert next(it, None) is None  # the uninterrupted epoch ended there too
    assert all(_same(x, y) for x, y in zip(remainder, expected, strict=True))
    resumed.consumed += len(remainder)
    # The next epoch is identical and new: neither stream replays the first one.
    nxt_resumed, nxt = list(resumed), list(uninterrupted)
    assert len(nxt) == STEPS_PER_EPOCH
    assert all(_same(x, y) for x, y in zip(nxt_resumed, nxt, strict=True))
    assert not _same(nxt[0], first_epoch[0])


def test_resume_at_an_epoch_boundary_yields_a_full_epoch() -> None:
    stream = _stream(_synthetic(SIZES))
    stream.load_state_dict({"consumed": 2 * STEPS_PER_EPOCH, "seed": 0, "rank": 0})
    batches = list(stream)
    assert len(batches) == STEPS_PER_EPOCH
    assert _same(batches[0], stream.sample(2 * STEPS_PER_EPOCH))


def test_resume_with_another_seed_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data\.seed"):
        _stream(_synthetic(SIZES), seed=1).load_state_dict({"consumed": 3, "seed": 0, "rank": 0})


@pytest.mark.parametrize(("sampling", "low", "high"), [("balanced", 0.45, 0.55), ("proportional", 0.0, 0.03)])
def test_task_sampling(sampling: str, low: float, high: float) -> None:
    data = _synthetic([10, 1000])
    batch = BatchStream(data, 4000, 1, 0, 0, sampling).sample(0)  # type: ignore[arg-type]
    rows = batch.obs[:, 0].long()
    task0 = batch.task_id == 0
    # Rows stay inside their task's block (offsets/sizes, no off-by-one into the next task).
    assert torch.all(rows[task0] < 10) and torch.all((rows[~task0] >= 10) & (rows[~task0] < 1010))
    assert torch.equal(data.task_id[rows], batch.task_id)
    # 4000 draws: the binomial sd of the task-0 share is under 0.008, the bounds are 6 sd wide.
    assert low <= task0.float().mean().item() <= high
    assert len(set(rows[task0].tolist())) == 10  # every transition of the small task is reachable
