"""``llmdpd report``: results of ``llmdpd test`` across seeds and arms, in the paper's table format.

    llmdpd report --protocol P3 --arm both 'results/p3/both_seed*.json'
        --arm none 'results/p3/none_seed*.json' [--baseline none] [--out results/p3/report]

Each ``--arm NAME GLOB`` is one arm (one results JSON per training seed). Per task the report gives each
arm's success as mean ± std over seeds (as the paper reports) with the per-seed values, and each arm's
difference from the ``--baseline`` arm with a 95% bootstrap interval at both levels of the experiment
(the seeds of each arm; within each, the success rate's posterior given its episodes). A difference is
"supported" only if its interval excludes zero and each arm has at least two seeds. Only the tasks that
every results JSON holds are compared. Writes ``report.md``, ``report.json`` and ``report.png`` (the
paper's Figure 2 style: success per task, one bar per arm, error bars = std over seeds).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmdpd_pl.errors import ConfigError
from llmdpd_pl.utils import atomic_write


def load_arm(pattern: str) -> Arm:
    """seed label → task → (successes, episodes, split) of the agent, from the results JSONs matching
    ``pattern``."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError("--arm", "no results JSON matches this pattern", pattern)
    arm = {}
    for path in paths:
        rows = [r for r in json.loads(Path(path).read_text())["results"] if r["policy"] == "agent"]
        arm[path] = {r["task"]: (round(r["success_rate"] * r["episodes"]), r["episodes"], r["split"])
                     for r in rows}  # fmt: skip
    return arm


def bootstrap_difference(
    arm: Sequence[Sequence[tuple[int, int]]], base: Sequence[Sequence[tuple[int, int]]], n: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Difference of mean success, arm − base, with a two-level 95% bootstrap interval.

    Each arm is a list of seeds, each seed a list of (successes k, episodes n) over the tasks averaged.
    Each replicate draws each arm's seeds with replacement, then each drawn seed's success rate on each
    task from its Jeffreys posterior Beta(k + ½, n − k + ½), and takes the difference of the two arms'
    mean rates. Unlike resampling episodes, the posterior keeps the uncertainty of a seed that succeeded
    in none or all of its episodes. With one seed per arm the interval covers episodes only.
    """  # fmt: skip
    rng = np.random.default_rng(seed)

    def replicates(seeds: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray:
        k, e = np.array(seeds, dtype=float).transpose(2, 0, 1)  # (S, T) each
        pick = rng.integers(len(seeds), size=(n, len(seeds)))  # (n, S) seeds drawn
        return rng.beta(k[pick] + 0.5, e[pick] - k[pick] + 0.5).mean(axis=(1, 2))  # (n,)

    def point(seeds: Sequence[Sequence[tuple[int, int]]]) -> float:
        return float(np.mean([[k / e for k, e in tasks] for tasks in seeds]))

    low, high = np.percentile(replicates(arm) - replicates(base), [2.5, 97.5])
    return point(arm) - point(base), float(low), float(high)


Arm = dict[str, dict[str, tuple[int, int, str]]]
"""seed label → task → (successes, episodes, split)."""


def _seeds(arm: Arm, tasks: Sequence[str]) -> list[list[tuple[int, int]]]:
    """(successes, episodes) of ``tasks``, per seed that ran them all."""
    return [[seed[t][:2] for t in tasks] for seed in arm.values() if all(t in seed for t in tasks)]


def summarize(arms: dict[str, Arm], baseline: str | None) -> dict[str, Any]:
    """Per task, and per split's mean over its tasks: each arm's per-seed success, mean and std over seeds,
    and each arm's difference from ``baseline``. Only the tasks of every seed of every arm."""
    every = set.intersection(*(set(seed) for arm in arms.values() for seed in arm.values()))
    splits = {t: r[2] for arm in arms.values() for seed in arm.values() for t, r in seed.items()
              if t in every}  # fmt: skip
    groups = {t: [t] for t in splits}
    for split in dict.fromkeys(splits.values()):
        groups[f"mean {split}"] = [t for t in splits if splits[t] == split]
    table: dict[str, Any] = {}
    for label, tasks in groups.items():
        seeds = {name: _seeds(arm, tasks) for name, arm in arms.items()}
        row: dict[str, Any] = {}
        for name in arms:
            rates = [float(np.mean([k / e for k, e in s])) for s in seeds[name]]
            std = float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0
            row[name] = {"seeds": rates, "mean": float(np.mean(rates)), "std": std}
        for name in [n for n in arms if baseline is not None and n != baseline]:
            base = seeds[str(baseline)]
            point, low, high = bootstrap_difference(seeds[name], base)
            if not (low > 0 or high < 0):
                verdict = "not supported"
            else:  # with one seed per arm, the interval says nothing of the seeds' spread
                verdict = "supported" if min(len(seeds[name]), len(base)) > 1 else "episodes only (1 seed)"
            row[f"{name} - {baseline}"] = {"difference": point, "ci95": [low, high], "verdict": verdict}
        table[label] = row
    return table


def markdown(table: dict[str, Any], arms: Sequence[str], protocol: str) -> str:
    """The summary as a markdown table: success % mean ± std (per-seed values), then the differences."""
    diffs = sorted({k for row in table.values() for k in row if " - " in k})
    head = ["task", *arms, *diffs]
    lines = [f"**{protocol}** — success %, mean ± std over seeds (per-seed values); differences with 95% "
             "bootstrap intervals over seeds and episodes", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for task, row in table.items():
        cells = [task]
        for name in arms:
            r = row[name]
            seeds = ", ".join(f"{100 * v:.0f}" for v in r["seeds"])
            cells.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} ({seeds})")
        for d in diffs:
            r = row[d]
            low, high = r["ci95"]
            cells.append(f"{100 * r['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] {r['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(table: dict[str, Any], arms: Sequence[str], protocol: str) -> bytes:
    """Success per task, one bar per arm, error bars = std over seeds (the paper's Figure 2 style), as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no backend is chosen for the user

    tasks, width = [t for t in table if not t.startswith("mean ")], 0.8 / len(arms)
    fig = Figure(figsize=(1.6 * len(tasks) + 2, 3.5))
    ax = fig.subplots()
    for i, name in enumerate(arms):
        means = [100 * table[t][name]["mean"] for t in tasks]
        stds = [100 * table[t][name]["std"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=name)  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("success %")
    ax.set_ylim(0, 105)
    ax.set_title(protocol)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="llmdpd report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "GLOB"), required=True)
    p.add_argument("--baseline", default=None, help="the arm every other arm is compared with")
    p.add_argument("--protocol", default="results", help="the protocol's label, in every table")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder of report.{md,json,png}")
    args = p.parse_args(argv)
    arms = {name: load_arm(pattern) for name, pattern in args.arm}
    if args.baseline is not None and args.baseline not in arms:
        p.error(f"--baseline {args.baseline!r} is not an --arm ({sorted(arms)})")
    table = summarize(arms, args.baseline)
    text = markdown(table, list(arms), args.protocol)
    data = {"protocol": args.protocol, "arms": {n: list(a) for n, a in arms.items()}, "tasks": table}
    atomic_write(args.out / "report.json", json.dumps(data, indent=2).encode())
    atomic_write(args.out / "report.md", (text + "\n").encode())
    atomic_write(args.out / "report.png", bar_chart(table, list(arms), args.protocol))
    print(text)
    print(args.out / "report.md")
