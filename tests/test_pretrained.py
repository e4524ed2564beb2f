"""Tests for llmdpd_pl.pretrained: ``load_policy`` on a checkpoint acts as ``llmdpd test`` does, with the EMA
actor; ``add_task`` conditions a new task through the training LLM and cache; bad input is one ConfigError.

The checkpoints are two-update fits (tests/pretrained_fixtures.py): random-like weights suffice, since every
prompt input and every weight reaches the actions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmdpd_pl import load_policy
from llmdpd_pl.data.embeddings import LLMSpec, TextEncoder
from llmdpd_pl.data.prompts import load_prompts
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.pretrained import Policy
from llmdpd_pl.rollouts import run_episodes
from llmdpd_pl.utils import derive_seed
from tests.model_fixtures import ModelData, model_data, one_thread
from tests.pretrained_fixtures import EVALUATION, Trained, trained

__all__ = ["model_data", "one_thread", "trained"]  # fixtures imported for pytest

# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

TASKS = ("reach", "push", "box-close")


def _states(policy: Policy) -> np.ndarray:
    """N fixed raw states (N, S): the first prompt states of every task, as an env returns them (float64)."""
    bank = policy.module.task_bank
    return bank.traj_obs_bank[:3, 0].reshape(-1, bank.traj_obs_bank.shape[-1]).double().numpy()


def _actions(policy: Policy, task: str, seed: int = 0) -> np.ndarray:
    return policy.act(_states(policy), task, generator=torch.Generator().manual_seed(seed))


def test_a_checkpoint_acts_with_its_ema_actor(trained: dict[str, Trained]) -> None:
    policy = load_policy(trained["both"].ckpt)
    assert policy.tasks == TASKS and policy.action_selection == "q_softmax"
    assert policy.to("cpu") is policy and policy.device == torch.device("cpu")
    ckpt = torch.load(trained["both"].ckpt, map_location="cpu", weights_only=True)
    state = ckpt["callbacks"]["ActorEMA"]
    ema = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    loaded = policy.module.ema_policy.state_dict()
    assert ema.keys() == loaded.keys() and all(torch.equal(ema[k], loaded[k]) for k in ema)
    online = policy.module.policy.state_dict()
    assert any(not torch.equal(ema[k], online[k]) for k in ema), "the EMA equals the online actor: no test"

    actions = _actions(policy, "reach")
    assert actions.shape == (15, 4) and actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    assert np.array_equal(_actions(policy, "reach"), actions)  # the same generator: the same actions
    assert not np.array_equal(_actions(policy, "reach", seed=1), actions)
    assert not np.array_equal(_actions(policy, "push"), actions)
    as_tensor = policy.act(torch.as_tensor(_states(policy)), "reach", torch.Generator().manual_seed(0))
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor.numpy(), actions)


@pytest.mark.parametrize("arm", ["both", "text"])
def test_it_scores_as_llmdpd_test(trained: dict[str, Trained], tmp_path: Path, arm: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``llmdpd test --prompts_from checkpoint`` and episodes run with ``Policy.act`` (each task's generator
    seeded as ``llmdpd test`` seeds it) give the same returns, bit for bit: the same actions at every step."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    from llmdpd_pl.cli import main

    output = tmp_path / "r.json"
    main(["test", "--config", str(trained[arm].config), "--ckpt_path", str(trained[arm].ckpt), "--expert",
          "false", "--output", str(output), "--prompts_from", "checkpoint", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    rows = json.loads(output.read_text())["results"]
    tested = {r["task"]: (r["mean_return"], r["success_rate"]) for r in rows}
    policy = load_policy(trained[arm].ckpt)
    seed = EVALUATION["seed"]
    generators = {t: torch.Generator().manual_seed(derive_seed(seed, t)) for t in TASKS}  # module_policy's
    for task in TASKS:
        counts = run_episodes(lambda obs, t: policy.act(obs, t, generators[t]), task, [0], 1, seed, 20)
        assert (counts.return_sum, counts.successes / counts.episodes) == tested[task], task


def test_add_task_reads_the_training_llm_and_cache(
    trained: dict[str, Trained], model_data: ModelData
) -> None:
    """A new task given reach's own text and trajectories acts as reach, and its text is a cache hit."""
    policy = load_policy(trained["both"].ckpt, cache_dir=model_data.cache_dir)
    bank = policy.module.task_bank
    passes = TextEncoder.total_forward_passes
    policy.add_task("reach-again", text=load_prompts()["reach"], trajectory=(bank.traj_obs_bank[0].numpy(),
                    bank.traj_act_bank[0].numpy()))  # fmt: skip
    assert TextEncoder.total_forward_passes == passes, "a cached text ran the LLM"
    assert policy.tasks == (*TASKS, "reach-again") and bank.texts is not None
    assert bank.texts[-1] == bank.texts[0]
    assert np.array_equal(_actions(policy, "reach-again"), _actions(policy, "reach"))
    for p in range(bank.n_prompts):  # every prompt trajectory, and the other tasks' actions unchanged
        new, old = (
            policy.act(_states(policy), t, torch.Generator().manual_seed(0), p)
            for t in ("reach-again", "reach")
        )
        assert np.array_equal(new, old), p
    before = _actions(load_policy(trained["both"].ckpt), "push")
    assert np.array_equal(_actions(policy, "push"), before)


