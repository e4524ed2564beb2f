"""Time the real ``LLMDPDModule`` update: updates/s, FLOPs per update, matmul peak, roofline fraction.

    python benchmarks/train_step.py [--config configs/metaworld.yaml] [--updates 200] [--repeats 3]
        [--compile | --no-compile] [--precision bf16-mixed] [--ablate torch_mish ...] [--paired]

The model is built from the config's ``model`` section (the real one: both prompts, K = 5, its optimizers
and its ``compile`` setting), with 3 tasks and batch 256, and the config's ``ActorEMA``. The data are random
tensors of the real shapes (content does not change the cost), fed through the real ``BatchStream`` and a
real ``Trainer``. Prints the figures and writes JSON next to this file.

The matmul peak is measured after every repeat, and the roofline's denominator is the best of them
(:func:`peak_fields` says why).

The timed updates are in the EMA's steady state: the module's update counter starts at ``ActorEMA.start``,
so the EMA averages every ``every`` updates, as in all but the first ``start`` (1000) updates of a run,
instead of copying the policy at every update.

``--ablate`` undoes one optimisation at a time, to measure what each is worth (``NOTES.md``); with
``--paired`` each repeat alternates with the all-on update in the same process, so that both see the same
state of a shared machine, and the JSON holds both and their median paired ratio:
``torch_mish`` (PyTorch's Mish kernel), ``unshared_context`` (the denoiser's state-and-prompt part of
the first layer computed once for the chain and again for Eq. 5's pass, instead of once for both),
``per_step_context`` (the same part recomputed at every denoiser pass, each chain step included),
``unfused_adam`` (``torch.optim.Adam`` without ``fused``),
``log_every_update`` (Lightning logging on every update), ``ema_every_update`` (the EMA actor's prompt
embeddings recomputed at every update instead of after the EMA's writes only).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from report import report
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from llmdpd_pl import layers
from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.data.batches import BatchStream, Transitions
from llmdpd_pl.data.datamodule import TaskPrompts
from llmdpd_pl.envs import ACT_DIM, OBS_DIM
from llmdpd_pl.module import LLMDPDModule
from llmdpd_pl.policy import PromptedPolicy


def matmul_peaks(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 20
) -> dict[str, float]:
    """Best FLOP/s of an n×n matmul in ``dtype`` on ``device``, per library PyTorch can run it with.

    ``aten`` is ``a @ b``, the path the model's own matmuls take (MKL on x86 CPUs, cuBLAS on CUDA).
    On CPU, ``onednn`` is oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the same arithmetic in
    the same dtype). On this project's AMD EPYC machines MKL reaches about 185 GFLOP/s and oneDNN about
    215 (``NOTES.md``, seventh session), so the machine's peak is the best of the two.
    """
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    calls = {"aten": lambda: a @ b}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        b_t = b.t().contiguous()  # (out, in), the layout of a linear layer's weight
        calls["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
        full = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        reference, tol = (a @ b).float(), 1e-4 if full else 1e-2
        error = ((calls["onednn"]().float() - reference).norm() / reference.norm()).item()
        if not error < tol:  # a library that computed something else would not measure the same peak
            raise RuntimeError(f"oneDNN's {dtype} matmul differs from ATen's: relative error {error:.2e}")
    peaks = {}
    for library, call in calls.items():
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        peaks[library] = 2 * n**3 / best
    return peaks


def peak_fields(*measurements: dict[str, float]) -> tuple[float, dict[str, Any]]:
    """The machine's peak (FLOP/s) from one or more :func:`matmul_peaks`, and the JSON fields every
    benchmark writes for it: each library's best over the measurements, and the best of those.

    The shared machines this was developed on have slow spells in which the peak itself drops (to
    111 GFLOP/s from about 215, ``NOTES.md``, eighth session). A benchmark therefore measures it more than
    once, around what it times, so that a slow spell during one measurement cannot inflate a fraction.
    """
    peaks = {library: max(m[library] for m in measurements) for library in measurements[0]}
    peak = max(peaks.values())
    gflops = {library: p / 1e9 for library, p in peaks.items()}
    return peak, {"matmul_peak_gflops": peak / 1e9, "matmul_peak_gflops_by_library": gflops}


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.flops = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


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


@contextlib.contextmanager
def ablated(ablations: Sequence[str]) -> Iterator[None]:
    """Undo optimisations (process-wide patches) inside the block, to measure each one's worth."""
    saved = (
        layers.mish,
        PromptedPolicy.context,
        PromptedPolicy.eps,
        PromptedPolicy.sample_from_context,
        LLMDPDModule.ema_prompt_embeddings,
    )
    if "torch_mish" in ablations:
        layers.mish = torch.nn.functional.mish  # Mish modules look the function up at call time
    if "unshared_context" in ablations or "per_step_context" in ablations:
        # The "context" handed around is (obs, cond); each denoiser pass or each chain computes its own.
        def context(self: PromptedPolicy, obs: Tensor, cond: Tensor) -> Any:
            return obs, cond

        def eps(self: PromptedPolicy, a_k: Tensor, k: Tensor, context: Any) -> Tensor:
            return self.denoiser(a_k, k, self.denoiser.context(*context))

        def sample_from_context(self: PromptedPolicy, context: Any, noise: Tensor) -> Tensor:
            if "per_step_context" in ablations:
                return self.diffusion.sample(lambda a_k, k: eps(self, a_k, k, context), noise)
            once = self.denoiser.context(*context)
            return self.diffusion.sample(lambda a_k, k: self.denoiser(a_k, k, once), noise)

        PromptedPolicy.context = context  # type: ignore[method-assign]
        PromptedPolicy.eps = eps  # type: ignore[method-assign]
        PromptedPolicy.sample_from_context = sample_from_context  # type: ignore[method-assign]
    if "ema_every_update" in ablations:

        @torch.no_grad()
        def ema_prompt_embeddings(self: LLMDPDModule, prompt_index: Tensor) -> Tensor:
            seen = torch.arange(self.context.n_seen, device=self.device)
            return self.prompt_context(self.ema_policy, seen, prompt_index)

        LLMDPDModule.ema_prompt_embeddings = ema_prompt_embeddings  # type: ignore[method-assign]
    try:
        yield
    finally:
        (
            layers.mish,
            PromptedPolicy.context,
            PromptedPolicy.eps,
            PromptedPolicy.sample_from_context,
            LLMDPDModule.ema_prompt_embeddings,
        ) = saved


