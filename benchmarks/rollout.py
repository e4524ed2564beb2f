"""Evaluation throughput: env steps/s with the policy in the loop, against raw env stepping on the same envs.

    python benchmarks/rollout.py [--ckpt runs/.../last.ckpt] [--task box-close] [--num-envs 10] [--steps 500]

Both measurements run ``rollouts.run_episodes`` on the same vector env (``num_envs`` copies of one task):
with a policy that returns fixed actions (raw stepping: env cost only), and with the policy under test.
They alternate for ``--rounds`` rounds and each figure is the median over rounds, so a slow spell of the
machine hits both. Without ``--ckpt`` the policy is a freshly initialised ``LLMDPDModule`` of the config's
size (the cost does not depend on the weights), with the config's ``compile`` (the compiled reverse chain
is warmed up before timing). Prints the figures and writes JSON next to this file.

It also reports the ratio's **compute bound**: the policy's FLOPs per env step (``FlopCounterMode`` around one
eager policy call) at the machine's matmul peak (measured in the same run) is the least time any
implementation of the policy can add per env step, so ``ratio_bound = t_env / (t_env + FLOPs / peak)``
is the best ratio reachable on this machine with this action selection.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import matmul_peaks, peak_fields, report
from torch.utils.flop_counter import FlopCounterMode
from train_step import build

from llmdpd_pl.acting import module_policy
from llmdpd_pl.envs import make_eval_envs
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.rollouts import run_episodes


def steps_per_s(policy, task: str, envs, episodes: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    counts = run_episodes(policy, task, list(range(episodes)), envs.num_envs, 0, steps, envs=envs)
    return counts.length_sum / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--ckpt", type=Path, default=None)
    p.add_argument("--task", default="box-close")
    p.add_argument("--num-envs", type=int, default=10)
    p.add_argument("--steps", type=int, default=200, help="steps per episode")
    p.add_argument("--action-selection", choices=["sample", "q_softmax"], default=None)
    p.add_argument("--rounds", type=int, default=3, help="alternating raw / policy measurements")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the reverse chain (default: the config's or checkpoint's model.compile)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("rollout.json"))
    args = p.parse_args()

    if args.ckpt:
        module = LLMDPDModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    else:
        module, _ = build(args.config)
        module.task_bank.task_names = (args.task, "task1", "task2")
    if args.action_selection:
        module.hparams.action_selection = args.action_selection
    compile_ = bool(module.hparams.compile if args.compile is None else args.compile)
    module.hparams.compile = module.policy.compile_acting = False  # eager for the FLOP count
    module.eval()
    envs = make_eval_envs(args.task, args.num_envs, seed=0)
    fixed = np.zeros((args.num_envs, 4), dtype=np.float32)
    raws, agents = [], []
    before = matmul_peaks(torch.device("cpu"))  # and after the rounds: the best of both (peak_fields)
    with torch.inference_mode():
        policy = module_policy(module, 0, 0)
        obs, _ = envs.reset(seed=list(range(args.num_envs)))
        policy(obs, args.task)  # encodes the task's prompts once, as in an evaluation
        counter = FlopCounterMode(display=False)
        with counter:  # one policy call, eager: compile does not change the FLOPs
            policy(obs, args.task)
        flops_per_step = counter.get_total_flops() / args.num_envs
        module.hparams.compile = module.policy.compile_acting = compile_
        steps_per_s(policy, args.task, envs, args.num_envs, 2)  # warm-up (compilation)
        for _ in range(args.rounds):
            raws.append(steps_per_s(lambda obs, task: fixed, args.task, envs, args.num_envs, args.steps))
            agents.append(steps_per_s(policy, args.task, envs, args.num_envs, args.steps))
    envs.close()
    raw, agent = statistics.median(raws), statistics.median(agents)
    peak, peak_json = peak_fields(before, matmul_peaks(torch.device("cpu")))
    bound = (1 / raw) / (1 / raw + flops_per_step / peak)
    result = {
        "task": args.task,
        "num_envs": args.num_envs,
        "steps_per_episode": args.steps,
        "action_selection": module.hparams.action_selection,
        "n_action_candidates": module.hparams.n_action_candidates,
        "threads": torch.get_num_threads(),
        "compile": compile_,
        "rounds": args.rounds,
        "raw_env_steps_per_s": raw,
        "policy_env_steps_per_s": agent,
        "raw_env_steps_per_s_rounds": raws,
        "policy_env_steps_per_s_rounds": agents,
        "ratio": agent / raw,
        "policy_mflop_per_env_step": flops_per_step / 1e6,
        **peak_json,
        "ratio_bound": bound,
    }
    report(
        result,
        f"raw {raw:.0f} steps/s | with policy {agent:.0f} steps/s | ratio {100 * agent / raw:.1f}% | "
        f"compute bound {100 * bound:.1f}% "
        f"({flops_per_step / 1e6:.1f} MFLOP/step at {peak / 1e9:.0f} GFLOP/s)",
        args.out,
    )


if __name__ == "__main__":
    main()
