"""Tests for llmdpd_pl.acting: ``act``'s shape, bounds and reproducibility, its q_softmax pick among the
candidates, its use of the EMA policy, and that what the user runs responds to its prompts, at a fixed
state and noise.

The prompt tests run at two depths. The public acting path (``act`` and ``module_policy``, both through
``PromptedPolicy.select_action``) on a tiny untrained module with the real task bank (MiniLM embeddings of
the packaged prompts, the session's Meta-World prompt trajectories); and ``llmdpd test`` end to end on
checkpoints of one update. Random weights suffice: every prompt input reaches the denoiser, so another
prompt gives another action. With ``prompts: none`` the same changes must change nothing, bit for bit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from llmdpd_pl.acting import act, act_conditioned, module_policy, task_conditioning
from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.cli import main
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.policy import scored_candidates
from tests.model_fixtures import (
    ModelData,
    bank_module,
    fit,
    make_datamodule,
    model_data,
    one_thread,
    write_config,
)

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

REACH, PUSH, BOX_CLOSE = 0, 1, 2  # task ids in the bank: seen reach, push, then unseen box-close
N_STATES = 8
OVERRIDE = {"box-close": {"task": "Shut the box", "objective": "Lower the lid onto the box to close it.",
                          "constraints": "Do not knock the box over."}}  # fmt: skip


def _actions(module: LLMDPDModule, states: Tensor, task: int, prompt_index: int = 0) -> Tensor:
    """The acting path's actions for N fixed raw states of one task, with fixed noise: (N, S) → (N, A)."""
    tasks = torch.full((len(states),), task)
    return act(module, states, tasks, prompt_index, generator=torch.Generator().manual_seed(0))


def _policy_actions(module: LLMDPDModule, states: Tensor, prompt_index: int,
                    sources: dict[str, tuple[str, str]] | None = None) -> np.ndarray:
    """``module_policy`` (what rollouts call, numpy in and out) on reach's env with the same seed."""
    return module_policy(module, prompt_index, seed=0, sources=sources)(states.double().numpy(), "reach")


def _override_bank(module: LLMDPDModule, model_data: ModelData) -> None:
    """Refill the bank as ``llmdpd test`` does with ``--data.prompts``: the text given at test time, the
    training statistics kept."""
    dm = make_datamodule(model_data, prompts=OVERRIDE)
    dm.setup("test")  # embeds the new text with MiniLM (a cache miss), loads every task's prompts
    assert dm.task_prompts is not None
    bank = module.task_bank
    bank.fill(dm.task_prompts, bank.obs_mean.clone(), bank.obs_std.clone(), bank.n_seen)


@pytest.mark.parametrize("selection", ["sample", "q_softmax"])
def test_actions_follow_the_prompts(model_data: ModelData, selection: str) -> None:
    module, dm = bank_module(model_data, action_selection=selection)
    assert dm.transitions is not None and module.task_bank.n_prompts > 1
    states = dm.transitions.obs[:N_STATES]  # (N, S) raw states, the same for every call
    base = _actions(module, states, REACH)
    assert torch.equal(_actions(module, states, REACH), base)  # fixed state and noise: reproducible
    # Two tasks' prompts, two prompt trajectories of one task: the actions change. (Not every entry:
    # the untrained denoiser saturates some at the ±1 clip.)
    assert not torch.equal(_actions(module, states, PUSH), base), "push's prompts act as reach's"
    assert not torch.equal(_actions(module, states, REACH, prompt_index=1), base), "prompt_index ignored"
    # The rollouts' PolicyFn: the same, per prompt trajectory and per prompt source.
    own = _policy_actions(module, states, 0)
    assert np.array_equal(_policy_actions(module, states, 0), own)
    assert not np.array_equal(_policy_actions(module, states, 1), own), "module_policy: prompt_index ignored"
    swapped = _policy_actions(module, states, 0, {"reach": ("push", "push")})
    assert not np.array_equal(swapped, own), "module_policy: prompt sources ignored"

    # A text prompt given at test time changes that task's actions, and no other task's.
    before = {t: _actions(module, states, t) for t in (REACH, PUSH, BOX_CLOSE)}
    _override_bank(module, model_data)
    assert not torch.equal(_actions(module, states, BOX_CLOSE), before[BOX_CLOSE]), "text override ignored"
    assert torch.equal(_actions(module, states, REACH), before[REACH])
    assert torch.equal(_actions(module, states, PUSH), before[PUSH])


