"""A/B test of implementation variants of the update, in blocks interleaved across processes.

    python benchmarks/ab_blocks.py VARIANT [VARIANT ...] [--blocks 12] [--block 25] [--config ...]

The machine this project is developed on runs at one of two speeds, about 25% apart, switching every few
minutes (``NOTES.md``), so whole runs a minute apart cannot resolve a 5% effect. Here each variant and the
current code (``current``) get their own module, built from the config like ``train_step.py``'s (3 tasks,
batch 256, the config's optimizers, ``compile`` and EMA in its steady state) and warmed up (compiled).
Then blocks of ``--block`` real updates (``LLMDPDModule.update``, plain optimizers, the EMA callback's
own update, no Lightning loop) run in pairs, each variant's block next to one of ``current``'s, in turn
first, so that both blocks of a pair see the same machine. Reports each variant's median updates/s over
blocks and its median paired ratio against ``current``; writes JSON next to this file.

**Each variant runs in a process of its own**, with inductor's on-disk caches off. Dynamo keeps its
compiled graphs per function, not per module, and inductor's config is not among its guards, so in one
process a variant that changes only the compiler's settings would run ``current``'s graphs (the fourth
session's harness did, for three of its five variants: ``NOTES.md``). Only the process whose turn it is
computes; the others wait on a pipe.

Variants (prototypes of optimisations; each is applied for its process's lifetime):
``mish_autodiff`` (under compile, Mish as plain tensor ops whose backward inductor derives, instead of
the closed-form autograd.Function), ``compiled_adam`` (foreach Adam with ``torch.compile``d ``step``),
``unfused_bias`` (inductor splits an ``addmm`` whose output feeds only pointwise ops into ``mm`` + a bias
add that fuses into them, as it does on GPUs, instead of ``addmm`` copying the bias into its output),
``no_size_asserts`` (inductor's ``size_asserts`` off), ``cpp_wrapper`` (inductor's C++ wrapper instead
of Python), ``always_rescale`` (gradient clipping multiplies even by a factor of exactly 1, as before the
sixth session, when it learned to skip that: ``NOTES.md``), ``unshared_context`` (the actor objective
computes the denoiser's state-and-prompt context twice, for the chain and for Eq. 5's pass, as before the
eighth session: ``train_step.py --ablate``), ``skip_guards`` (after the warm-up, dynamo evaluates only
the guards that tell a function's compiled graphs apart:
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch._inductor.config as inductor_config
import yaml
from report import report
from torch import Tensor
from torch._inductor.fx_passes import post_grad
from train_step import ablated, build, ema_from_config, start_in_steady_state

from llmdpd_pl import layers
from llmdpd_pl import module as module_lib
from llmdpd_pl.module import LLMDPDModule

VARIANTS = (
    "mish_autodiff",
    "compiled_adam",
    "unfused_bias",
    "no_size_asserts",
    "cpp_wrapper",
    "always_rescale",
    "unshared_context",
    "skip_guards",
)
_EAGER_MISH = layers.mish
_CLIP = module_lib.clip_grad_norms


def _mish_autodiff(x: Tensor) -> Tensor:
    """Mish as plain ops under compile (inductor derives the backward), the closed form in eager."""
    if not torch.compiler.is_compiling():
        return _EAGER_MISH(x)
    s = torch.sigmoid(x)
    p = s * (2 - s)
    return x * (p / (2 - p))


def _always_rescale(groups: Any, max_norm: float) -> dict[str, Tensor]:
    """``clip_grad_norms`` as before the sixth session: the multiply runs even when its factor is 1."""
    groups = {name: list(params) for name, params in groups.items()}
    norms = _CLIP(groups, 0.0)  # measure only
    if max_norm > 0:
        grads = [p.grad for params in groups.values() for p in params if p.grad is not None]
        torch._foreach_mul_(grads, (max_norm / (norms["total"] + 1e-6)).clamp(max=1.0))
    return norms


def _prefer_unfused_addmm(match: Any) -> bool:
    """Inductor's ``should_prefer_unfused_addmm`` without its GPU-only condition."""
    return all(post_grad.is_pointwise_use(use) for use in match.output_node().users)


