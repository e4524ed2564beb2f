"""Collection throughput of ``llmdpd collect``: transitions/s, end to end (env, scripted policy, HDF5 write).

    python benchmarks/collect.py [--tasks sweep-into coffee-push] [--episodes 10] [--workers 2]

Collects a fresh dataset per task into a temporary folder (nothing is reused) and times it.
Prints the figures and writes JSON next to this file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import report

from llmdpd_pl.data.collect import collect
from llmdpd_pl.data.spec import DatasetSpec, QualityLevel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sweep-into", "coffee-push"])
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (medium level)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("collect.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        spec = DatasetSpec(
            root=root,
            levels={"medium": QualityLevel(args.episodes, 0.5, 0.3)},
            prompt_episodes=1,
            workers=args.workers,
        )
        t = time.perf_counter()
        rows = collect(spec, args.tasks, [], progress=False)
        seconds = time.perf_counter() - t
    transitions = sum(r["transitions"] for r in rows)
    result = {
        "tasks": args.tasks,
        "workers": args.workers,
        "episodes_per_task": args.episodes,
        "transitions": transitions,
        "seconds": seconds,
        "transitions_per_s": transitions / seconds,
    }
    report(
        result,
        f"{transitions} transitions in {seconds:.1f} s: {transitions / seconds:.0f} transitions/s",
        args.out,
    )


if __name__ == "__main__":
    main()
