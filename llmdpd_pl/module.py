"""``LLMDPDModule``: Diffusion-QL actor–critic over prompt-conditioned policy diffusion (paper Algorithm 1).

One training step is one *update* (manual optimization), :meth:`LLMDPDModule.update`:

1. critic: a' ~ π_EMA(· | s', z) by the full reverse chain (no grad) → Eq. 6 on (Q1, Q2);
2. actor, h_ψ and g_φ: Eq. 5 + η · normalised Eq. 7 → Eq. 8 (the LLM is frozen and not in this module);
3. soft update of the target critics; then the :class:`~llmdpd_pl.callbacks.ema.ActorEMA` callback
   updates the EMA actor.

Lightning's ``global_step`` counts optimizer steps, two per update: ``trainer.max_steps = 2 × updates``.
The module keeps its own counter, :attr:`updates`, for everything keyed on updates (EMA, logging). The
math is in :mod:`llmdpd_pl.objectives`; acting is the policy's (``PromptedPolicy.select_action``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from llmdpd_pl.averaging import soft_update
from llmdpd_pl.data.batches import Batch
from llmdpd_pl.errors import ConfigError, at_least, within
from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.objectives import UpdateStats, actor_objective, critic_objective, draw
from llmdpd_pl.policy import PolicySpec, PromptedPolicy, PromptMode, check_levers
from llmdpd_pl.task_bank import TaskBank
from llmdpd_pl.utils import clip_grad_norms, derive_seed, maybe_compiled

#: PolicySpec fields of the levers that add parameters, → the ``model`` key whose being > 0 switches them on.
#: The ``model`` keys that shape the network (the other fields, the task bank's text source) are fixed.
SWITCHED_BY = {"null_prompt": "prompt_dropout", "align_encoder": "align_weight"}
SPEC_KEYS = frozenset(f.name for f in fields(PolicySpec)) - SWITCHED_BY.keys()
ARCHITECTURE_KEYS = SPEC_KEYS | {"text_source", "text_seed"}


class LLMDPDModule(L.LightningModule):
    """LLM-Driven Policy Diffusion.

    Args:
        obs_dim: S (linked from the datamodule).
        act_dim: A (linked from the datamodule).
        text_embed_dim: E, the frozen LLM's width (linked from the datamodule).
        traj_prompt_len: L, trajectory-prompt length (linked from the datamodule).
        prompts: Which prompts condition the policy: ``both`` (LLMDPD), ``text``, ``trajectory`` or
            ``none`` (paper Table 3 ablations).
        text_source: ``llm`` uses the LLM embedding; ``random`` replaces it with a fixed random vector
            per task of the same dimension and norm (a control the paper lacks).
        text_seed: Seed of the ``random`` text vectors.
        prompt_dim: Width of z_text and of z_traj.
        n_diffusion_steps: K (Diffusion-QL: 5).
        beta_schedule: ``vp`` (Diffusion-QL) or ``linear``.
        hidden_dim: Width of the denoiser and critic MLPs (256).
        traj_d_model: Width of the trajectory transformer.
        traj_layers: Layers of the trajectory transformer.
        traj_heads: Heads of the trajectory transformer.
        gamma: Discount γ.
        tau: Target-critic soft-update rate τ.
        eta: λ of Eq. 8 (η in Diffusion-QL): weight of the normalised Q term.
        max_q_backup: Use the max over ``n_backup_samples`` next actions per head in the target.
        n_backup_samples: Candidate next actions for ``max_q_backup``.
        grad_clip: Max joint gradient L2 norm, per optimizer (0 disables).
        train_prompt: Trajectory prompt used in training: the ``first`` prompt episode of each task,
            or a ``random`` one per task and update.
        action_selection: At evaluation, ``sample`` one reverse chain, or ``q_softmax``: draw
            ``n_action_candidates`` and pick one by softmax over Q (Diffusion-QL).
        n_action_candidates: Candidates for ``q_softmax``.
        actor_optimizer: Optimizer of θ, ψ, φ.
        critic_optimizer: Optimizer of the twin critics.
        actor_lr_scheduler: Optional scheduler, stepped once per update.
        critic_lr_scheduler: Optional scheduler, stepped once per update.
        seed: Seed of the per-update noise (each update draws from (seed, rank, update)).
        compile: ``torch.compile`` the update's prompt encoding and its two objectives, each as one graph,
            forward and backward, and the reverse chain of acting; the weights and checkpoints are unchanged.
        conditioning: Lever: ``film`` modulates every denoiser layer by z; ``concat`` (the paper) does not.
        prompt_dropout: Lever: Eq. 5 drops each row's prompt with this probability, for ``guidance``.
        guidance: Classifier-free guidance weight w at acting (1: off; needs ``prompt_dropout`` > 0).
        align_weight: Lever: weight of the text–trajectory InfoNCE loss in the actor loss (0: off).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        text_embed_dim: int,
        traj_prompt_len: int,
        prompts: PromptMode = "both",
        text_source: Literal["llm", "random"] = "llm",
        text_seed: int = 0,
        prompt_dim: int = 64,
        n_diffusion_steps: int = 5,
        beta_schedule: Literal["vp", "linear"] = "vp",
        hidden_dim: int = 256,
        traj_d_model: int = 128,
        traj_layers: int = 2,
        traj_heads: int = 2,
        gamma: float = 0.99,
        tau: float = 0.005,
        eta: float = 1.0,
        max_q_backup: bool = False,
        n_backup_samples: int = 10,
        grad_clip: float = 4.0,
        train_prompt: Literal["first", "random"] = "random",
        action_selection: Literal["sample", "q_softmax"] = "q_softmax",
        n_action_candidates: int = 50,
        actor_optimizer: OptimizerCallable = torch.optim.Adam,
        critic_optimizer: OptimizerCallable = torch.optim.Adam,
        actor_lr_scheduler: LRSchedulerCallable | None = None,
        critic_lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        compile: bool = False,
        conditioning: Literal["concat", "film"] = "concat",
        prompt_dropout: float = 0.0,
        guidance: float = 1.0,
        align_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["actor_optimizer", "critic_optimizer", "actor_lr_scheduler", "critic_lr_scheduler"]
        )
        within("model.gamma", gamma, 0.0, 1.0)
        within("model.tau", tau, 0.0, 1.0)
        for name in ("eta", "n_backup_samples", "n_action_candidates", "prompt_dim", "n_diffusion_steps",
                     "hidden_dim", "traj_d_model", "traj_layers", "traj_heads"):  # fmt: skip
            at_least(f"model.{name}", self.hparams[name], 0 if name == "eta" else 1)
        if traj_d_model % traj_heads:
            raise ConfigError("model.traj_heads", f"must divide traj_d_model ({traj_d_model})", traj_heads)
        check_levers(prompts, conditioning, prompt_dropout, guidance, align_weight)
        self.automatic_optimization = False
        switched = {field: self.hparams[key] > 0 for field, key in SWITCHED_BY.items()}
        spec = PolicySpec(**{k: self.hparams[k] for k in SPEC_KEYS}, **switched)
        self.policy = PromptedPolicy(spec, compile)
        self.critic = TwinCritic(obs_dim, act_dim, self.policy.cond_dim, hidden_dim)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self._optimizer_factories = actor_optimizer, critic_optimizer, actor_lr_scheduler, critic_lr_scheduler
        self.task_bank = TaskBank(obs_dim, act_dim, text_embed_dim, traj_prompt_len, text_source, text_seed)
        self.updates = 0
        self._ema: tuple[PromptedPolicy, ...] = ()
        self._ema_z: Tensor | None = None  # (T, n, C): the EMA's z of every training prompt, until it changes
        self._ema_z_bank = -1  # the task bank's version that _ema_z was computed from

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Fit: fill the task bank (saved with the weights) from the datamodule. ``llmdpd test`` fills it
        after the checkpoint is restored (``RolloutEvaluation``)."""
        dm = self.trainer.datamodule
        if stage == "fit" and not self._ema:  # ActorEMA attaches itself in its setup, which runs first
            rank_zero_warn("fitting without the ActorEMA callback: Q-targets come from the online actor")
        if stage == "fit" and getattr(dm, "task_prompts", None) is not None:
            self.task_bank.fill(dm.task_prompts, dm.obs_mean, dm.obs_std, len(dm.seen_tasks))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["llmdpd"] = {"updates": self.updates}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.updates = int(checkpoint.get("llmdpd", {}).get("updates", 0))

    def configure_optimizers(self) -> Any:
        actor_opt_fn, critic_opt_fn, actor_sched_fn, critic_sched_fn = self._optimizer_factories
        critic_opt = critic_opt_fn(self.critic.parameters())
        actor_opt = actor_opt_fn(self.policy.parameters())
        pairs = ((critic_sched_fn, critic_opt), (actor_sched_fn, actor_opt))
        schedulers = [fn(opt) for fn, opt in pairs if fn]
        return [critic_opt, actor_opt], schedulers

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        if self.task_bank.n_seen == 0:
            raise RuntimeError("no tasks: fit with PromptedOfflineDataModule or call module.task_bank.fill()")
        critic_opt, actor_opt = self.optimizers()  # type: ignore[misc]
        stats = self.update(batch, critic_opt, actor_opt, self.manual_backward)
        for scheduler in self.lr_schedulers() or []:  # type: ignore[union-attr]
            scheduler.step()
        # Lightning's per-call logging overhead is ~1 ms per value on CPU: log only on the updates whose
        # metrics reach the loggers (batch i is logged when (i + 1) % log_every_n_steps == 0).
        every = self.trainer.log_every_n_steps
        if every and self.updates % every == 0:
            self._log_update(stats)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the ``RolloutEvaluation`` callback runs the episodes at the epoch's end."""

    # ------------------------------------------------------------------ EMA
    def attach_ema(self, policy: PromptedPolicy) -> None:
        """Called by :class:`ActorEMA`: the EMA policy used for Q targets and evaluation."""
        self._ema, self._ema_z = (policy,), None

    def ema_updated(self) -> None:
        """Called by :class:`ActorEMA` whenever it writes the EMA policy's weights."""
        self._ema_z = None

    @property
    def ema_policy(self) -> PromptedPolicy:
        """The EMA actor if an :class:`ActorEMA` callback is attached, else the online actor."""
        return self._ema[0] if self._ema else self.policy

    # ------------------------------------------------------------------ prompts
    def encode_prompts(
        self, policy: PromptedPolicy, tasks: Tensor, prompt_index: Tensor, traj_tasks: Tensor | None = None
    ) -> Tensor:
        """``policy``'s z of tasks (T,), each with its trajectory prompt ``prompt_index`` (T,): → (T, C).

        ``traj_tasks`` (T,) takes the trajectory prompts from other tasks. Compiled with ``compile``;
        differentiable in ``policy``'s prompt encoders unless under no_grad.
        """
        encode = maybe_compiled(PromptedPolicy.encode_prompts, self.hparams["compile"])
        return encode(policy, *self.task_bank.prompts(tasks, prompt_index, traj_tasks))

    @torch.no_grad()
    def ema_prompt_embeddings(self, prompt_index: Tensor) -> Tensor:
        """The EMA actor's z of seen task t with trajectory prompt ``prompt_index[t]``: (T,) → (T, C). Every
        training prompt's z is computed once after each EMA write (:meth:`ema_updated`) or change of the
        task bank, and gathered until the next one."""
        seen = torch.arange(self.task_bank.n_seen, device=self.device)
        if self._ema_z is None or self._ema_z_bank != self.task_bank.version:
            n = self._n_train_prompts()
            index = torch.arange(n, device=self.device).repeat(len(seen))  # (T·n,)
            z = self.encode_prompts(self.ema_policy, seen.repeat_interleave(n), index)
            self._ema_z, self._ema_z_bank = z.view(len(seen), n, -1), self.task_bank.version  # (T, n, C)
        return self._ema_z[seen, prompt_index]

    def _n_train_prompts(self) -> int:
        """Trajectory prompts per seen task that training draws from: all, or the first only."""
        return 1 if self.hparams["train_prompt"] == "first" else self.task_bank.n_prompts

    # ------------------------------------------------------------------ the update
    def update(
        self,
        batch: Batch,
        critic_opt: torch.optim.Optimizer,
        actor_opt: torch.optim.Optimizer,
        backward: Callable[[Tensor], Any],
    ) -> UpdateStats:
        """One update (module docstring, steps 1–3) with these optimizers; no Lightning state is touched.

        ``backward(loss)`` runs a loss's backward pass (``training_step`` passes ``manual_backward``), so
        the same update runs in plain loops, e.g. ``benchmarks/train_step.py``'s.
        """
        hp, bank, compile_ = self.hparams, self.task_bank, self.hparams["compile"]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(hp["seed"], self.global_rank, self.updates))
        batch = replace(batch, obs=bank.normalize(batch.obs), next_obs=bank.normalize(batch.next_obs))
        seen, n = torch.arange(bank.n_seen, device=self.device), self._n_train_prompts()
        prompt_index = (  # (T,), one trajectory prompt per seen task; a single prompt draws nothing
            torch.randint(n, seen.shape, generator=gen, device=seen.device) if n > 1 else seen * 0
        )
        n_backup = hp["n_backup_samples"] if hp["max_q_backup"] else 1
        draws = draw(self.policy.diffusion, batch.action, n_backup, gen, hp["prompt_dropout"])
        # Encoded once: the critics read z detached, the actor step backpropagates through it.
        z = self.encode_prompts(self.policy, seen, prompt_index)  # (T, C)
        pair = self.policy.prompt_pair(*bank.prompts(seen, prompt_index)) if hp["align_weight"] else None
        ema_z = self.ema_prompt_embeddings(prompt_index) if self._ema else z.detach()  # (T, C)

        # 1. Critic step (Eq. 6).
        c = maybe_compiled(critic_objective, compile_)(
            self.critic, self.critic_target, self.ema_policy, batch, z, ema_z, draws, hp["gamma"]
        )
        critic_opt.zero_grad(set_to_none=True)
        backward(c.loss)
        c_norms = clip_grad_norms({"critic": self.critic.parameters()}, hp["grad_clip"])
        critic_opt.step()

        # 2. Actor + prompt-encoder step (Eq. 8). The critic is frozen so no gradient lands in it.
        self.critic.requires_grad_(False)
        actor = maybe_compiled(actor_objective, compile_)
        a, a_new = actor(self.policy, self.critic, batch, z, draws, hp["eta"], pair, hp["align_weight"])
        actor_opt.zero_grad(set_to_none=True)
        backward(a.loss)
        self.critic.requires_grad_(True)
        a_norms = clip_grad_norms(self.policy.parameter_groups(), hp["grad_clip"])
        actor_opt.step()

        # 3. Target critics: φ' ← (1 − τ) φ' + τ φ.
        soft_update(self.critic_target.parameters(), self.critic.parameters(), hp["tau"])
        self.updates += 1
        return UpdateStats(c, a, c_norms, a_norms, a_new)

    def _log_update(self, s: UpdateStats) -> None:
        """Log one update's losses, Q statistics, gradient norms and action statistics."""
        self.log_dict(
            {
                **s.critic.as_dict("train/critic/"),
                **s.actor.as_dict("train/actor/"),
                **{f"grad_norm/{k}": v for k, v in s.actor_norms.items() if k != "total"},
                "grad_norm/critic": s.critic_norms["critic"],
                "train/action/abs_mean": s.actions.abs().mean(),
                "train/action/std": s.actions.std(),
                "train/action/at_bound": (s.actions.abs() > 0.999).float().mean(),
                "train/updates": float(self.updates),
            },
            on_step=True,
            on_epoch=False,
        )
        self.log("train/bc_loss", s.actor.bc_loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