def build(
    config: Path, batch_size: int, n_tasks: int, device: str, ablations: Sequence[str] = (), **overrides: Any
) -> tuple[LLMDPDModule, BatchStream]:
    cfg = yaml.safe_load(config.read_text())
    model_cfg = {k: v for k, v in cfg.get("model", {}).items() if not k.endswith(("optimizer", "scheduler"))}
    for name in ("actor_optimizer", "critic_optimizer"):  # the config's optimizers (e.g. fused Adam)
        spec = cfg.get("model", {}).get(name)
        if spec is not None and "unfused_adam" in ablations:
            spec = {**spec, "init_args": {k: v for k, v in spec.get("init_args", {}).items() if k != "fused"}}
        model_cfg[name] = optimizer_from_config(spec)
    model_cfg.update(overrides)
    data_cfg = cfg.get("data", {})
    L_, P, E, N = data_cfg.get("traj_prompt_len", 25), 5, 384, 100_000
    module = LLMDPDModule(obs_dim=OBS_DIM, act_dim=ACT_DIM, text_embed_dim=E, traj_prompt_len=L_, **model_cfg)
    gen = torch.Generator().manual_seed(0)
    prompts = TaskPrompts(
        names=tuple(f"task{i}" for i in range(n_tasks)),
        text_embedding=torch.randn(n_tasks, E, generator=gen),
        traj_obs=torch.randn(n_tasks, P, L_, OBS_DIM, generator=gen),
        traj_act=torch.rand(n_tasks, P, L_, ACT_DIM, generator=gen) * 2 - 1,
    )
    module.context.fill(prompts, torch.zeros(OBS_DIM), torch.ones(OBS_DIM), n_seen=n_tasks)
    data = Transitions(
        obs=torch.randn(N, OBS_DIM, generator=gen),
        action=torch.rand(N, ACT_DIM, generator=gen) * 2 - 1,
        reward=torch.rand(N, generator=gen),
        next_obs=torch.randn(N, OBS_DIM, generator=gen),
        not_done=torch.ones(N),
        task_id=torch.randint(n_tasks, (N,), generator=gen),
    )
    return module, BatchStream(data, batch_size, 10**9, seed=0, rank=0, task_sampling="balanced")


def start_in_steady_state(module: LLMDPDModule, ema: Sequence[L.Callback]) -> None:
    """Start the module's update counter at ``ActorEMA.start`` (module docstring): the EMA then averages
    every ``every`` updates, as in all but the first ``start`` updates of a run."""
    module.updates = ema[0].start if ema else 0


def steady_state_trainer(
    module: LLMDPDModule,
    accelerator: str,
    precision: str,
    updates: int,
    ema: list[L.Callback],
    callbacks: Sequence[L.Callback],
    **kwargs: Any,
) -> L.Trainer:
    """A bare Trainer for ``updates`` updates, with the module's counter set to the EMA's steady state.

    The counter starts at ``ActorEMA.start`` (:func:`start_in_steady_state`).
    """
    start_in_steady_state(module, ema)
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=2 * updates,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, *ema],
        **kwargs,
    )