def test_add_task_from_one_sentence(trained: dict[str, Trained], tmp_path: Path) -> None:
    """A text-only policy acts on a task it never saw, from a plain sentence (a cache miss runs MiniLM)."""
    policy = load_policy(trained["text"].ckpt, cache_dir=tmp_path / "cache")
    policy.add_task("open-drawer", text="Pull the drawer handle to open the drawer.")
    assert list((tmp_path / "cache").glob("*.pt")), "the new text is not cached"
    actions = _actions(policy, "open-drawer")
    assert actions.shape == (15, 4) and np.isfinite(actions).all()
    assert not np.array_equal(actions, _actions(policy, "reach")), "the new task acts as reach"
    again = load_policy(trained["text"].ckpt, cache_dir=tmp_path / "cache")
    passes = TextEncoder.total_forward_passes
    again.add_task("open-drawer", text="Pull the drawer handle to open the drawer.")
    assert TextEncoder.total_forward_passes == passes, "a cached text ran the LLM"
    assert np.array_equal(_actions(again, "open-drawer"), actions)


def _error(call: object, *args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    assert "\n" not in str(info.value)
    return info.value


def test_bad_input_is_one_config_error(trained: dict[str, Trained], tmp_path: Path,
                                       model_data: ModelData) -> None:  # fmt: skip
    assert _error(load_policy, tmp_path / "missing.ckpt").key == "path"
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert _error(load_policy, tmp_path / "notes.ckpt").key == "path"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")  # a zip, but no Lightning checkpoint
    assert "state_dict" in str(_error(load_policy, tmp_path / "other.ckpt"))
    (tmp_path / "folder").mkdir()
    assert _error(load_policy, tmp_path / "folder").key == "path"  # a folder that is no export

    policy = load_policy(trained["both"].ckpt, cache_dir=model_data.cache_dir)
    states = _states(policy)
    assert _error(policy.act, states, "door-lock").key == "task"
    assert _error(policy.act, states[:, :5], "reach").key == "obs"
    assert _error(policy.act, states, "reach", prompt_index=99).key == "prompt_index"
    trajectory = (np.zeros((5, 39)), np.zeros((5, 4)))
    other = LLMSpec(instruction="Describe the task.")
    assert _error(policy.add_task, "new", "Open it.", trajectory, llm=other).key == "llm.instruction"
    assert _error(policy.add_task, "new", "Open it.").key == "trajectory"  # prompts=both reads both
    assert _error(policy.add_task, "new", trajectory=trajectory).key == "text"
    short = (np.zeros((3, 39)), np.zeros((3, 4)))  # L = 5
    assert _error(policy.add_task, "new", "Open it.", short).key == "trajectory"
    assert _error(policy.add_task, "new", {"task": "Open it."}, trajectory).key == "text"  # fields missing
    assert _error(policy.add_task, "reach", "Open it.", trajectory).key == "name"
    assert policy.tasks == TASKS  # nothing was added
