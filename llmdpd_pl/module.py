"""``LLMDPDModule``: Diffusion-QL actor–critic over prompt-conditioned policy diffusion (paper Algorithm 1).

One training step is one *update* (manual optimization):

1. critic: a' ~ π_EMA(· | s', z) by the full reverse chain (no grad) → Eq. 6 on (Q1, Q2);
2. actor, h_ψ and g_φ: Eq. 5 + η · normalised Eq. 7 → Eq. 8 (the LLM is frozen and not in this module);
3. soft update of the target critics; 4. the :class:`~llmdpd_pl.callbacks.ema.ActorEMA` callback
   updates the EMA actor.

Lightning's ``global_step`` counts optimizer steps, two per update: ``trainer.max_steps = 2 × updates``.
The module keeps its own counter, :attr:`updates`, for everything keyed on updates (EMA, logging).

The critics see the task context as the *detached* prompt embeddings z of the online policy: in a
multi-task setting the same (s, a) has different values in different tasks, and detaching keeps the
prompt encoders trained by the actor loss only (Algorithm 1, line 12), as in the paper.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from llmdpd_pl.context import BANKS, TaskContext
from llmdpd_pl.data.batches import Batch
from llmdpd_pl.data.collect import derive_seed
from llmdpd_pl.losses import ActorLosses, CriticLosses
from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.objectives import actor_objective, critic_objective, scored_candidates
from llmdpd_pl.policy import PromptedPolicy, PromptMode


def clip_grad_norms(groups: Mapping[str, Iterable[nn.Parameter]], max_norm: float) -> dict[str, Tensor]:
    """Clip the joint gradient L2 norm of all groups to ``max_norm``; return each group's norm and the total.

    ``total = sqrt(Σ_g ||∇_g||²)``; every gradient is scaled by ``min(1, max_norm / (total + 1e-6))``.
    ``max_norm <= 0`` measures without clipping.

    On the CPU, where reading the factor needs no device sync, a factor of exactly 1 skips the multiply
    (x · 1 = x, so the gradients are the same): the actor's 1.1M gradients are almost never clipped, and
    multiplying them by 1 cost 2.5–4% of an update (``benchmarks/NOTES.md``, sixth session).
    """
    norms: dict[str, Tensor] = {}
    grads: list[Tensor] = []
    for name, params in groups.items():
        g = [p.grad for p in params if p.grad is not None]
        if g:
            norms[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
            grads += g
    total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if scale.device.type != "cpu" or scale.item() != 1.0:  # NaN != 1: a NaN total still spreads
            torch._foreach_mul_(grads, scale)
    return {**norms, "total": total}


class UpdateStats(NamedTuple):
    """What one update measured: its losses, the gradient norms before clipping and the sampled a⁰ (B, A)."""

    critic: CriticLosses
    actor: ActorLosses
    critic_norms: dict[str, Tensor]
    actor_norms: dict[str, Tensor]
    actions: Tensor


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
        compile: ``torch.compile`` the update's prompt encoding and its two objectives
            (:mod:`llmdpd_pl.objectives`), each as one graph, forward and backward, and the reverse chain
            of acting; the weights and checkpoints are unchanged.
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
    ) -> None:
        super().__init__()
        for name, value, lo, hi in (("gamma", gamma, 0.0, 1.0), ("tau", tau, 0.0, 1.0)):
            if not lo <= value <= hi:
                raise ValueError(f"model.{name} must be in [{lo}, {hi}], got {value}")
        if eta < 0:
            raise ValueError(f"model.eta must be >= 0, got {eta}")
        if n_backup_samples < 1 or n_action_candidates < 1:
            raise ValueError(
                f"model.n_backup_samples and model.n_action_candidates must be >= 1, "
                f"got {n_backup_samples} and {n_action_candidates}"
            )
        self.save_hyperparameters(
            ignore=["actor_optimizer", "critic_optimizer", "actor_lr_scheduler", "critic_lr_scheduler"]
        )
        self.automatic_optimization = False
        self.policy = PromptedPolicy(
            obs_dim,
            act_dim,
            text_embed_dim,
            traj_prompt_len,
            prompts,
            prompt_dim,
            n_diffusion_steps,
            beta_schedule,
            hidden_dim,
            traj_d_model,
            traj_layers,
            traj_heads,
        )
        self.critic = TwinCritic(obs_dim, act_dim, self.policy.cond_dim, hidden_dim)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self._optimizer_factories = (
            actor_optimizer,
            critic_optimizer,
            actor_lr_scheduler,
            critic_lr_scheduler,
        )
        # Filled from the datamodule in setup() (or by context.fill) and saved with the weights.
        self.context = TaskContext(obs_dim, act_dim, text_embed_dim, traj_prompt_len, text_source, text_seed)
        self.updates = 0
        self._ema: tuple[PromptedPolicy, ...] = ()
        self._ema_z_table: tuple[tuple[Tensor, ...], tuple[int, ...], Tensor] | None = None
        self._encode_prompts, self._sample = PromptedPolicy.encode_prompts, PromptedPolicy.sample
        self._scored_candidates = scored_candidates
        self._critic_objective, self._actor_objective = critic_objective, actor_objective

    # ------------------------------------------------------------------ task context
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "task_prompts", None) is not None:
            self.context.fill(dm.task_prompts, dm.obs_mean, dm.obs_std, len(dm.seen_tasks))

    def configure_model(self) -> None:
        if self.hparams["compile"]:
            self._encode_prompts = torch.compile(PromptedPolicy.encode_prompts)
            self._sample = torch.compile(PromptedPolicy.sample)  # acting
            self._scored_candidates = torch.compile(scored_candidates)
            self._critic_objective = torch.compile(critic_objective)
            self._actor_objective = torch.compile(actor_objective)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in BANKS:  # checkpoints from before the context was a submodule held its buffers here
            if prefix + name in state_dict:
                state_dict[f"{prefix}context.{name}"] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["llmdpd"] = {
            "updates": self.updates,
            "task_names": list(self.context.task_names),
            "n_seen": self.context.n_seen,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("llmdpd", {})
        self.updates = int(extra.get("updates", 0))
        self.context.task_names = tuple(extra.get("task_names", self.context.task_names))
        self.context.n_seen = int(extra.get("n_seen", self.context.n_seen))

    # ------------------------------------------------------------------ EMA interface
    def attach_ema(self, policy: PromptedPolicy) -> None:
        """Called by :class:`ActorEMA`: the EMA policy used for Q targets and evaluation."""
        self._ema = (policy,)

    @property
    def ema_policy(self) -> PromptedPolicy:
        """The EMA actor if an :class:`ActorEMA` callback is attached, else the online actor."""
        return self._ema[0] if self._ema else self.policy

    # ------------------------------------------------------------------ building blocks
    def prompt_context(self, policy: PromptedPolicy, tasks: Tensor, prompt_index: Tensor) -> Tensor:
        """z for the given tasks, each with its trajectory prompt ``prompt_index``: (T,), (T,) → (T, C).

        Compiled with ``compile``; differentiable in ``policy``'s prompt encoders unless under no_grad.
        """
        return self._encode_prompts(policy, *self.context.prompts(tasks, prompt_index))

    @torch.no_grad()
    def ema_prompt_embeddings(self, prompt_index: Tensor) -> Tensor:
        """The EMA actor's z of seen task t with trajectory prompt ``prompt_index[t]``: (T,) → (T, C).

        The EMA's weights change only when :class:`ActorEMA` writes them (every ``every`` updates once it
        averages), not at every update as the online policy's do. So the z of every prompt of every seen
        task is computed at once after a write, and gathered until the next one. Writes are detected by
        the in-place version counters of the EMA's weights and of the prompt banks, so any change to
        them (an EMA write, a checkpoint load, new task context) recomputes the table.
        """
        ema = self.ema_policy
        watched = (*ema.parameters(), *self.context.buffers())
        versions = tuple(t._version for t in watched)
        table = self._ema_z_table
        if (
            table is None
            or table[1] != versions  # equal versions: same length, so zip(strict=True) is safe below
            or any(a is not b for a, b in zip(table[0], watched, strict=True))
        ):
            n = self._n_train_prompts()
            tasks = torch.arange(self.context.n_seen, device=self.device).repeat_interleave(n)  # (T·n,)
            index = torch.arange(n, device=self.device).repeat(self.context.n_seen)  # (T·n,)
            z = self.prompt_context(ema, tasks, index).view(self.context.n_seen, n, -1)
            table = self._ema_z_table = (watched, versions, z)  # z: (T, n, C)
        return table[2][torch.arange(self.context.n_seen, device=self.device), prompt_index]  # (T, C)

    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        return gen.manual_seed(derive_seed(self.hparams["seed"], self.global_rank, self.updates))

    # ------------------------------------------------------------------ training
    def critic_losses(
        self, batch: Batch, obs: Tensor, next_obs: Tensor, z: Tensor, ema_z: Tensor, gen: torch.Generator
    ) -> CriticLosses:
        """Eq. 6 with a' from the EMA actor's full reverse chain (:func:`critic_objective`).

        z: the online policy's embedding of the update's prompt of each seen task, (T, C), shared with the
        actor step; ema_z: the EMA actor's (:meth:`ema_prompt_embeddings`), (T, C).
        """
        n = self.hparams["n_backup_samples"] if self.hparams["max_q_backup"] else 1
        noise = self.policy.diffusion.chain_noise((len(obs) * n, batch.action.shape[1]), gen, self.device)
        return self._critic_objective(
            self.critic,
            self.critic_target,
            self.ema_policy,
            z,
            ema_z,
            batch.task_id,
            obs,
            batch.action,
            batch.reward,
            batch.not_done,
            next_obs,
            noise,
            self.hparams["gamma"],
        )

    def actor_losses(
        self, batch: Batch, obs: Tensor, z: Tensor, gen: torch.Generator
    ) -> tuple[ActorLosses, Tensor]:
        """Eq. 5 + η · normalised Eq. 7 = Eq. 8 (:func:`actor_objective`), and the sampled a⁰ (B, A).

        z: the online policy's prompt embeddings of the seen tasks, (T, C), with gradient to ψ and φ.
        """
        a_k, k, eps = self.policy.diffusion.loss_inputs(batch.action, gen)
        chain_noise = self.policy.diffusion.chain_noise(tuple(batch.action.shape), gen, self.device)
        pick_first = torch.rand((), generator=gen, device=self.device) < 0.5
        return self._actor_objective(
            self.policy,
            self.critic,
            z,
            batch.task_id,
            obs,
            a_k,
            k,
            eps,
            chain_noise,
            self.hparams["eta"],
            pick_first,
        )

    def _n_train_prompts(self) -> int:
        """Trajectory prompts per seen task that training draws from: all, or the first only."""
        return 1 if self.hparams["train_prompt"] == "first" else self.context.n_prompts

    def _train_prompt_index(self, gen: torch.Generator) -> Tensor:
        n_prompts = self._n_train_prompts()
        if n_prompts == 1:
            return torch.zeros(self.context.n_seen, dtype=torch.long, device=self.device)
        return torch.randint(n_prompts, (self.context.n_seen,), generator=gen, device=self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        if self.context.n_seen == 0:
            raise RuntimeError(
                "no task context: fit with PromptedOfflineDataModule, or call module.context.fill()"
            )
        critic_opt, actor_opt = self.optimizers()  # type: ignore[misc]
        stats = self.update(batch, critic_opt, actor_opt, self.manual_backward)
        for scheduler in self.lr_schedulers() or []:  # type: ignore[union-attr]
            scheduler.step()
        # Lightning's per-call logging overhead is ~1 ms per value on CPU (20% of an update when
        # logging every update): log only on the updates whose metrics reach the loggers.
        if self.trainer._logger_connector.should_update_logs:
            self._log_update(stats)

    def update(
        self,
        batch: Batch,
        critic_opt: torch.optim.Optimizer,
        actor_opt: torch.optim.Optimizer,
        backward: Callable[[Tensor], Any],
    ) -> UpdateStats:
        """One update (module docstring, steps 1–3) with these optimizers; no Lightning state is touched.

        ``backward(loss)`` runs a loss's backward pass (``training_step`` passes ``manual_backward``), so
        the same update runs in plain loops, e.g. ``benchmarks/ab_blocks.py``'s.
        """
        gen = self._generator()
        obs, next_obs = self.context.normalize(batch.obs), self.context.normalize(batch.next_obs)  # (B, S)
        seen = torch.arange(self.context.n_seen, device=self.device)
        prompt_index = self._train_prompt_index(gen)  # (T,), one trajectory prompt per seen task
        # Encoded once: the critics read z detached, the actor step backpropagates through it.
        z = self.prompt_context(self.policy, seen, prompt_index)  # (T, C)
        ema_z = self.ema_prompt_embeddings(prompt_index) if self._ema else z.detach()  # (T, C)

        # 1. Critic step (Eq. 6).
        c = self.critic_losses(batch, obs, next_obs, z, ema_z, gen)
        critic_opt.zero_grad(set_to_none=True)
        backward(c.loss)
        c_norms = clip_grad_norms({"critic": self.critic.parameters()}, self.hparams["grad_clip"])
        critic_opt.step()

        # 2. Actor + prompt-encoder step (Eq. 8). The critic is frozen so no gradient lands in it.
        self.critic.requires_grad_(False)
        a, a_new = self.actor_losses(batch, obs, z, gen)
        actor_opt.zero_grad(set_to_none=True)
        backward(a.loss)
        self.critic.requires_grad_(True)
        groups = {"denoiser": self.policy.denoiser.parameters()}
        if self.policy.text_head is not None:
            groups["text_head"] = self.policy.text_head.parameters()
        if self.policy.traj_encoder is not None:
            groups["traj_encoder"] = self.policy.traj_encoder.parameters()
        a_norms = clip_grad_norms(groups, self.hparams["grad_clip"])
        actor_opt.step()

        # 3. Target critics: φ' ← (1 − τ) φ' + τ φ.
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.critic_target.parameters()), list(self.critic.parameters()), self.hparams["tau"]
            )
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

    def configure_optimizers(self) -> Any:
        actor_opt_fn, critic_opt_fn, actor_sched_fn, critic_sched_fn = self._optimizer_factories
        critic_opt = critic_opt_fn(self.critic.parameters())
        actor_opt = actor_opt_fn(self.policy.parameters())
        schedulers = [
            fn(opt) for fn, opt in ((critic_sched_fn, critic_opt), (actor_sched_fn, actor_opt)) if fn
        ]
        return [critic_opt, actor_opt], schedulers

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the ``RolloutEvaluation`` callback runs the episodes at the epoch's end."""

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def task_conditioning(self, tasks: Tensor, prompt_index: int = 0) -> tuple[Tensor, Tensor]:
        """z of the EMA actor and of the online policy (the critics' context) for tasks (T,) → (T, C) each.

        Prompts are fixed during an evaluation, so callers compute this once per task, not per step.
        """
        p = torch.full_like(tasks, prompt_index)
        return self.prompt_context(self.ema_policy, tasks, p), self.prompt_context(self.policy, tasks, p)

    @torch.no_grad()
    def act_conditioned(
        self, obs: Tensor, cond: Tensor, critic_cond: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Actions for raw states with given conditioning: (N, S), (N, C), (N, C) → (N, A) in [-1, 1].

        ``action_selection='q_softmax'`` draws ``n_action_candidates`` per state and picks one with
        probability softmax(min(Q1', Q2')) (Diffusion-QL's evaluation); ``sample`` draws one.
        """
        obs_n = self.context.normalize(obs)  # (N, S)
        diffusion, act_dim = self.ema_policy.diffusion, self.hparams["act_dim"]
        if self.hparams["action_selection"] == "sample":
            noise = diffusion.chain_noise((len(obs), act_dim), generator, obs.device)
            return self._sample(self.ema_policy, obs_n, cond, noise)
        n = self.hparams["n_action_candidates"]
        noise = diffusion.chain_noise((len(obs) * n, act_dim), generator, obs.device)
        cand, q1, q2 = self._scored_candidates(
            self.ema_policy, self.critic_target, obs_n, cond, critic_cond, noise
        )  # (N·n, A), (N, n), (N, n)
        q = torch.minimum(q1, q2)  # (N, n)
        pick = torch.multinomial(torch.softmax(q, dim=1), 1, generator=generator).squeeze(1)  # (N,)
        return cand.view(-1, n, cand.shape[-1])[torch.arange(len(pick), device=pick.device), pick]

    @torch.no_grad()
    def act(
        self, obs: Tensor, task_index: Tensor, prompt_index: int = 0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Actions for raw states of given tasks with the EMA actor: (N, S), (N,) → (N, A) in [-1, 1]."""
        tasks, inverse = torch.unique(task_index, return_inverse=True)
        cond, critic_cond = self.task_conditioning(tasks, prompt_index)
        return self.act_conditioned(obs, cond[inverse], critic_cond[inverse], generator)
