"""One side of ``train_step.py --paired``: runs a source tree's own update in blocks, on request.

    python benchmarks/ab_worker.py TREE CONFIG WARMUP

Imports ``llmdpd_pl`` and the benchmark's ``updater`` from TREE, not from this checkout, so each side of
the A/B runs its own commit's code. Builds and warms up the update, prints ``AB ready``, then for each line
``N`` on stdin runs N updates and prints ``AB <updates/s>``; stops at end of input. Inductor's on-disk
caches are off, so the process compiles its own graphs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> None:
    tree, config, warmup = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]  # before this checkout's copies
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    from train_step import updater

    step = updater(config, warmup)
    import llmdpd_pl

    if Path(llmdpd_pl.__file__).resolve().parent.parent != tree.resolve():
        raise RuntimeError(f"llmdpd_pl was imported from {llmdpd_pl.__file__}, not from {tree}")
    print("AB ready", flush=True)
    for line in sys.stdin:
        updates = int(line)
        t = time.perf_counter()
        for _ in range(updates):
            step()
        print(f"AB {updates / (time.perf_counter() - t)}", flush=True)


if __name__ == "__main__":
    main()
