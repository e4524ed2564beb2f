"""The levers that could make the policy use what its prompts mean (``configs/levers/``), each of which
must fail a test if it is silently off: FiLM conditioning, prompt dropout with classifier-free guidance,
and the text–trajectory alignment loss. All run on the tiny real dataset of ``model_fixtures``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from llmdpd_pl.acting import act
from llmdpd_pl.cli import reconcile_with_checkpoint
from llmdpd_pl.diffusion import guided_eps
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.losses import info_nce
from llmdpd_pl.networks import Denoiser
from llmdpd_pl.objectives import actor_objective, draw
from tests.model_fixtures import (
    ModelData,
    bank_module,
    make_datamodule,
    make_module,
    make_trainer,
    model_data,
    one_thread,
)

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest


# ----------------------------------------------------------------------------- FiLM
def _hidden(denoiser: Denoiser, z: Tensor) -> Tensor:
    """The last hidden layer's activation of ``denoiser`` for fixed a_k, k and s, and prompts z (B, C)."""
    seen: list[Tensor] = []
    hook = denoiser.net[-2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    obs, a_k, k = torch.ones(len(z), 4), torch.zeros(len(z), 2), torch.zeros(len(z), dtype=torch.long)
    denoiser(a_k, k, denoiser.state_term(obs, z))
    hook.remove()
    return seen[0]


def test_film_lets_z_change_a_deep_layer_that_concat_cannot_reach() -> None:
    torch.manual_seed(0)
    film = Denoiser(4, 2, 3, hidden_dim=16, film=True)
    for p in film.modulation.parameters():  # type: ignore[union-attr]
        torch.nn.init.normal_(p)  # a trained modulation (it starts at zero: the plain denoiser)
    concat = Denoiser(4, 2, 3, hidden_dim=16)
    concat.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith("modulation")})
    z1, z2 = torch.zeros(1, 3), torch.ones(1, 3)
    # Only the FiLM path reaches the last hidden layer other than through the first layer: zero the
    # first layer's prompt columns, and only FiLM still lets z change it.
    with torch.no_grad():
        for net in (film, concat):
            net.first_layer.weight[:, -3:] = 0.0
    assert torch.equal(_hidden(concat, z1), _hidden(concat, z2))
    assert not torch.allclose(_hidden(film, z1), _hidden(film, z2))


def test_film_starts_as_the_plain_denoiser_and_needs_a_prompt() -> None:
    torch.manual_seed(0)
    film = Denoiser(4, 2, 3, hidden_dim=16, film=True)
    concat = Denoiser(4, 2, 3, hidden_dim=16)
    concat.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith("modulation")})
    z = torch.randn(5, 3)
    assert torch.equal(_hidden(film, z), _hidden(concat, z))
    with pytest.raises(ValueError, match="cond_dim"):
        Denoiser(4, 2, 0, film=True)


def test_film_module_trains_its_modulation(model_data: ModelData, tmp_path: Path) -> None:
    dm = make_datamodule(model_data)
    module = make_module(dm, conditioning="film")
    make_trainer(tmp_path, 3).fit(module, datamodule=dm)
    modulation = module.policy.denoiser.modulation
    assert modulation is not None and modulation.weight.abs().sum() > 0


# ----------------------------------------------------------------------------- guidance
def test_guided_eps_is_unconditional_at_0_and_conditional_at_1() -> None:
    cond, uncond = torch.randn(6, 3), torch.randn(6, 3)
    assert torch.equal(guided_eps(cond, uncond, 0.0), uncond)
    assert torch.equal(guided_eps(cond, uncond, 1.0), cond)
    assert torch.allclose(guided_eps(cond, uncond, 2.0), 2 * cond - uncond)


def test_guidance_0_acts_as_the_no_prompt_embedding_and_1_as_the_prompt(model_data: ModelData) -> None:
    module, dm = bank_module(model_data, prompt_dropout=0.25, action_selection="sample")
    policy = module.policy
    assert policy.null_z is not None
    with torch.no_grad():
        policy.null_z.normal_()  # a trained "no prompt" embedding
    assert dm.transitions is not None
    obs = module.task_bank.normalize(dm.transitions.obs[:8])
    z = torch.randn(8, policy.cond_dim)
    noise = policy.diffusion.chain_noise((8, policy.act_dim), torch.Generator().manual_seed(0))
    null = policy.null_z.expand_as(z)
    assert torch.allclose(policy.sample(obs, z, noise, guidance=0.0), policy.sample(obs, null, noise))
    assert torch.equal(policy.sample(obs, z, noise, guidance=1.0), policy.sample(obs, z, noise))
    assert not torch.allclose(policy.sample(obs, z, noise, guidance=3.0), policy.sample(obs, z, noise))


