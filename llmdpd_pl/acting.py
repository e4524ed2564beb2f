"""A trained ``LLMDPDModule`` acting on its tasks, for evaluation.

:func:`module_policy` (numpy in, numpy out, one task per call, the :data:`~llmdpd_pl.rollouts.PolicyFn`
that rollouts run) and :func:`act` (tensors) condition the module's EMA policy on a task's prompts and
call ``PromptedPolicy.select_action`` with the module's ``action_selection``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmdpd_pl.rollouts import PolicyFn
from llmdpd_pl.utils import derive_seed


@torch.no_grad()
def task_conditioning(
    module: Any, tasks: Tensor, prompt_index: int = 0, traj_tasks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """z of the EMA actor, and of the online policy for the critics, for tasks (T,) → (T, C) each.

    ``traj_tasks`` (T,) takes the trajectory prompts from other tasks. Prompts are fixed during an
    evaluation, so callers compute this once per task, not per step.
    """
    p = torch.full_like(tasks, prompt_index)
    ema = module.encode_prompts(module.ema_policy, tasks, p, traj_tasks)
    return ema, module.encode_prompts(module.policy, tasks, p, traj_tasks)


@torch.no_grad()
def act_conditioned(
    module: Any, obs: Tensor, z: Tensor, critic_z: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """The module's EMA actor's actions for raw states: (N, S), (N, C), (N, C) → (N, A) in [-1, 1].

    ``model.action_selection`` picks the mode of ``PromptedPolicy.select_action``: ``q_softmax`` scores
    ``n_action_candidates`` per state with the target critics (conditioned on ``critic_z``); ``sample``
    draws one reverse chain. ``model.guidance`` w ≠ 1 samples with classifier-free guidance.
    """
    q_softmax = module.hparams["action_selection"] == "q_softmax"
    return module.ema_policy.select_action(
        module.task_bank.normalize(obs),
        z,
        generator,
        critic=module.critic_target if q_softmax else None,
        critic_z=critic_z,
        n_candidates=module.hparams["n_action_candidates"] if q_softmax else 1,
        guidance=module.hparams["guidance"],
    )


@torch.no_grad()
def act(
    module: Any, obs: Tensor, tasks: Tensor, prompt_index: int = 0, generator: torch.Generator | None = None
) -> Tensor:
    """The module's EMA actor's actions for raw states of given tasks: (N, S), (N,) → (N, A) in [-1, 1]."""
    unique, inverse = torch.unique(tasks, return_inverse=True)
    z, critic_z = task_conditioning(module, unique, prompt_index)
    return act_conditioned(module, obs, z[inverse], critic_z[inverse], generator)


def module_policy(
    module: Any, prompt_index: int, seed: int, sources: Mapping[str, tuple[str, str]] | None = None
) -> PolicyFn:
    """The module's EMA actor as a :data:`PolicyFn`, conditioned on each task's prompts.

    ``sources[task] = (text task, trajectory task)`` conditions a task on other tasks' prompts (default:
    its own). Each task draws its actions from a generator of its own, seeded by ``(seed, task)``, so a
    task's episodes do not depend on which tasks ran before it, nor on whose prompts it reads. The prompts'
    encodings are computed once per task (the weights do not change during an evaluation).
    """
    generators: dict[str, torch.Generator] = {}
    conditioning: dict[str, tuple[Tensor, Tensor]] = {}

    def policy(obs: np.ndarray, task: str) -> np.ndarray:
        if task not in conditioning:
            text, traj = (sources or {}).get(task, (task, task))
            ids = module.task_bank.task_ids([text, traj])
            conditioning[task] = task_conditioning(module, ids[:1], prompt_index, ids[1:])
            generators[task] = torch.Generator(device=module.device).manual_seed(derive_seed(seed, task))
        z, critic_z = (c.expand(len(obs), -1) for c in conditioning[task])
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=module.device)
        return act_conditioned(module, obs_t, z, critic_z, generators[task]).cpu().numpy()

    return policy


def conditioning_record(module: Any, tasks: Sequence[str], prompt_index: int | str) -> dict[str, Any]:
    """What conditions each task: its text prompt (the LLM input) and that text's SHA-256, its trajectory
    prompts, and the LLM's identity, for a results JSON."""
    bank = module.task_bank
    texts = dict(zip(bank.task_names, bank.texts or [None] * len(bank.task_names), strict=True))
    trajectories = list(range(bank.n_prompts)) if prompt_index == "all" else prompt_index
    record = {
        t: {
            "prompt_text": texts.get(t),
            "prompt_sha256": hashlib.sha256(texts[t].encode()).hexdigest() if texts.get(t) else None,
            "trajectory_prompts": bank.n_prompts,
            "trajectory_prompt_index": trajectories,
        }
        for t in tasks
    }
    rule = "episode i uses trajectory i mod P" if prompt_index == "all" else "every episode uses prompt_index"
    return {"llm": bank.llm, "episode_prompt_index": rule, "tasks": record}
