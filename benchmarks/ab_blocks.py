"""A/B test of implementation variants of the update, in blocks interleaved in one process.

    python benchmarks/ab_blocks.py VARIANT [VARIANT ...] [--blocks 12] [--block 25] [--config ...]

The machine this project is developed on runs at one of two speeds, about 25% apart, switching every few
minutes (``NOTES.md``), so whole runs a minute apart cannot resolve a 5% effect. Here each variant and the
current code (``current``) get their own module, built from the config like ``train_step.py``'s (3 tasks,
batch 256, the config's optimizers, ``compile`` and EMA in its steady state) and warmed up (compiled).
Then blocks of ``--block`` real updates (``LLMDPDModule.update``, plain optimizers, the EMA callback's
own update, no Lightning loop) alternate between them, in turn first, so neighbouring blocks see the same
machine. Reports each variant's median updates/s over blocks and its median paired ratio against
``current``; writes JSON next to this file.

Variants (prototypes of optimisations; each is applied while its module is built, compiled and run):
``mish_autodiff`` (under compile, Mish as plain tensor ops whose backward inductor derives, instead of
the closed-form autograd.Function), ``compiled_adam`` (foreach Adam with ``torch.compile``d ``step``),
``unfused_bias`` (under compile, Linear layers as matmul + bias add, so that the add can fuse into the
next pointwise kernel instead of ``addmm`` copying the bias into its output), ``no_size_asserts``
(inductor's ``size_asserts`` off), ``cpp_wrapper`` (inductor's C++ wrapper instead of Python).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch._inductor.config as inductor_config
import yaml
from report import report
from torch import Tensor, nn
from train_step import build, ema_from_config, start_in_steady_state

from llmdpd_pl import networks
from llmdpd_pl.module import LLMDPDModule

_EAGER_MISH = networks.mish


def _mish_autodiff(x: Tensor) -> Tensor:
    """Mish as plain ops under compile (inductor derives the backward), the closed form in eager."""
    if not torch.compiler.is_compiling():
        return _EAGER_MISH(x)
    s = torch.sigmoid(x)
    p = s * (2 - s)
    return x * (p / (2 - p))


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Process-wide patches of one variant, active inside the block (``compiled_adam`` is set up in
    :func:`updater`, on the optimizers)."""
    saved = (networks.mish, nn.Linear.forward, networks.StackedLinear.forward)
    with contextlib.ExitStack() as stack:
        if name == "mish_autodiff":  # one function object, so compiled graphs' guards keep matching
            networks.mish = _mish_autodiff
        elif name == "unfused_bias":
            linear, stacked = nn.Linear.forward, networks.StackedLinear.forward

            def linear_fwd(self: nn.Linear, x: Tensor) -> Tensor:
                if torch.compiler.is_compiling():
                    return torch.matmul(x, self.weight.t()) + self.bias
                return linear(self, x)

            def stacked_fwd(self: networks.StackedLinear, x: Tensor) -> Tensor:
                if torch.compiler.is_compiling():
                    return torch.bmm(x, self.weight.transpose(1, 2)) + self.bias
                return stacked(self, x)

            nn.Linear.forward = linear_fwd  # type: ignore[method-assign]
            networks.StackedLinear.forward = stacked_fwd  # type: ignore[method-assign]
        elif name == "no_size_asserts":
            stack.enter_context(inductor_config.patch(size_asserts=False))
        elif name == "cpp_wrapper":
            stack.enter_context(inductor_config.patch(cpp_wrapper=True))
        elif name not in ("current", "compiled_adam"):
            raise ValueError(f"unknown variant {name!r}")
        try:
            yield
        finally:
            networks.mish, nn.Linear.forward, networks.StackedLinear.forward = saved  # type: ignore[method-assign]


class PlainLoop(NamedTuple):
    """A built, warmed-up module with its optimizers; ``step(backward)`` runs one update and the EMA's."""

    module: LLMDPDModule
    critic_opt: torch.optim.Optimizer
    actor_opt: torch.optim.Optimizer
    step: Callable[..., None]


def updater(config: Path, name: str, warmup: int, **overrides: Any) -> PlainLoop:
    """One fresh module of ``name`` (``overrides`` go to the model), warmed up, in a plain update loop."""
    cfg = yaml.safe_load(config.read_text())
    with variant(name):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "variants",
        nargs="+",
        choices=["mish_autodiff", "compiled_adam", "unfused_bias", "no_size_asserts", "cpp_wrapper"],
    )
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--blocks", type=int, default=12, help="timed blocks per variant")
    p.add_argument("--block", type=int, default=25, help="updates per block")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("ab_blocks.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    names = ["current", *args.variants]
    steps = {name: updater(args.config, name, args.warmup).step for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for b in range(args.blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            with variant(name):
                t = time.perf_counter()
                for _ in range(args.block):
                    steps[name]()
                rates[name].append(args.block / (time.perf_counter() - t))
    ratios = {
        name: statistics.median(a / b for a, b in zip(rates[name], rates["current"], strict=True))
        for name in args.variants
    }
    result = {
        "config": str(args.config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "block_updates": args.block,
        "updates_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "updates_per_s_blocks": rates,
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
