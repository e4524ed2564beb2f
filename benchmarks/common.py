"""What every benchmark shares: the matmul peak (the roofline's denominator), the run's identity, and
the common tail that prints the figures and writes them as JSON.

The JSON files are written next to the scripts and are not committed (``docs/performance.md`` holds the
current figures with their commands).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from llmdpd_pl.utils import atomic_write, git_commit


def run_identity() -> dict[str, Any]:
    """The git commit (with ``+dirty`` for uncommitted changes), machine, threads and torch version."""
    return {
        "commit": git_commit() or "unknown",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def report(result: dict[str, Any], summary: str, out: Path) -> None:
    """Print ``result`` (with :func:`run_identity`) as JSON and the ``summary`` line, write the JSON to
    ``out``, and print its path last."""
    text = json.dumps({**run_identity(), **result}, indent=2)
    print(text)
    print(summary)
    print(atomic_write(out, text.encode()))


def matmul_peaks(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 20
) -> dict[str, float]:
    """Best FLOP/s of an n×n matmul in ``dtype`` on ``device``, per library PyTorch can run it with.

    ``aten`` is ``a @ b``, the path the model's own matmuls take (MKL on x86 CPUs, cuBLAS on CUDA).
    On CPU, ``onednn`` is oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the same arithmetic in
    the same dtype). On 2 cores of an AMD EPYC (Zen 4) MKL reaches about 185 GFLOP/s and oneDNN about 215,
    so the machine's peak is the best of the two.
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

    Shared machines have slow spells in which the peak itself drops (seen: 111 GFLOP/s instead of about
    215). A benchmark therefore measures it more than once, around what it times, so that a slow spell
    during one measurement cannot inflate a fraction (``docs/performance.md``).
    """
    peaks = {library: max(m[library] for m in measurements) for library in measurements[0]}
    peak = max(peaks.values())
    gflops = {library: p / 1e9 for library, p in peaks.items()}
    return peak, {"matmul_peak_gflops": peak / 1e9, "matmul_peak_gflops_by_library": gflops}
