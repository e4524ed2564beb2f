"""A/B test of implementation variants of ``q_softmax`` acting (``scored_candidates``), in paired blocks.

    python benchmarks/ab_acting.py VARIANT [VARIANT ...] [--states 10] [--candidates 10] [--config ...]

Times the compiled call that scores n candidate actions per state for N states: the policy's reverse
chain, then both target-critic heads (``llmdpd_pl.objectives.scored_candidates``), at the config's model
shapes with the config's ``compile``. ``--states`` is the number of envs stepped together (``rollout.py``'s
``--num-envs``), ``--candidates`` the config's ``n_action_candidates`` unless given. Each variant's block
of ``--calls`` calls runs next to one of the current code's, in turn first, so that both see the same
machine (``ab_blocks.py`` explains why). Reports each variant's median ms per call, its median paired
time ratio against the current code (> 1: the variant is slower) and the FLOPs per call; writes JSON.

Variants (the code before an optimisation, kept to measure it):
``repeated_critic_context`` (the twin critic on every candidate row, its state-and-prompt part computed
n times per state, as before the ninth session); ``critic_baddbmm`` (the critics' split first layer with
the context as ``baddbmm``'s addend, which the compiled graph must write out repeated, instead of a
product and an add).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from report import report
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from train_step import build

from llmdpd_pl.networks import TwinCritic
from llmdpd_pl.objectives import scored_candidates
from llmdpd_pl.policy import PromptedPolicy

Scorer = Callable[[PromptedPolicy, TwinCritic, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _candidates(policy: PromptedPolicy, obs: Tensor, cond: Tensor, noise: Tensor) -> tuple[int, Tensor]:
    """The part every variant shares: n, and the n candidates per state (N·n, A) from the reverse chain."""
    n = noise.shape[1] // obs.shape[0]
    context = policy.context(obs, cond).repeat_interleave(n, 0)  # (N·n, H)
    return n, policy.sample_from_context(context, noise)


def _repeated_critic_context(
    policy: PromptedPolicy, critic: TwinCritic, obs: Tensor, cond: Tensor, critic_cond: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    n, cand = _candidates(policy, obs, cond, noise)
    q1, q2 = critic(obs.repeat_interleave(n, 0), cand, critic_cond.repeat_interleave(n, 0))  # (N·n,)
    return cand, q1.view(-1, n), q2.view(-1, n)


def _critic_baddbmm(
    policy: PromptedPolicy, critic: TwinCritic, obs: Tensor, cond: Tensor, critic_cond: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    n, cand = _candidates(policy, obs, cond, noise)
    critic_context = critic.context(obs, critic_cond).repeat_interleave(n, 1)  # (2, N·n, H)
    w_a = critic.first_layer.weight[..., critic.obs_dim : critic.obs_dim + critic.act_dim]  # (2, H, A)
    q1, q2 = critic._heads(torch.baddbmm(critic_context, critic._per_head(cand), w_a.transpose(1, 2)))
    return cand, q1.view(-1, n), q2.view(-1, n)


VARIANTS: dict[str, Scorer] = {
    "repeated_critic_context": _repeated_critic_context,
    "critic_baddbmm": _critic_baddbmm,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=tuple(VARIANTS))
    p.add_argument("--config", type=Path, default=Path("configs/metaworld_cpu.yaml"))
    p.add_argument("--states", type=int, default=10, help="states scored per call (envs stepped together)")
    p.add_argument("--candidates", type=int, default=None, help="default: the config's n_action_candidates")
    p.add_argument("--blocks", type=int, default=30, help="timed blocks per variant")
    p.add_argument("--calls", type=int, default=50, help="calls per block")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("ab_acting.json"))
    args = p.parse_args()
    for name in ("states", "blocks", "calls"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    model_cfg = yaml.safe_load(args.config.read_text()).get("model", {})
    n = args.candidates if args.candidates is not None else model_cfg.get("n_action_candidates", 50)
    if n < 1:
        raise ValueError(f"--candidates must be >= 1, got {n}")

    torch.manual_seed(0)
    module, _ = build(args.config, 256, 3, "cpu")
    policy, critic = module.ema_policy, module.critic_target
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(args.states, module.hparams["obs_dim"], generator=gen)  # (N, S), normalised
    cond, critic_cond = (torch.randn(args.states, policy.cond_dim, generator=gen) for _ in range(2))  # (N, C)
    noise = policy.diffusion.chain_noise((args.states * n, module.hparams["act_dim"]), gen)  # (K + 1, N·n, A)
    inputs: Any = (policy, critic, obs, cond, critic_cond, noise)

    names = ["current", *args.variants]
    plain = {"current": scored_candidates, **{name: VARIANTS[name] for name in args.variants}}
    calls = {name: torch.compile(f) if model_cfg.get("compile") else f for name, f in plain.items()}
    flops: dict[str, float] = {}
    with torch.no_grad():
        reference = plain["current"](*inputs)
        for name in names:
            with FlopCounterMode(display=False) as counter:
                plain[name](*inputs)
            flops[name] = counter.get_total_flops()
            for _ in range(10):  # compile, then warm up
                out = calls[name](*inputs)
            for got, want in zip(out, reference, strict=True):  # the same function of the same inputs
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

        def block(name: str) -> float:
            start = time.perf_counter()
            for _ in range(args.calls):
                calls[name](*inputs)
            return (time.perf_counter() - start) / args.calls

        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in args.variants}
        for b in range(args.blocks):
            for name in args.variants:
                first, second = ("current", name) if b % 2 == 0 else (name, "current")
                t = {first: block(first), second: block(second)}
                times["current"].append(t["current"])
                times[name].append(t[name])
                ratios[name].append(t[name] / t["current"])

    def quartiles(x: list[float]) -> list[float]:
        q = statistics.quantiles(x, n=4)
        return [q[0], q[2]]

    result = {
        "config": str(args.config),
        "states": args.states,
        "candidates": n,
        "compile": bool(model_cfg.get("compile")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "calls_per_block": args.calls,
        "ms_per_call": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "mflop_per_call": {name: f / 1e6 for name, f in flops.items()},
        "time_ratio_vs_current": {name: statistics.median(r) for name, r in ratios.items()},
        "time_ratio_middle_half": {name: quartiles(r) for name, r in ratios.items()},
        "time_ratio_blocks": ratios,
    }
    middle = result["time_ratio_middle_half"]
    summary = " | ".join(
        f"{name}: {result['time_ratio_vs_current'][name]:.3f}x current's time "
        f"(middle half {middle[name][0]:.3f}-{middle[name][1]:.3f}), "
        f"{flops[name] / 1e6:.1f} vs {flops['current'] / 1e6:.1f} MFLOP"
        for name in args.variants
    )
    head = f"{args.states} states x {n} candidates, current {result['ms_per_call']['current']:.3f} ms"
    report(result, f"{head} | {summary}", args.out)


if __name__ == "__main__":
    main()
