"""Time the real ``LLMDPDModule`` update: updates/s, FLOPs per update, matmul peak, roofline fraction; or
A/B it against another commit.

    python benchmarks/train_step.py [--config configs/metaworld.yaml] [--updates 200] [--repeats 3]
        [--compile | --no-compile] [--precision bf16-mixed] [--device cuda]
    python benchmarks/train_step.py --paired REV [--blocks 20] [--block 25]

The model is built from the config's ``model`` section (the real one: both prompts, K = 5, its optimizers
and its ``compile`` setting), with 3 tasks and batch 256, and the config's ``ActorEMA``. The data are random
tensors of the real shapes (content does not change the cost), fed through the real ``BatchStream``. The
timed updates are in the EMA's steady state: the module's update counter starts at ``ActorEMA.start``, so
the EMA averages every ``every`` updates, as in all but the first ``start`` updates of a run.

**Plain timing** runs ``--repeats`` fresh modules in a real ``Trainer`` and reports the median updates/s.
The matmul peak is measured after every repeat and the roofline's denominator is the best of them.

**``--paired REV``** compares this working tree's update with commit ``REV``'s. Each side builds and warms
up its own module in a process of its own, from its own source tree (``ab_worker.py``), with inductor's
on-disk caches off. Then blocks of ``--block`` updates run in pairs, one per side, in turn first, so that
both blocks of a pair see the same state of a shared machine. Reports the median of the paired ratios
(this tree's updates/s over REV's), their middle half, and how many are above 1. Both sides run the config's
own settings (its ``compile`` included) on the CPU with torch's default threads; ``--compile``, ``--device``,
``--precision`` and ``--float32-matmul-precision`` apply to plain timing only.

Prints the figures and writes JSON next to this file (not committed).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from common import matmul_peaks, peak_fields, report
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.data.batches import BatchStream, Transitions
from llmdpd_pl.envs import ACT_DIM, OBS_DIM
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.task_bank import TaskPrompts

ROOT = Path(__file__).resolve().parent.parent


def optimizer_from_config(spec: dict[str, Any] | None) -> Any:
    """``{class_path, init_args}`` of a config → an optimizer factory (the default ``Adam`` if absent)."""
    if spec is None:
        return torch.optim.Adam
    module_name, _, cls = spec["class_path"].rpartition(".")
    return partial(getattr(importlib.import_module(module_name), cls), **spec.get("init_args", {}))


def ema_from_config(cfg: dict[str, Any]) -> list[L.Callback]:
    """The config's ``ActorEMA`` callback (its EMA update is part of every training update)."""
    for spec in cfg.get("trainer", {}).get("callbacks", []) or []:
        if spec.get("class_path", "").endswith("ActorEMA"):
            return [ActorEMA(**spec.get("init_args", {}))]
    return []