def test_acting_reads_model_guidance(model_data: ModelData) -> None:
    module, dm = bank_module(model_data, prompt_dropout=0.25, action_selection="sample")
    assert dm.transitions is not None and module.policy.null_z is not None
    with torch.no_grad():
        module.policy.null_z.normal_()
    obs, tasks = dm.transitions.obs[:6], torch.tensor([0, 1, 2] * 2)
    plain = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    module.hparams["guidance"] = 3.0
    guided = act(module, obs, tasks, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, guided)


def test_prompt_dropout_feeds_the_null_embedding_to_the_diffusion_loss(model_data: ModelData) -> None:
    module, dm = bank_module(model_data, prompt_dropout=0.5)
    bank, policy = module.task_bank, module.policy
    batch = dm.stream.sample(0)
    seen = torch.arange(bank.n_seen)
    z = policy.encode_prompts(*bank.prompts(seen, torch.zeros_like(seen)))
    draws = draw(policy.diffusion, batch.action, 1, torch.Generator().manual_seed(0), prompt_dropout=0.5)
    assert draws.drop is not None and 0 < int(draws.drop.sum()) < len(draws.drop)
    losses, _ = actor_objective(policy, module.critic, batch, z, draws, 1.0)
    losses.bc_loss.backward()
    assert policy.null_z is not None and policy.null_z.grad is not None and policy.null_z.grad.abs().sum() > 0
    without = draw(policy.diffusion, batch.action, 1, torch.Generator().manual_seed(0))
    assert without.drop is None and torch.equal(without.eps, draws.eps)  # drawn last: the rest is unchanged


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"guidance": 2.0}, "model.guidance"),
        ({"prompt_dropout": 0.2, "prompts": "none"}, "model.prompt_dropout"),
        ({"prompt_dropout": 1.5}, "model.prompt_dropout"),
        ({"conditioning": "film", "prompts": "none"}, "model.conditioning"),
        ({"align_weight": 0.1, "prompts": "trajectory"}, "model.align_weight"),
    ],
)
def test_a_lever_its_policy_cannot_use_is_a_config_error(
    model_data: ModelData, kwargs: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_module(make_datamodule(model_data), **kwargs)
    assert err.value.key == key


def test_turning_a_lever_on_or_off_on_a_checkpoint_is_refused_and_guidance_applies() -> None:
    trained = {"prompt_dropout": 0.0, "guidance": 1.0, "align_weight": 0.1}
    with pytest.raises(ConfigError, match="prompt_dropout"):
        reconcile_with_checkpoint({"prompt_dropout": 0.25}, trained, resume=True)
    with pytest.raises(ConfigError, match="align_weight"):
        reconcile_with_checkpoint({"align_weight": 0.0}, trained, resume=True)
    values, notes = reconcile_with_checkpoint({"align_weight": 0.5}, trained, resume=True)
    assert values["align_weight"] == 0.5 and len(notes) == 1
    values, _ = reconcile_with_checkpoint({"guidance": 2.0}, {**trained, "prompt_dropout": 0.25})
    assert values["guidance"] == 2.0


# ----------------------------------------------------------------------------- alignment
def test_info_nce_is_log_t_without_information_and_falls_when_rows_pair_up() -> None:
    u = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    same = torch.ones(5, 8)
    assert torch.allclose(info_nce(same, same), torch.log(torch.tensor(5.0)))
    assert info_nce(u, u) < info_nce(u, u.roll(1, dims=0))
    with pytest.raises(ValueError, match="T >= 2"):
        info_nce(u[:1], u[:1])


def test_alignment_loss_decreases_on_a_tiny_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    text, traj = torch.randn(6, 10, generator=gen), torch.randn(6, 12, generator=gen)
    f, g = torch.nn.Linear(10, 4), torch.nn.Linear(12, 4)
    opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=0.05)
    losses = []
    for _ in range(100):
        loss = info_nce(f(text), g(traj))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("prompts", ["both", "text"])
def test_align_weight_trains_both_encoders_through_the_actor_loss(
    model_data: ModelData, prompts: str
) -> None:
    module, dm = bank_module(model_data, prompts=prompts, align_weight=1.0)
    bank, policy = module.task_bank, module.policy
    assert policy.text_head is not None and policy.traj_encoder is not None  # kept for the loss with text
    batch = dm.stream.sample(0)
    seen = torch.arange(bank.n_seen)
    prompts_in = bank.prompts(seen, torch.zeros_like(seen))
    z = policy.encode_prompts(*prompts_in)
    assert z.shape[1] == policy.cond_dim == {"both": 2, "text": 1}[prompts] * module.hparams["prompt_dim"]
    draws = draw(policy.diffusion, batch.action, 1, torch.Generator().manual_seed(0))
    pair = policy.prompt_pair(*prompts_in)
    losses, _ = actor_objective(policy, module.critic, batch, z, draws, 1.0, pair, 1.0)
    assert losses.align_loss is not None
    assert torch.allclose(losses.loss, losses.bc_loss + losses.q_loss + losses.align_loss)
    losses.align_loss.backward()
    for part in (policy.text_head, policy.traj_encoder):
        assert sum(p.grad.abs().sum().item() for p in part.parameters() if p.grad is not None) > 0
