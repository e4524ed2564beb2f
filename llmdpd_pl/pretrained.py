"""A trained policy outside the trainer: :func:`load_policy` reads a Lightning checkpoint or a folder written
by ``llmdpd export`` (:mod:`llmdpd_pl.export`) and returns a :class:`Policy`.

The policy is the checkpoint's EMA actor (the ``ActorEMA`` callback's state; the online actor if it has none),
conditioned on a task's prompts from the task bank, and it acts through :func:`llmdpd_pl.acting.act` with the
checkpoint's ``action_selection`` and ``n_action_candidates``: the code path of ``llmdpd test``. It needs no
Trainer, no datamodule and no dataset; :meth:`Policy.add_task` loads the LLM only for a text not in the
embedding cache.

An exported folder holds ``model.safetensors`` (:func:`exported_state`) and ``config.json`` (the module's
hyperparameters, the task bank's names, texts and LLM identity, provenance): no pickle.

Shapes: N states, S state dim, A action dim, T tasks, P trajectory prompts per task, L prompt length, E LLM
width.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from llmdpd_pl.acting import act
from llmdpd_pl.data.embeddings import LLMSpec, check_same_llm, embed_texts, llm_identity
from llmdpd_pl.data.prompts import TextPrompt, load_prompts, render_prompt
from llmdpd_pl.errors import ConfigError, check_checkpoint
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.task_bank import TaskPrompts

FORMAT, FORMAT_VERSION = "llmdpd-policy", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
EMA = "ema_policy."
"""Key prefix of the EMA actor's tensors in ``model.safetensors``; the others are the module's own keys."""
EMA_CALLBACK = "ActorEMA"
"""The ``ActorEMA`` callback's state key in a checkpoint's ``callbacks``."""

#: A text prompt: structured (task / objective / constraints) or a plain string.
Text = TextPrompt | Mapping[str, str] | str
#: A trajectory prompt: states (L, S) and actions (L, A), or P of each stacked, (P, L, S) and (P, L, A).
Trajectory = tuple[Any, Any]


def exported_state(module: LLMDPDModule) -> dict[str, Tensor]:
    """What acting reads, as ``model.safetensors`` holds it: the EMA actor with its prompt encoders
    (``ema_policy.*``), the task bank's buffers (``task_bank.*``) and, with ``q_softmax``, the target critics
    and the online prompt encoders whose z conditions them (``critic_target.*``, ``policy.text_head.*``,
    ``policy.traj_encoder.*``; see :func:`llmdpd_pl.acting.task_conditioning`)."""
    keep: tuple[str, ...] = ("task_bank.",)
    if module.hparams["action_selection"] == "q_softmax":
        keep += ("critic_target.", "policy.text_head.", "policy.traj_encoder.")
    state = {EMA + k: v for k, v in module.ema_policy.state_dict().items()}
    state |= {k: v for k, v in module.state_dict().items() if k.startswith(keep) and isinstance(v, Tensor)}
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def init_args(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The ``LLMDPDModule`` arguments among a checkpoint's hyperparameters (LightningCLI adds keys)."""
    names = inspect.signature(LLMDPDModule).parameters
    return {k: v for k, v in hparams.items() if k in names}