def build(
    config: Path, batch_size: int = 256, n_tasks: int = 3, device: str = "cpu", **overrides: Any
) -> tuple[LLMDPDModule, BatchStream]:
    """The config's model (``overrides`` replace its values) with random prompts, and a stream of random
    transitions of the real shapes."""
    cfg = yaml.safe_load(config.read_text())
    model_cfg = {k: v for k, v in cfg.get("model", {}).items() if not k.endswith(("optimizer", "scheduler"))}
    for name in ("actor_optimizer", "critic_optimizer"):  # the config's optimizers (e.g. fused Adam)
        model_cfg[name] = optimizer_from_config(cfg.get("model", {}).get(name))
    model_cfg.update(overrides)
    traj_len, n_prompts, embed_dim, n_rows = cfg.get("data", {}).get("traj_prompt_len", 25), 5, 384, 100_000
    module = LLMDPDModule(OBS_DIM, ACT_DIM, embed_dim, traj_len, **model_cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    prompts = TaskPrompts(
        names=tuple(f"task{i}" for i in range(n_tasks)),
        text_embedding=torch.randn(n_tasks, embed_dim, generator=gen),
        traj_obs=torch.randn(n_tasks, n_prompts, traj_len, OBS_DIM, generator=gen),
        traj_act=torch.rand(n_tasks, n_prompts, traj_len, ACT_DIM, generator=gen) * 2 - 1,
    )
    module.task_bank.fill(prompts, torch.zeros(OBS_DIM), torch.ones(OBS_DIM), n_seen=n_tasks)
    data = Transitions(
        obs=torch.randn(n_rows, OBS_DIM, generator=gen),
        action=torch.rand(n_rows, ACT_DIM, generator=gen) * 2 - 1,
        reward=torch.rand(n_rows, generator=gen),
        next_obs=torch.randn(n_rows, OBS_DIM, generator=gen),
        not_done=torch.ones(n_rows),
        task_id=torch.randint(n_tasks, (n_rows,), generator=gen),
    )
    return module, BatchStream(data, batch_size, 10**9, seed=0, rank=0, task_sampling="balanced")


def start_in_steady_state(module: LLMDPDModule, ema: list[L.Callback]) -> None:
    """Start the module's update counter at ``ActorEMA.start`` (module docstring)."""
    module.updates = ema[0].start if ema else 0


def updater(config: Path, warmup: int, **overrides: Any) -> Callable[[], None]:
    """One update and the EMA's, in a plain loop (no Trainer) on a fresh module, after ``warmup`` of them.

    ``ab_worker.py`` calls this in each tree that ``--paired`` compares.
    """
    module, stream = build(config, **overrides)
    (critic_opt, actor_opt), _ = module.configure_optimizers()
    ema = ema_from_config(yaml.safe_load(config.read_text()))
    for callback in ema:
        callback.setup(None, module, "fit")  # type: ignore[arg-type]
    start_in_steady_state(module, ema)
    batches = iter(stream)

    def step() -> None:
        module.update(next(batches), critic_opt, actor_opt, Tensor.backward)
        for callback in ema:
            callback.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]

    for _ in range(warmup):
        step()
    return step


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def fit_updates(module: LLMDPDModule, stream: BatchStream, updates: int, ema: list[L.Callback],
                callbacks: list[L.Callback], accelerator: str = "cpu", precision: str = "32-true") -> None:
    """``updates`` updates of a bare ``Trainer``, from the EMA's steady state."""
    start_in_steady_state(module, ema)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=2 * updates,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*callbacks, *ema])  # fmt: skip
    trainer.fit(module, train_dataloaders=stream)


