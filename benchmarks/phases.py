"""Where an update's time goes: each phase's milliseconds, FLOPs and GFLOP/s against the matmul peak.

    python benchmarks/phases.py [--config configs/metaworld.yaml] [--updates 100] [--repeats 3]

The update is the real one (``LLMDPDModule.update``), built as in ``ab_blocks.py``: the config's model,
``compile`` setting, optimizers and EMA in its steady state, 3 tasks, batch 256, warmed up, in a plain loop
(no Lightning loop; ``train_step.py`` times that). Each phase's time is its own, without the phases called
inside it: the EMA's prompt table calls the prompt encoding, for instance, and ``batch draw, EMA weights``
is the loop's step outside the update. ``rest of the update`` is the update's time outside the listed
phases (random draws, ``requires_grad`` switches, the target critics' soft update). FLOPs are counted per
phase by ``FlopCounterMode`` on an eager twin of the module, as the mean over ``ActorEMA.every`` updates
(the EMA's prompt table is recomputed once in that many). CPU only: the times are host wall times,
without device synchronisation. Prints a table, writes JSON next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from ab_blocks import PlainLoop, updater
from report import report
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from train_step import ema_from_config, matmul_peaks, peak_fields

from llmdpd_pl import module as module_lib

_CLIP = module_lib.clip_grad_norms

PHASES = (
    "prompt encoding",
    "EMA prompt table",
    "critic objective, forward",
    "critic backward",
    "actor objective, forward",
    "actor backward",
    "gradient clipping",
    "optimizer steps",
    "zero_grad",
    "batch draw, EMA weights",
    "rest of the update",
)


Measure = Callable[[], contextlib.AbstractContextManager[Callable[[], float]]]
"""A context manager whose value, called after the block, gives what the block used (seconds, FLOPs)."""


@contextlib.contextmanager
def wall_time() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end = [start]
    try:
        yield lambda: end[0] - start
    finally:
        end[0] = time.perf_counter()


@contextlib.contextmanager
def flop_count() -> Iterator[Callable[[], float]]:
    with FlopCounterMode(display=False) as counter:
        yield counter.get_total_flops


class Phases:
    """Per-phase totals of ``measure``, each phase's own: what a nested phase used is not counted in the
    phase it was entered from."""

    def __init__(self, measure: Measure) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._measure = measure
        self._stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        try:
            with self._measure() as used:
                yield
        finally:
            self._stack.pop()
        amount = used()
        self.totals[name] += amount
        if self._stack:
            self.totals[self._stack[-1]] -= amount


Phase = Callable[[str], contextlib.AbstractContextManager[None]]


def instrumented(loop: PlainLoop, phase: Phase) -> Callable[[], None]:
    """``loop``'s update with each phase inside ``phase(name)``: wraps the module's and optimizers' methods
    (instance attributes) and the module's ``clip_grad_norms``, which stays patched for this process."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)

        return wrapped

    m = loop.module
    m.prompt_context = wrap("prompt encoding", m.prompt_context)  # type: ignore[method-assign]
    m.ema_prompt_embeddings = wrap("EMA prompt table", m.ema_prompt_embeddings)  # type: ignore[method-assign]
    m.critic_losses = wrap("critic objective, forward", m.critic_losses)  # type: ignore[method-assign]
    m.actor_losses = wrap("actor objective, forward", m.actor_losses)  # type: ignore[method-assign]
    for opt in (loop.critic_opt, loop.actor_opt):
        opt.step = wrap("optimizer steps", opt.step)  # type: ignore[method-assign]
        opt.zero_grad = wrap("zero_grad", opt.zero_grad)  # type: ignore[method-assign]
    module_lib.clip_grad_norms = wrap("gradient clipping", _CLIP)
    update = wrap("rest of the update", m.update)
    m.update = update  # type: ignore[method-assign]
    backward_calls = [0]

    def backward(loss: Tensor) -> None:
        backward_calls[0] += 1  # the update's first backward is the critic's, its second the actor's
        with phase("critic backward" if backward_calls[0] % 2 else "actor backward"):
            loss.backward()

    def step() -> None:
        with phase("batch draw, EMA weights"):  # what the update leaves: the batch and the EMA callback
            loop.step(backward)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--updates", type=int, default=100, help="timed updates per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("phases.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    ema = ema_from_config(yaml.safe_load(args.config.read_text()))
    n_flops = ema[0].every if ema else 1

    counted = Phases(flop_count)
    eager = instrumented(updater(args.config, "current", 0, compile=False), counted.phase)
    for _ in range(n_flops):
        eager()
    flops = {name: counted.totals[name] / n_flops for name in PHASES}

    before = matmul_peaks(torch.device("cpu"))  # and after the repeats: the best of both (peak_fields)
    timer = Phases(wall_time)
    step = instrumented(updater(args.config, "current", args.warmup), timer.phase)
    ms: dict[str, list[float]] = {name: [] for name in (*PHASES, "update")}
    for _ in range(args.repeats):
        timer.totals.clear()
        start = time.perf_counter()
        for _ in range(args.updates):
            step()
        ms["update"].append(1e3 * (time.perf_counter() - start) / args.updates)
        for name in PHASES:
            ms[name].append(1e3 * timer.totals[name] / args.updates)
    peak, peak_json = peak_fields(before, matmul_peaks(torch.device("cpu")))
    median = {name: statistics.median(v) for name, v in ms.items()}
    rows = {
        name: {
            "ms": median[name],
            "ms_repeats": ms[name],
            "mflop": flops.get(name, sum(flops.values())) / 1e6,
            "gflops": flops.get(name, sum(flops.values())) / (median[name] * 1e6),
        }
        for name in (*PHASES, "update")
    }
    result = {
        "config": str(args.config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timed_updates": args.updates,
        **peak_json,
        "phases": rows,
    }
    lines = [f"{'phase':28s} {'ms':>7s} {'MFLOP':>8s} {'GFLOP/s':>8s} {'% peak':>7s}"]
    for name, row in rows.items():
        share = 100 * row["gflops"] * 1e9 / peak
        lines.append(f"{name:28s} {row['ms']:7.2f} {row['mflop']:8.1f} {row['gflops']:8.1f} {share:6.1f}%")
    report(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