def count_flops(
    module: LLMDPDModule, stream: BatchStream, accelerator: str, precision: str, ema: list[L.Callback]
) -> float:
    """FLOPs per update, counted by FlopCounterMode around real training steps in the EMA's steady state.

    With an ``ActorEMA``, the EMA's prompt embeddings are recomputed only after its writes (every ``every``
    updates), so the count is the mean over ``every`` consecutive updates, one of which recomputes them.
    """
    counter = FlopCounterMode(display=False)
    n = ema[0].every if ema else 1

    class _Count(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 0:
                counter.__enter__()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2 * n:
                counter.__exit__(None, None, None)

    trainer = steady_state_trainer(module, accelerator, precision, n, ema, [_Count()])
    trainer.fit(module, train_dataloaders=stream)
    return counter.get_total_flops() / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--updates", type=int, default=200, help="timed updates per repeat")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument(
        "--float32-matmul-precision",
        choices=["highest", "high", "medium"],
        default="highest",
        help="as llmdpd's --float32_matmul_precision ('high': TF32 on NVIDIA GPUs); the peak is measured "
        "under the same setting",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the objectives (default: the config's model.compile)",
    )
    p.add_argument(
        "--ablate",
        nargs="*",
        default=[],
        choices=[
            "torch_mish",
            "unshared_context",
            "per_step_context",
            "unfused_adam",
            "log_every_update",
            "ema_every_update",
        ],
        help="undo these optimisations",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--paired",
        action="store_true",
        help="with --ablate: alternate each repeat with the all-on update in this process, report both",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("train_step.json"))
    args = p.parse_args()
    if args.paired and not args.ablate:
        p.error("--paired needs --ablate")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    torch.manual_seed(0)

    cfg = yaml.safe_load(args.config.read_text())
    compile_ = cfg.get("model", {}).get("compile", False) if args.compile is None else args.compile

    def timed(ablations: Sequence[str]) -> float:
        """updates/s of one fresh module and Trainer, after warm-up, with these optimisations undone."""
        torch._dynamo.reset()  # variants must not share compiled graphs
        with ablated(ablations):
            module, stream = build(
                args.config, args.batch_size, args.tasks, args.device, ablations, compile=compile_
            )
            timer = _Timer()
            trainer = steady_state_trainer(
                module,
                accelerator,
                args.precision,
                args.warmup + args.updates,
                ema_from_config(cfg),
                [timer],
                log_every_n_steps=1 if "log_every_update" in ablations else 50,
            )
            trainer.fit(module, train_dataloaders=stream)
        stamps = timer.stamps[args.warmup :]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    with ablated(args.ablate):
        module, stream = build(
            args.config, args.batch_size, args.tasks, args.device, args.ablate, compile=False
        )
        # Eager: compile does not change the FLOPs.
        flops = count_flops(module, stream, accelerator, args.precision, ema_from_config(cfg))
    # The roofline of a mixed-precision run is the matmul peak of its low-precision dtype.
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision.split("-")[0], torch.float32)
    rates, reference, peaks = [], [], []
    for repeat in range(args.repeats):
        if args.paired:  # alternate with the all-on update, in turn first, so both see the same machine
            for ablations in ((), args.ablate)[:: 1 if repeat % 2 == 0 else -1]:
                (rates if ablations else reference).append(timed(ablations))
        else:
            rates.append(timed(args.ablate))
        peaks.append(matmul_peaks(torch.device(args.device), dtype))
    peak, peak_json = peak_fields(*peaks)
    ups = statistics.median(rates)
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": str(args.config),
        "batch_size": args.batch_size,
        "tasks": args.tasks,
        "precision": args.precision,
        "float32_matmul_precision": args.float32_matmul_precision,
        "compile": compile_,
        "ablations": args.ablate,
        "warmup_updates": args.warmup,
        "timed_updates": args.updates,
        "updates_per_s": ups,
        "updates_per_s_repeats": rates,
        "gflop_per_update": flops / 1e9,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        **peak_json,
        "matmul_peak_gflops_repeats": [max(p.values()) / 1e9 for p in peaks],
        "roofline_fraction": ups * flops / peak,
        "roofline_fraction_repeats": [r * flops / peak for r in rates],
    }
    if args.paired:
        result["all_on_updates_per_s"] = statistics.median(reference)
        result["all_on_updates_per_s_repeats"] = reference
        result["paired_speedup_of_the_optimisation"] = statistics.median(
            [on / off for on, off in zip(reference, rates, strict=True)]
        )
    report(
        result,
        f"updates/s {ups:.2f} | {flops / 1e9:.2f} GFLOP/update | peak {peak / 1e9:.0f} GFLOP/s "
        f"({', '.join(f'{lib} {g:.0f}' for lib, g in peak_json['matmul_peak_gflops_by_library'].items())}; "
        f"after each repeat {min(result['matmul_peak_gflops_repeats']):.0f}–"
        f"{max(result['matmul_peak_gflops_repeats']):.0f}) | "
        f"roofline {100 * result['roofline_fraction']:.1f}% "
        f"(repeats {100 * min(result['roofline_fraction_repeats']):.1f}–"
        f"{100 * max(result['roofline_fraction_repeats']):.1f}%)",
        args.out,
    )


if __name__ == "__main__":
    main()