def count_flops(config: Path, accelerator: str, precision: str) -> float:
    """FLOPs per update, counted by ``FlopCounterMode`` around real training steps, eager.

    With an ``ActorEMA`` the EMA's prompt embeddings are recomputed only after its writes (every ``every``
    updates), so the count is the mean over ``every`` consecutive updates, one of which recomputes them.
    """
    module, stream = build(config, device="cuda" if accelerator == "gpu" else "cpu", compile=False)
    ema = ema_from_config(yaml.safe_load(config.read_text()))
    counter, n = FlopCounterMode(display=False), ema[0].every if ema else 1

    class _Count(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 0:
                counter.__enter__()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2 * n:
                counter.__exit__(None, None, None)

    fit_updates(module, stream, n, ema, [_Count()], accelerator, precision)
    return counter.get_total_flops() / n


def source_tree(rev: str, into: Path) -> Path:
    """Commit ``rev``'s files (``git archive``) unpacked into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class Side:
    """A worker process that runs one tree's update in blocks (``ab_worker.py``)."""

    def __init__(self, tree: Path, config: Path, warmup: int) -> None:
        worker = Path(__file__).with_name("ab_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(worker), str(tree), str(config.resolve()), str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree,
        )  # fmt: skip
        if self._read() != "ready":
            raise RuntimeError(f"the worker of {tree} failed to start")

    def _read(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("AB "):
                return line[3:].strip()
        raise RuntimeError(f"worker exited with {self.proc.wait()}")

    def block(self, updates: int) -> float:
        """updates/s of ``updates`` updates."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{updates}\n")
        self.proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def paired(args: argparse.Namespace) -> None:
    """``--paired REV``: this tree against REV's, in interleaved blocks (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="llmdpd-ab-") as tmp:
        sides = {"this": Side(ROOT, args.config, args.warmup)}  # one at a time: compiling is the heavy part
        sides["rev"] = Side(source_tree(args.paired, Path(tmp)), args.config, args.warmup)
        rates: dict[str, list[float]] = {"this": [], "rev": []}
        for b in range(args.blocks):
            for name in ("this", "rev") if b % 2 == 0 else ("rev", "this"):
                rates[name].append(sides[name].block(args.block))
        for side in sides.values():
            side.close()
    ratios = [a / b for a, b in zip(rates["this"], rates["rev"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    median = statistics.median(ratios)
    result = {
        "config": str(args.config),
        "rev": subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.paired], capture_output=True,
                              text=True).stdout.strip(),  # fmt: skip
        "block_updates": args.block,
        "blocks": args.blocks,
        "updates_per_s_this": statistics.median(rates["this"]),
        "updates_per_s_rev": statistics.median(rates["rev"]),
        "updates_per_s_blocks": rates,
        "paired_ratios": ratios,
        "median_paired_ratio": median,
        "paired_ratio_middle_half": [q1, q3],
        "blocks_above_1": sum(r > 1 for r in ratios),
    }
    report(
        result,
        f"this tree / {args.paired}: median paired ratio {median:.3f} (middle half {q1:.3f}-{q3:.3f}, "
        f"{result['blocks_above_1']} of {args.blocks} above 1) | {result['updates_per_s_this']:.2f} vs "
        f"{result['updates_per_s_rev']:.2f} updates/s",
        args.out.with_name("train_step_paired.json"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--updates", type=int, default=200, help="timed updates per repeat")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--float32-matmul-precision", choices=["highest", "high", "medium"], default="highest",
                   help="as llmdpd's --float32_matmul_precision; the peak is measured under the same setting")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the update (default: the config's model.compile)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--paired", metavar="REV", default=None, help="A/B this tree's update against commit REV")
    p.add_argument("--blocks", type=int, default=20, help="--paired: timed blocks per side")
    p.add_argument("--block", type=int, default=25, help="--paired: updates per block")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("train_step.json"))
    args = p.parse_args()  # fmt: skip
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.paired:
        return paired(args)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    cfg = yaml.safe_load(args.config.read_text())
    compile_ = cfg.get("model", {}).get("compile", False) if args.compile is None else args.compile
    flops = count_flops(args.config, accelerator, args.precision)
    # The roofline of a mixed-precision run is the matmul peak of its low-precision dtype.
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision.split("-")[0], torch.float32)
    rates, peaks = [], []
    for _ in range(args.repeats):
        torch._dynamo.reset()
        module, stream = build(args.config, device=args.device, compile=compile_)
        timer = _Timer()
        fit_updates(module, stream, args.warmup + args.updates, ema_from_config(cfg), [timer], accelerator,
                    args.precision)  # fmt: skip
        stamps = timer.stamps[args.warmup :]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        peaks.append(matmul_peaks(torch.device(args.device), dtype))
    peak, peak_json = peak_fields(*peaks)
    ups = statistics.median(rates)
    fractions = [r * flops / peak for r in rates]
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "config": str(args.config),
        "batch_size": 256,
        "tasks": 3,
        "precision": args.precision,
        "float32_matmul_precision": args.float32_matmul_precision,
        "compile": compile_,
        "warmup_updates": args.warmup,
        "timed_updates": args.updates,
        "updates_per_s": ups,
        "updates_per_s_repeats": rates,
        "gflop_per_update": flops / 1e9,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        **peak_json,
        "matmul_peak_gflops_repeats": [max(p.values()) / 1e9 for p in peaks],
        "roofline_fraction": ups * flops / peak,
        "roofline_fraction_repeats": fractions,
    }
    report(
        result,
        f"updates/s {ups:.2f} | {flops / 1e9:.2f} GFLOP/update | peak {peak / 1e9:.0f} GFLOP/s | "
        f"roofline {100 * result['roofline_fraction']:.1f}% (repeats "
        f"{100 * min(fractions):.1f}-{100 * max(fractions):.1f}%)",
        args.out,
    )


if __name__ == "__main__":
    main()