@pytest.mark.parametrize("selection", ["sample", "q_softmax"])
def test_without_prompts_the_actions_ignore_them(model_data: ModelData, selection: str) -> None:
    module, dm = bank_module(model_data, prompts="none", action_selection=selection)
    assert dm.transitions is not None
    states = dm.transitions.obs[:N_STATES]
    base = _actions(module, states, REACH)
    for task, index in ((PUSH, 0), (BOX_CLOSE, 0), (REACH, 1)):
        assert torch.equal(_actions(module, states, task, index), base), (task, index)
    own = _policy_actions(module, states, 0)
    assert np.array_equal(_policy_actions(module, states, 1), own)
    assert np.array_equal(_policy_actions(module, states, 0, {"reach": ("push", "push")}), own)
    _override_bank(module, model_data)
    assert torch.equal(_actions(module, states, BOX_CLOSE), base)


# ----------------------------------------------------------------------------- act: shape, selection, EMA
@pytest.mark.parametrize("selection", ["sample", "q_softmax"])
def test_act_shape_bounds_and_reproducibility(model_data: ModelData, selection: str) -> None:
    module, dm = bank_module(model_data, action_selection=selection)
    assert dm.transitions is not None
    obs = dm.transitions.obs[:12]  # (N, S) raw states
    tasks = torch.tensor([0, 1, 2] * 4)  # seen and unseen tasks mixed
    a1 = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    a2 = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    a3 = act(module, obs, tasks, generator=torch.Generator().manual_seed(1))
    assert a1.shape == (12, dm.act_dim)
    assert a1.abs().max() <= 1.0
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_q_softmax_picks_the_candidate_of_highest_clipped_double_q(model_data: ModelData) -> None:
    """With Q scaled up, softmax(min(Q1', Q2')) is one-hot: each state's pick is its best candidate.

    Near-ties (candidates clipped to the same bound, say) may go either way, so the test requires the
    picked candidate's min-Q to be within 10 (a softmax odds of e^-10) of the best, where the candidates'
    values spread over thousands.
    """
    torch.manual_seed(0)
    module, dm = bank_module(model_data, action_selection="q_softmax", n_action_candidates=8)
    assert dm.transitions is not None
    obs, tasks = dm.transitions.obs[:12], torch.tensor([0, 1, 2] * 4)  # (N, S) raw, (N,)
    cond, critic_cond = (c[tasks] for c in task_conditioning(module, torch.arange(3)))

    def candidates() -> tuple[Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        noise = module.ema_policy.diffusion.chain_noise((12 * 8, dm.act_dim), gen)  # act's first draw
        return scored_candidates(
            module.ema_policy, module.critic_target, module.task_bank.normalize(obs), cond, critic_cond, noise
        )  # (N·8, A), (N, 8), (N, 8)

    with torch.no_grad():  # centre each head on these candidates, then scale: the heads' orders cross
        _, q1, q2 = candidates()
        last = module.critic_target.layers[-1]
        last.bias.sub_(torch.stack([q1.mean(), q2.mean()]).view(2, 1, 1)).mul_(1e6)
        last.weight.mul_(1e6)
        cand, q1, q2 = candidates()
    q = torch.minimum(q1, q2)  # (N, 8)
    best = q.argmax(dim=1)  # (N,)
    assert not torch.equal(best, q1.argmax(dim=1)) and not torch.equal(best, q2.argmax(dim=1))
    assert (q.amax(dim=1) - q.amin(dim=1)).min() > 1000

    picked = act_conditioned(module, obs, cond, critic_cond, torch.Generator().manual_seed(0))  # (N, A)
    same = (cand.view(12, 8, -1) - picked[:, None]).abs().amax(dim=-1) < 1e-6  # (N, 8): the picked candidate
    assert same.any(dim=1).all()
    q_picked = q.masked_fill(~same, -torch.inf).amax(dim=1)  # (N,)
    assert (q_picked >= q.amax(dim=1) - 10).all()


def test_act_uses_ema_policy(model_data: ModelData, tmp_path: Path) -> None:
    ema = ActorEMA(decay=0.5, start=0, every=1)
    module, _ = fit(model_data, tmp_path, updates=2, callbacks=[ema],
                     module_kw={"action_selection": "sample"})
    assert ema.averaged is not None and module.ema_policy is ema.averaged.module
    obs, tasks = torch.zeros(4, module.hparams.obs_dim), torch.zeros(4, dtype=torch.long)
    a_ema = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    module._ema = ()  # detach the EMA: act falls back to the online policy
    a_online = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a_ema, a_online)


