"""Tests of ``TaskBank``: the prompt banks and statistics that travel with the weights.

Built from the tiny real dataset of ``model_fixtures`` (Meta-World reach/push seen, box-close unseen,
MiniLM text embeddings).
"""

from __future__ import annotations

import pytest
import torch

from llmdpd_pl.task_bank import BANKS
from tests.model_fixtures import ModelData, bank_module, make_module, model_data

__all__ = ["model_data"]


def test_fill_copies_prompts_and_statistics(model_data: ModelData) -> None:
    module, dm = bank_module(model_data)
    ctx, prompts = module.task_bank, dm.task_prompts
    assert prompts is not None
    assert ctx.task_names == tuple(dm.task_names) and ctx.n_seen == len(dm.seen_tasks)
    assert torch.equal(ctx.traj_obs_bank, prompts.traj_obs)
    assert torch.equal(ctx.traj_act_bank, prompts.traj_act)
    assert ctx.n_prompts == prompts.traj_obs.shape[1]
    obs = prompts.traj_obs[0, 0]  # (L, S) raw states
    torch.testing.assert_close(ctx.normalize(obs) * dm.obs_std + dm.obs_mean, obs)
    text, traj_obs, traj_act = ctx.prompts(torch.tensor([2, 0]), torch.tensor([0, 1]))
    assert torch.equal(text, prompts.text_embedding[[2, 0]])
    assert torch.equal(traj_obs[1], ctx.normalize(prompts.traj_obs[0, 1]))
    assert torch.equal(traj_act[0], prompts.traj_act[2, 0])


def test_task_ids_name_unknown_tasks(model_data: ModelData) -> None:
    module, _ = bank_module(model_data)
    assert module.task_bank.task_ids(["box-close", "reach"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"\['door-open'\] are not in the model's task bank"):
        module.task_bank.task_ids(["reach", "door-open"])


def test_random_text_source_keeps_norms_not_directions(model_data: ModelData) -> None:
    llm, dm = bank_module(model_data, text_source="llm")
    rnd, _ = bank_module(model_data, text_source="random")
    assert dm.task_prompts is not None
    assert torch.equal(llm.task_bank.text_bank, dm.task_prompts.text_embedding)
    # Rescaled to the LLM vector's norm: equal up to float32 rounding of the normalisation.
    torch.testing.assert_close(
        rnd.task_bank.text_bank.norm(dim=1), llm.task_bank.text_bank.norm(dim=1), rtol=1e-5, atol=0
    )
    cos = torch.nn.functional.cosine_similarity(rnd.task_bank.text_bank, llm.task_bank.text_bank, dim=1)
    # Random directions in 384-d have |cos| ~ 0.05; MiniLM vectors of these prompts are not random.
    assert cos.abs().max() < 0.3
    # Fixed per (text_seed, task): rebuilding gives the same vectors, another seed others.
    again, _ = bank_module(model_data, text_source="random")
    other, _ = bank_module(model_data, text_source="random", text_seed=1)
    assert torch.equal(again.task_bank.text_bank, rnd.task_bank.text_bank)
    assert not torch.allclose(other.task_bank.text_bank, rnd.task_bank.text_bank)


def test_state_dict_loads_into_an_empty_bank(model_data: ModelData) -> None:
    """The banks take the checkpoint's shapes."""
    module, dm = bank_module(model_data)
    state = module.state_dict()
    fresh = make_module(dm)
    assert fresh.task_bank.text_bank.shape[0] == 0
    fresh.load_state_dict(state, strict=True)
    for name in BANKS:
        assert torch.equal(getattr(fresh.task_bank, name), getattr(module.task_bank, name)), name
