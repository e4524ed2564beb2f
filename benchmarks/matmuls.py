"""The update's matmuls as they run inside it: time, FLOPs and GFLOP/s per op and shape, and their total.

    python benchmarks/matmuls.py [--config configs/metaworld.yaml] [--updates 20] [--warmup 30]

The update is ``ab_blocks.py``'s plain loop over the real ``LLMDPDModule.update`` (the config's model,
``compile`` and EMA, 3 tasks, batch 256). ``torch.profiler`` records ``--updates`` of them with input shapes;
each ``addmm``, ``mm``, ``bmm`` and ``baddbmm`` call's FLOPs follow from its shapes. The total says how
much of an update the matmul kernels take, and so what the rest (everything outside them) takes. The
profiler lengthens the update (it records every op), so the same number of updates is first timed without
it, just before, and "outside the matmuls" is that time minus the matmuls'. CPU only. Prints a table,
writes JSON next to this file.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ab_blocks import updater, variant
from report import report
from torch.profiler import ProfilerActivity, profile
from train_step import matmul_peaks, peak_fields


def matmul_flops(op: str, shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of one call from its input shapes: 2·M·K·N per matrix product, times the batch."""
    if op in ("aten::addmm", "aten::baddbmm"):
        shapes = shapes[1:]  # the bias comes first
    a, b = shapes[0], shapes[1]
    return 2 * (a[0] * a[1] * b[1] if len(a) == 2 else a[0] * a[1] * a[2] * b[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/metaworld.yaml"))
    p.add_argument("--updates", type=int, default=20, help="profiled updates")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--top", type=int, default=12, help="shapes printed")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("matmuls.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    before = matmul_peaks(torch.device("cpu"))  # and after the profile: the best of both (peak_fields)
    with variant("current"):
        step = updater(args.config, "current", args.warmup).step
        start = time.perf_counter()
        for _ in range(args.updates):
            step()
        update_ms = 1e3 * (time.perf_counter() - start) / args.updates
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(args.updates):
                step()
            profiled_ms = 1e3 * (time.perf_counter() - start) / args.updates
    ops = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")
    rows = [
        {
            "op": e.key.removeprefix("aten::"),
            "shapes": [list(s) for s in e.input_shapes if s],
            "calls": e.count / args.updates,
            "ms": e.self_cpu_time_total / 1e3 / args.updates,
            "mflop": matmul_flops(e.key, e.input_shapes) * e.count / args.updates / 1e6,
        }
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ops
    ]
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["gflops"] = r["mflop"] / r["ms"] if r["ms"] else 0.0
    after = matmul_peaks(torch.device("cpu"))
    peak, peak_json = peak_fields(before, after)
    ms, mflop = sum(r["ms"] for r in rows), sum(r["mflop"] for r in rows)
    result = {
        "config": str(args.config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "profiled_updates": args.updates,
        "update_ms": update_ms,
        "profiled_update_ms": profiled_ms,
        "matmul_ms": ms,
        "matmul_gflop": mflop / 1e3,
        "matmul_gflops": mflop / ms,
        **peak_json,
        "by_shape": rows,
    }
    lines = [f"{'op':8s} {'shapes':58s} {'calls':>6s} {'ms':>7s} {'MFLOP':>8s} {'GFLOP/s':>8s}"]
    for r in rows[: args.top]:
        lines.append(
            f"{r['op']:8s} {str(r['shapes'])[:58]:58s} {r['calls']:6.1f} {r['ms']:7.3f} {r['mflop']:8.1f} "
            f"{r['gflops']:8.1f}"
        )
    lines.append(
        f"matmuls {ms:.2f} ms of a {update_ms:.2f} ms update ({profiled_ms:.2f} profiled) | "
        f"{mflop / 1e3:.2f} GFLOP at "
        f"{mflop / ms:.0f} GFLOP/s = {100 * mflop / ms / (peak / 1e9):.0f}% of the peak, "
        f"{peak / 1e9:.0f} GFLOP/s | outside the matmuls: {update_ms - ms:.2f} ms"
    )
    report(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