@contextlib.contextmanager
def _unfused_bias() -> Iterator[None]:
    """Point inductor's two post-grad addmm patterns (unfuse ``addmm``, fuse ``mm`` + add) at CPU too."""
    entries = [e for patterns in post_grad.pass_patterns[2].patterns.values() for e in patterns]
    saved = [(e, e.extra_check) for e in entries]
    valid = post_grad.is_valid_addmm_fusion
    for e in entries:
        if e.extra_check is post_grad.should_prefer_unfused_addmm:
            e.extra_check = _prefer_unfused_addmm
        elif e.extra_check is valid:
            e.extra_check = lambda match: valid(match) and not _prefer_unfused_addmm(match)
    try:
        yield
    finally:
        for e, check in saved:
            e.extra_check = check


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Process-wide patches of one variant (``compiled_adam`` is set up in :func:`updater`, on the
    optimizers)."""
    saved = (layers.mish, module_lib.clip_grad_norms)
    with contextlib.ExitStack() as stack:
        if name == "mish_autodiff":  # one function object, so compiled graphs' guards keep matching
            layers.mish = _mish_autodiff
        elif name == "always_rescale":
            module_lib.clip_grad_norms = _always_rescale
        elif name == "unfused_bias":
            stack.enter_context(_unfused_bias())
        elif name == "no_size_asserts":
            stack.enter_context(inductor_config.patch(size_asserts=False))
        elif name == "cpp_wrapper":
            stack.enter_context(inductor_config.patch(cpp_wrapper=True))
        elif name == "unshared_context":
            stack.enter_context(ablated([name]))
        elif name not in ("current", "compiled_adam", "skip_guards"):
            raise ValueError(f"unknown variant {name!r}")
        try:
            yield
        finally:
            layers.mish, module_lib.clip_grad_norms = saved


class PlainLoop(NamedTuple):
    """A built, warmed-up module with its optimizers; ``step(backward)`` runs one update and the EMA's."""

    module: LLMDPDModule
    critic_opt: torch.optim.Optimizer
    actor_opt: torch.optim.Optimizer
    step: Callable[..., None]


def updater(config: Path, name: str, warmup: int, **overrides: Any) -> PlainLoop:
    """One fresh module of ``name`` (``overrides`` go to the model), warmed up, in a plain update loop.

    Call it inside ``variant(name)``, which must stay active while the loop runs (a process's lifetime).
    """
    cfg = yaml.safe_load(config.read_text())
    # compiled_adam: the config's Adam without ``fused``, as foreach Adam with its step compiled.
    ablations = ("unfused_adam",) if name == "compiled_adam" else ()
    module, stream = build(config, 256, 3, "cpu", ablations, **overrides)
    module.configure_model()
    (critic_opt, actor_opt), _ = module.configure_optimizers()
    if name == "compiled_adam":
        for opt in (critic_opt, actor_opt):
            for group in opt.param_groups:
                group["foreach"] = True
            opt.step = torch.compile(opt.step)
    ema = ema_from_config(cfg)
    for callback in ema:
        callback.setup(None, module, "fit")  # type: ignore[arg-type]
    start_in_steady_state(module, ema)
    batches = iter(stream)

    def step(backward: Callable[[Tensor], Any] = Tensor.backward) -> None:
        module.update(next(batches), critic_opt, actor_opt, backward)
        for callback in ema:
            callback.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]

    for _ in range(warmup):
        step()
    return PlainLoop(module, critic_opt, actor_opt, step)


def _worker(conn: Connection, config: Path, name: str, warmup: int) -> None:
    """One variant's process: build and warm up, say ready, then time each requested block of updates."""
    inductor_config.fx_graph_cache = False  # compile this process's own graphs (module docstring)
    inductor_config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    with variant(name):
        step = updater(config, name, warmup).step
        if name == "skip_guards":  # after the warm-up, which compiled every graph the loop runs
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        conn.send("ready")
        while (updates := conn.recv()) is not None:
            t = time.perf_counter()
            for _ in range(updates):
                step()
            conn.send(updates / (time.perf_counter() - t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=VARIANTS)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--blocks", type=int, default=12, help="timed blocks per variant")
    p.add_argument("--block", type=int, default=25, help="updates per block")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("ab_blocks.json"))
    args = p.parse_args()
    names = ["current", *args.variants]
    ctx = mp.get_context("spawn")
    conns: dict[str, Connection] = {}
    workers = []
    for name in names:  # one at a time: compiling is the heavy part
        parent, child = ctx.Pipe()
        worker = ctx.Process(target=_worker, args=(child, args.config, name, args.warmup), daemon=True)
        worker.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"variant {name!r} failed to start")
        conns[name] = parent
        workers.append(worker)

    def block(name: str) -> float:
        conns[name].send(args.block)
        return float(conns[name].recv())

    rates: dict[str, list[float]] = {name: [] for name in names}
    pairs: dict[str, list[float]] = {name: [] for name in args.variants}
    for b in range(args.blocks):
        for name in args.variants:  # each variant's block next to a block of current, in turn first
            first, second = ("current", name) if b % 2 == 0 else (name, "current")
            rate = {first: block(first), second: block(second)}
            rates["current"].append(rate["current"])
            rates[name].append(rate[name])
            pairs[name].append(rate[name] / rate["current"])
    for name in names:
        conns[name].send(None)
    for worker in workers:
        worker.join()
    ratios = {name: statistics.median(r) for name, r in pairs.items()}
    result = {
        "config": str(args.config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "block_updates": args.block,
        "updates_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "updates_per_s_blocks": rates,
        "paired_ratios": pairs,
        "paired_ratio_to_current": ratios,
    }
    report(
        result,
        " | ".join(f"{name} {ratios[name]:.3f}x current" for name in args.variants)
        + f" (current {result['updates_per_s']['current']:.2f} updates/s)",
        args.out,
    )


if __name__ == "__main__":
    main()
