"""The machine's matmul peak per library and matrix size: the roofline's denominator in ``train_step.py``.

    python benchmarks/matmul_peak.py [--sizes 1024 2048 3072 4096] [--dtype float32] [--device cpu]

Times an n×n matmul with each library PyTorch can run it with (``train_step.matmul_peaks``: ATen's
``a @ b`` and, on CPU, oneDNN), best of 20 calls per size. Prints a table, writes JSON next to this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from report import report
from train_step import matmul_peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("matmul_peak.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gflops = {n: {lib: f / 1e9 for lib, f in matmul_peaks(device, dtype, n).items()} for n in args.sizes}
    libraries = list(gflops[args.sizes[0]])
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gflops": gflops,
        "peak_gflops": max(max(row.values()) for row in gflops.values()),
    }
    lines = [f"{'n':>6s} " + " ".join(f"{lib:>8s}" for lib in libraries) + "  (GFLOP/s)"]
    lines += [f"{n:6d} " + " ".join(f"{row[lib]:8.1f}" for lib in libraries) for n, row in gflops.items()]
    report(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