def checkpoint_module(
    path: str | Path, compile: bool = False, key: str = "path"
) -> tuple[LLMDPDModule, dict[str, Any]]:
    """The module of a Lightning checkpoint with its EMA actor attached, and the loaded checkpoint."""
    check_checkpoint(key, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= ckpt.keys():
        raise ConfigError(key, "not a Lightning checkpoint of LLMDPDModule (no state_dict or "
                          "hyper_parameters)", Path(path))  # fmt: skip
    try:
        module = LLMDPDModule(**{**init_args(ckpt["hyper_parameters"]), "compile": compile})
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as err:
        problem = f"not a checkpoint of this LLMDPDModule ({type(err).__name__})"
        raise ConfigError(key, problem, Path(path)) from None
    module.on_load_checkpoint(ckpt)
    ema = ckpt.get("callbacks", {}).get(EMA_CALLBACK)
    if ema:  # an AveragedModel's state: module.<policy key>, n_averaged
        policy = copy.deepcopy(module.policy)
        policy.load_state_dict({k[7:]: v for k, v in ema.items() if k.startswith("module.")})
        module.attach_ema(policy)
    return module, ckpt


def folder_module(path: str | Path, compile: bool = False, key: str = "path") -> LLMDPDModule:
    """The module of an exported folder: the tensors of :func:`exported_state`, and nothing else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / WEIGHTS)
    except (OSError, ValueError, SafetensorError) as err:
        raise ConfigError(key, f"not an llmdpd export: cannot read its {CONFIG} and {WEIGHTS} "
                          f"({type(err).__name__})", folder) from None  # fmt: skip
    version = (config.get("format"), config.get("format_version")) if isinstance(config, dict) else None
    if version != (FORMAT, FORMAT_VERSION):
        raise ConfigError(key, f"{CONFIG} is not format {FORMAT!r} version {FORMAT_VERSION}", folder)
    module = LLMDPDModule(**{**init_args(config["model"]), "compile": compile})
    ema = copy.deepcopy(module.policy)
    module.attach_ema(ema)
    if config["model"]["action_selection"] != "q_softmax":
        module.policy = ema  # the critics' z is unused: no online weights are exported
    if set(tensors) != set(exported_state(module)):
        raise ConfigError(key, f"{WEIGHTS} does not hold the tensors its {CONFIG} describes", folder)
    try:
        ema.load_state_dict({k.removeprefix(EMA): v for k, v in tensors.items() if k.startswith(EMA)})
        module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(EMA)}, strict=False)
    except RuntimeError as err:  # a tensor's shape differs from the config's architecture
        problem = f"{WEIGHTS} does not fit its {CONFIG} ({type(err).__name__})"
        raise ConfigError(key, problem, folder) from None
    module.task_bank.set_extra_state(config["task_bank"])  # load_state_dict saw no extra state
    return module


class Policy:
    """A trained LLMDPD policy: the EMA actor, its task bank and its action selection.

    Made by :func:`load_policy`. The module it wraps is in eval mode (its EMA actor as in ``llmdpd test``),
    without gradients.

    Args:
        module: The trained module, its EMA actor attached.
        cache_dir: The embedding cache of :meth:`add_task`'s texts (``data.cache_dir`` in training).
    """

    def __init__(self, module: LLMDPDModule, cache_dir: str | Path = "data/embeddings") -> None:
        self.module = module.eval().requires_grad_(False)
        # In train mode, as llmdpd test acts with it: ActorEMA's copy is no submodule, so test's eval() skips
        # it. Dropout is 0, so the mode changes only the attention kernel (≈1e-7), but changes it.
        module.ema_policy.train().requires_grad_(False)
        self.cache_dir = Path(cache_dir)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names this policy has prompts for (seen in training first)."""
        return self.module.task_bank.task_names

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def action_selection(self) -> str:
        """``sample`` (one reverse chain) or ``q_softmax`` (candidates scored by the target critics)."""
        return str(self.module.hparams["action_selection"])

    def to(self, device: str | torch.device) -> Policy:
        """Move the weights and the task bank to ``device``; returns this policy."""
        self.module.to(device)
        self.module.ema_policy.to(device)  # attached, not a submodule
        return self

    @overload
    def act(self, obs: Tensor, task: str, generator: torch.Generator | None = ..., prompt_index: int = ...
            ) -> Tensor: ...  # fmt: skip
    @overload
    def act(self, obs: np.ndarray, task: str, generator: torch.Generator | None = ..., prompt_index: int = ...
            ) -> np.ndarray: ...  # fmt: skip
    def act(
        self,
        obs: Tensor | np.ndarray,
        task: str,
        generator: torch.Generator | None = None,
        prompt_index: int = 0,
    ) -> Tensor | np.ndarray:
        """Actions for raw states of one task: (N, S) → (N, A) in [-1, 1], a tensor for a tensor, else numpy.

        ``generator`` (on :attr:`device`) draws the reverse chains and, with ``q_softmax``, the candidate
        picked: the same generator state gives the same actions. ``prompt_index`` picks the task's trajectory
        prompt (``llmdpd test --prompt_index``).
        """
        if task not in self.tasks:
            raise ConfigError("task", f"no prompts for it; this policy's tasks are {list(self.tasks)}, and "
                              "add_task adds one", task)  # fmt: skip
        self.module.task_bank.check_prompt_index(prompt_index)
        states = torch.as_tensor(obs, dtype=torch.float32, device=self.device)  # as module_policy converts
        if states.ndim != 2 or states.shape[1] != self.module.policy.spec.obs_dim:
            raise ConfigError("obs", f"must be raw states (N, {self.module.policy.spec.obs_dim})",
                              tuple(states.shape))  # fmt: skip
        tasks = self.module.task_bank.task_ids([task]).expand(len(states))  # (N,)
        actions = act(self.module, states, tasks, prompt_index, generator)  # (N, A)
        return actions if isinstance(obs, Tensor) else actions.cpu().numpy()

    def add_task(
        self,
        name: str,
        text: Text | None = None,
        trajectory: Trajectory | None = None,
        llm: LLMSpec | None = None,
    ) -> None:
        """Condition a new task ``name`` on a text prompt, a trajectory prompt, or both, as the policy's
        ``prompts`` mode needs (a prompt the mode does not read is ignored).

        Args:
            name: The new task's name, for :meth:`act`.
            text: A structured prompt (a ``TextPrompt``, or a mapping with task / objective / constraints) or
                a plain string. The LLM reads the policy's instruction and this text, embedded through
                :attr:`cache_dir` with the policy's LLM spec; the LLM is loaded only on a cache miss.
            trajectory: States (L, S) and actions (L, A), L steps every ``data.traj_prompt_stride`` as
                training cut its prompts, or P' of each stacked; prompt index p reads trajectory p mod P'.
            llm: The LLM spec; default: the one recorded in the checkpoint. Another LLM is refused.
        """
        bank, spec = self.module.task_bank, self.module.policy.spec
        if name in self.tasks:
            raise ConfigError("name", "is already a task of this policy", name)
        uses_text, uses_traj = spec.prompts in ("both", "text"), spec.prompts in ("both", "trajectory")
        for arg, given, needed in (("text", text, uses_text), ("trajectory", trajectory, uses_traj)):
            if needed and given is None:
                raise ConfigError(arg, f"this policy reads {arg} prompts (prompts={spec.prompts!r})", None)
        # What the mode does not read is zero.
        vector, rendered = torch.zeros(spec.text_embed_dim), None  # (E,)
        if uses_text and text is not None:
            vector, rendered = self._embed(name, text, llm)
        p, L = bank.n_prompts, spec.traj_prompt_len
        traj_obs, traj_act = torch.zeros(p, L, spec.obs_dim), torch.zeros(p, L, spec.act_dim)
        if uses_traj and trajectory is not None:
            traj_obs, traj_act = self._trajectory(trajectory)  # (P, L, S), (P, L, A)
        prompts = TaskPrompts(
            names=(*bank.task_names, name),
            text_embedding=torch.cat([bank.text_bank, vector[None].to(bank.text_bank)]),  # (T + 1, E)
            traj_obs=torch.cat([bank.traj_obs_bank, traj_obs[None].to(bank.traj_obs_bank)]),
            traj_act=torch.cat([bank.traj_act_bank, traj_act[None].to(bank.traj_act_bank)]),
            llm=bank.llm,
            texts=None if bank.texts is None else (*bank.texts, rendered or ""),
        )
        bank.fill(prompts, bank.obs_mean.clone(), bank.obs_std.clone(), bank.n_seen)

    def _embed(self, name: str, text: Text, llm: LLMSpec | None) -> tuple[Tensor, str]:
        """The LLM's (E,) embedding of ``text`` after the instruction, and that LLM input."""
        trained = self.module.task_bank.llm
        if llm is None and trained is None:
            raise ConfigError("llm", "the checkpoint records no LLM: pass the spec it was trained with", None)
        fields = inspect.signature(LLMSpec).parameters
        spec = llm or LLMSpec(**{k: v for k, v in (trained or {}).items() if k in fields})
        if trained is not None:
            try:
                check_same_llm(trained, llm_identity(spec))
            except ConfigError as err:  # named after add_task's argument, not the config key
                raise ConfigError("llm" + err.key.removeprefix("data.llm"), err.problem, err.value) from None
        if isinstance(text, str):
            rendered = f"{spec.instruction}\n\n{text}" if spec.instruction else text
        else:
            try:
                prompt = text if isinstance(text, TextPrompt) else load_prompts({name: dict(text)})[name]
            except ConfigError as err:
                raise ConfigError("text", err.problem, err.value) from None
            rendered = render_prompt(prompt, spec.instruction)
        vector = embed_texts({name: rendered}, spec, self.cache_dir)[0][name]  # (E,)
        if len(vector) != self.module.policy.spec.text_embed_dim:
            raise ConfigError("llm.model", f"embeds in {len(vector)} dimensions, the policy reads "
                              f"{self.module.policy.spec.text_embed_dim}", spec.model)  # fmt: skip
        return vector, rendered

    def _trajectory(self, trajectory: Trajectory) -> tuple[Tensor, Tensor]:
        """The P trajectory prompts of a new task: raw states (P, L, S) and actions (P, L, A)."""
        spec, p = self.module.policy.spec, self.module.task_bank.n_prompts
        L, S, A = spec.traj_prompt_len, spec.obs_dim, spec.act_dim
        try:
            states, actions = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in trajectory)
        except (TypeError, ValueError) as err:
            raise ConfigError("trajectory", "must be a pair (states, actions) of arrays", trajectory) from err
        states, actions = (x[None] if x.ndim == 2 else x for x in (states, actions))  # (P', L, ·)
        shapes = states.shape[1:] == (L, S) and actions.shape[1:] == (L, A)
        if not shapes or len(states) != len(actions) or not len(states):
            raise ConfigError("trajectory", f"must be states ({L}, {S}) and actions ({L}, {A}), or P of each "
                              "stacked", (tuple(states.shape), tuple(actions.shape)))  # fmt: skip
        if not (torch.isfinite(states).all() and torch.isfinite(actions).all()):
            raise ConfigError("trajectory", "must be finite", "NaN or inf")
        index = torch.arange(p) % len(states)  # prompt p reads trajectory p mod P'
        return states[index], actions[index]


def load_policy(path: str | Path, cache_dir: str | Path = "data/embeddings", compile: bool = False) -> Policy:
    """The trained policy of a Lightning checkpoint (``*.ckpt``) or of a folder written by ``llmdpd export``.

    Args:
        path: The checkpoint file or the exported folder.
        cache_dir: The embedding cache for :meth:`Policy.add_task`'s texts.
        compile: ``torch.compile`` the acting (as ``model.compile``; ``llmdpd test`` applies the config's).
    """
    if Path(path).is_dir():
        return Policy(folder_module(path, compile), cache_dir)
    return Policy(checkpoint_module(path, compile)[0], cache_dir)


__all__ = ["Policy", "exported_state", "load_policy"]