# ----------------------------------------------------------------------------- through `llmdpd test`
TASKS = ("reach", "push", "box-close")


@pytest.fixture(scope="module")
def checkpoints(model_data: ModelData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """prompts → (config, checkpoint) of a one-update fit, whose RolloutEvaluation runs 20-step episodes."""
    root = tmp_path_factory.mktemp("acting")
    evaluation = {"class_path": "llmdpd_pl.callbacks.rollout_evaluation.RolloutEvaluation",
                  "init_args": {"max_steps": 20, "num_envs": 1, "test_episodes": 1}}  # fmt: skip
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["llmdpd"])  # LightningCLI warns about pytest's own argv otherwise
        for prompts in ("both", "none"):
            ema = {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA", "init_args": {"start": 0, "every": 1}}
            config = write_config(root / f"{prompts}.yaml", model_data, root / prompts,
                                  trainer={"max_steps": 2, "callbacks": [ema, evaluation]},
                                  model={"prompts": prompts})  # fmt: skip
            main(["fit", "--config", str(config)])
            (ckpt,) = (root / prompts / "checkpoints").glob("*.ckpt")
            made[prompts] = (config, ckpt)
    yield made


def _run_test(config: Path, ckpt: Path, root: Path, *extra: str) -> dict[str, Any]:
    """``llmdpd test``'s results JSON; with ``--prompt_swap``, the matrix JSON under ``"matrix"``."""
    output = root / "r.json"
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--expert", "false", "--output",
          str(output), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
    data = json.loads(output.read_text())
    data["returns"] = {r["task"]: r["mean_return"] for r in data["results"]}
    if (root / "prompt_matrix.json").exists():
        cells = json.loads((root / "prompt_matrix.json").read_text())["cells"]
        data["matrix"] = {(c["task"], c["prompt_source"]): c["mean_return"] for c in cells}
    return data


def test_llmdpd_test_follows_the_prompts(checkpoints: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every episode runs the same layout with the same action noise, so a changed return is a changed
    action: each of the three prompt changes must change it (a 20-step return is a sum of 20 float
    rewards; equal returns from different actions would take an exact coincidence)."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    config, ckpt = checkpoints["both"]
    plain = _run_test(config, ckpt, tmp_path / "plain", "--prompt_swap", "both")
    assert set(plain["returns"]) == set(TASKS)
    for t in TASKS:  # the matrix's diagonal is the plain run; every other task's prompts change the return
        assert plain["matrix"][(t, t)] == plain["returns"][t], t
        for u in TASKS:
            assert (plain["matrix"][(t, u)] != plain["returns"][t]) == (u != t), (t, u)
    other = _run_test(config, ckpt, tmp_path / "index1", "--prompt_index", "1")
    assert other["meta"]["prompt_index"] == 1
    for t in TASKS:
        assert other["returns"][t] != plain["returns"][t], t
    text = _run_test(config, ckpt, tmp_path / "text", "--data.prompts", json.dumps(OVERRIDE))
    assert text["returns"]["box-close"] != plain["returns"]["box-close"]
    sha = [run["meta"]["tasks"]["box-close"]["prompt_sha256"] for run in (text, plain)]
    assert sha[0] != sha[1]
    for t in ("reach", "push"):  # the other tasks' prompts did not change
        assert text["returns"][t] == plain["returns"][t], t


def test_llmdpd_test_without_prompts_ignores_them(checkpoints: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["llmdpd"])
    config, ckpt = checkpoints["none"]
    plain = _run_test(config, ckpt, tmp_path / "plain", "--prompt_swap", "both")
    assert plain["meta"]["prompts"] == "none"
    for t in TASKS:
        for u in TASKS:
            assert plain["matrix"][(t, u)] == plain["returns"][t], (t, u)
    # Another trajectory and another text at once: neither may change anything.
    changed = _run_test(config, ckpt, tmp_path / "changed", "--prompt_index", "1",
                        "--data.prompts", json.dumps(OVERRIDE))  # fmt: skip
    assert changed["returns"] == plain["returns"]
