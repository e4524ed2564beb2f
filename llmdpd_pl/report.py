"""``llmdpd report``: results of ``llmdpd test`` across seeds and arms, in the paper's table format.

    llmdpd report --protocol P3 --arm both 'results/p3/both_seed*.json'
        --arm none 'results/p3/none_seed*.json' [--baseline none] [--select last|best] [--paired]
        [--effect 10] [--out DIR]

Each ``--arm NAME GLOB`` is one arm (one results JSON per training seed). The metric is the suite's:
success % on Meta-World, D4RL's normalised score on locomotion. ``--select last`` reports the tested
checkpoint (the results rows); ``--select best`` reports, per seed and task, the best evaluation made
during fit (``meta.during_fit``), which is Diffusion-QL's online model selection and biased upwards.

Per task, and per split's mean over its tasks, the report gives each arm's metric as mean ± std over
seeds (as the paper reports) with the per-seed values, and each arm's difference from the ``--baseline``
arm judged on the seed means (:mod:`llmdpd_pl.stats`; the words are defined in ``docs/verdicts.md``):
Welch's t-test with its 95% interval and p-value, the minimum detectable effect (MDE) at 80% power, the
seeds per arm needed to detect ``--effect`` (the difference that matters, in the table's points), and the
verdict: **supported**, **inconclusive** or **no effect at this power**. ``--paired`` is for arms that
test the same checkpoints differently (e.g. paraphrased prompts): the i-th results JSON of each arm (in
glob order) must name the same checkpoint, and the paired t-test replaces Welch's.

``report.json`` also holds a two-level 95% bootstrap interval (seeds, then episodes; shown where an arm
has one seed) and the commits that trained the checkpoints (a warning names them when they differ). Only
shared tasks are compared; the rest are named. Writes ``report.md``, ``report.json``, ``report.png``.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmdpd_pl.errors import ConfigError
from llmdpd_pl.locomotion import normalized_score
from llmdpd_pl.rollouts import read_json
from llmdpd_pl.stats import ALPHA, MAX_SEEDS, POWER, compare
from llmdpd_pl.utils import atomic_write

Metric = Literal["success", "normalized_score"]
LABEL: dict[Metric, str] = {"success": "success %", "normalized_score": "D4RL normalised score"}
SELECT = {"last": "tested checkpoint (last)", "best": "best evaluation during fit (best)"}
SCALE: dict[Metric, float] = {"success": 100.0, "normalized_score": 1.0}  # value → the table's unit


@dataclass(frozen=True)
class Cell:
    """One seed's result on one task: its value and the distribution the bootstrap draws it from.

    Success (k of n episodes) is drawn from its Jeffreys posterior Beta(k + ½, n − k + ½), which keeps
    the uncertainty of a seed that succeeded in none or all of its episodes. A normalised score (mean of
    n episodes with std s) is drawn from Normal(mean, s / √n).
    """

    metric: Metric
    value: float
    a: float  # Beta α, or the Normal's mean
    b: float  # Beta β, or the Normal's standard error

    @classmethod
    def success(cls, k: int, n: int) -> Cell:
        return cls("success", k / n, k + 0.5, n - k + 0.5)

    @classmethod
    def score(cls, task: str, mean_return: float, return_std: float, n: int) -> Cell:
        mean = float(normalized_score(task, mean_return))
        std = float(normalized_score(task, mean_return + return_std)) - mean
        return cls("normalized_score", mean, mean, std / np.sqrt(n))


def cell(row: dict[str, Any]) -> Cell:
    """The :class:`Cell` of one results row (a test row or an evaluation during fit)."""
    if row.get("success_rate") is not None:
        return Cell.success(round(row["success_rate"] * row["episodes"]), row["episodes"])
    if row.get("normalized_score") is None:
        raise ConfigError("--arm", "a row has neither a success rate nor a normalised score", row["task"])
    return Cell.score(row["task"], row["mean_return"], row.get("return_std", 0.0), row["episodes"])


Arm = dict[str, dict[str, tuple[Cell, str]]]
"""seed label (the results JSON) → task → (cell, split)."""


def load_arm(pattern: str, select: Literal["last", "best"] = "last") -> Arm:
    """The agent's cells per seed and task, from the results JSONs matching ``pattern``: the test rows
    (``last``) or, per task, the evaluation during fit with the highest value (``best``)."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError("--arm", "no results JSON matches this pattern", pattern)
    arm: Arm = {}
    for path in paths:
        data = read_json(path, "--arm")
        rows = [r for r in data["results"] if r["policy"] == "agent"]
        if select == "best":
            history = [r for r in data["meta"].get("during_fit") or [] if r["policy"] == "agent"]
            if not history:
                raise ConfigError("--select", f"'best' needs evaluations during fit; {path} has none", select)
            tasks = dict.fromkeys(r["task"] for r in history)
            rows = [max((r for r in history if r["task"] == t), key=lambda r: cell(r).value) for t in tasks]
        arm[path] = {r["task"]: (cell(r), r["split"]) for r in rows}
    return arm


def bootstrap_difference(arm: Sequence[Sequence[Cell]], base: Sequence[Sequence[Cell]], n: int = 10_000,
                         seed: int = 0, paired: bool = False) -> tuple[float, float, float]:  # fmt: skip
    """Difference of the mean value, arm − base, with a two-level 95% bootstrap interval.

    Each arm is a list of seeds, each seed a list of cells over the tasks averaged. Each replicate draws
    each arm's seeds with replacement (``paired``: the same draw for both arms, whose i-th seeds are one
    checkpoint), then each drawn seed's value on each task from its cell's distribution, and takes the
    difference of the two arms' means. With one seed per arm the interval covers episodes only.
    """
    if paired and len(arm) != len(base):
        raise ValueError(f"a paired difference needs as many seeds per arm, not {len(arm)} and {len(base)}")
    rng = np.random.default_rng(seed)
    shared = rng.integers(len(base), size=(n, len(base))) if paired else None  # (n, S) for both arms

    def replicates(seeds: Sequence[Sequence[Cell]]) -> np.ndarray:
        a, b = (np.array([[getattr(c, f) for c in tasks] for tasks in seeds]) for f in "ab")  # (S, T)
        pick = rng.integers(len(seeds), size=(n, len(seeds))) if shared is None else shared  # (n, S) drawn
        draw = rng.beta if seeds[0][0].metric == "success" else rng.normal
        return draw(a[pick], b[pick]).mean(axis=(1, 2))  # (n,)

    def point(seeds: Sequence[Sequence[Cell]]) -> float:
        return float(np.mean([[c.value for c in tasks] for tasks in seeds]))

    low, high = np.percentile(replicates(arm) - replicates(base), [2.5, 97.5])
    return point(arm) - point(base), float(low), float(high)


def metric_of(arms: dict[str, Arm]) -> Metric:
    """The one metric of every cell of ``arms``."""
    metrics = {c.metric for arm in arms.values() for seed in arm.values() for c, _ in seed.values()}
    if len(metrics) != 1:
        raise ConfigError("--arm", "the results must all be success rates or all normalised scores",
                          sorted(metrics))  # fmt: skip
    return metrics.pop()


def _seeds(arm: Arm, tasks: Sequence[str]) -> list[list[Cell]]:
    """The cells of ``tasks``, per seed that ran them all."""
    return [[seed[t][0] for t in tasks] for seed in arm.values() if all(t in seed for t in tasks)]


def summarize(
    arms: dict[str, Arm], baseline: str | None, paired: bool = False, effect: float | None = None
) -> dict[str, Any]:
    """Per task, and per split's mean over its tasks: each arm's per-seed value, mean and std over seeds,
    and each arm's difference from ``baseline`` (``paired``: seed by seed) with its test, power and verdict
    (:func:`llmdpd_pl.stats.compare`; ``effect``, the difference that matters, in the metric's units,
    defaults to 10 points of the table) and a two-level bootstrap interval. Only the tasks of every seed of
    every arm."""
    effect = 10.0 / SCALE[metric_of(arms)] if effect is None else effect
    every = set.intersection(*(set(seed) for arm in arms.values() for seed in arm.values()))
    splits = {t: r[1] for arm in arms.values() for seed in arm.values() for t, r in seed.items()
              if t in every}  # fmt: skip
    groups = {t: [t] for t in splits}
    for split in dict.fromkeys(splits.values()):
        groups[f"mean {split}"] = [t for t in splits if splits[t] == split]
    table: dict[str, Any] = {}
    for label, tasks in groups.items():
        seeds = {name: _seeds(arm, tasks) for name, arm in arms.items()}
        values = {name: [float(np.mean([c.value for c in s])) for s in seeds[name]] for name in arms}
        row: dict[str, Any] = {}
        for name, v in values.items():
            std = float(np.std(v, ddof=1)) if len(v) > 1 else None  # one seed: no spread
            row[name] = {"seeds": v, "mean": float(np.mean(v)), "std": std}
        for name in [n for n in arms if baseline is not None and n != baseline]:
            base = str(baseline)
            diff = asdict(compare(values[name], values[base], effect, paired))
            _, low, high = bootstrap_difference(seeds[name], seeds[base], paired=paired)
            row[f"{name} - {baseline}"] = {**diff, "bootstrap_ci95": [low, high]}
        table[label] = row
    return table


def _difference(r: dict[str, Any], scale: float) -> str:
    """One difference as the table shows it: value [95% CI] p verdict (MDE, seeds needed)."""
    point = f"{scale * r['difference']:+.1f}"
    if r["verdict"] == "no test (1 seed)":
        low, high = (scale * v for v in r["bootstrap_ci95"])
        return f"{point} [{low:+.1f}, {high:+.1f}] episodes only: {r['verdict']}"
    if r["p_value"] is None:
        return f"{point} {r['verdict']}"
    ci = "" if r["ci95"] is None else " [{:+.1f}, {:+.1f}]".format(*(scale * v for v in r["ci95"]))
    p = "p<0.001" if r["p_value"] < 0.001 else f"p={r['p_value']:.3f}"
    needed = f"> {MAX_SEEDS}" if r["seeds_needed"] is None else r["seeds_needed"]
    return f"{point}{ci} {p} {r['verdict']} (MDE {scale * r['mde']:.1f}, {needed} seeds)"


def markdown(
    table: dict[str, Any], arms: Sequence[str], protocol: str, metric: Metric, select: str,
    effect: float = 10.0, paired: bool = False,
) -> str:  # fmt: skip
    """The summary as a markdown table: the metric's mean ± std (per-seed values), or its one seed's value
    marked "(1 seed)", then the differences. ``effect`` is in the table's units."""
    diffs = sorted({k for row in table.values() for k in row if " - " in k})
    head, scale = ["task", *arms, *diffs], SCALE[metric]
    test = "paired t-test on the per-seed differences" if paired else "Welch t-test on the seed means"
    lines = [f"**{protocol}** — {LABEL[metric]} of the {SELECT[select]}, mean ± std over seeds (per-seed "
             f"values); differences: {test}, 95% CI, p-value and verdict (docs/verdicts.md), then the "
             f"minimum detectable effect at 80% power (MDE) and the seeds per arm needed to detect "
             f"{effect:g} points", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for task, row in table.items():
        cells = [task]
        for name in arms:
            r = row[name]
            seeds = ", ".join(f"{scale * v:.0f}" for v in r["seeds"])
            spread = "(1 seed)" if r["std"] is None else f"± {scale * r['std']:.1f} ({seeds})"
            cells.append(f"{scale * r['mean']:.1f} {spread}")
        cells += [_difference(row[d], scale) for d in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(table: dict[str, Any], arms: Sequence[str], title: str, metric: Metric) -> bytes:
    """The metric per task, one bar per arm, error bars = std over seeds (the paper's Figure 2 style)."""
    from matplotlib.figure import Figure  # no pyplot: no backend is chosen for the user

    tasks, width, scale = [t for t in table if not t.startswith("mean ")], 0.8 / len(arms), SCALE[metric]
    ax = (fig := Figure(figsize=(1.6 * len(tasks) + 2, 3.5))).subplots()
    for i, name in enumerate(arms):
        means = [scale * table[t][name]["mean"] for t in tasks]
        stds = [scale * (table[t][name]["std"] or 0.0) for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=name)  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel(LABEL[metric])
    if metric == "success":
        ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def training_commits(arms: dict[str, Arm]) -> dict[str, list[str]]:
    """The commit that trained each results JSON's checkpoint (``meta.train_commit``) → those JSONs."""
    commits: dict[str, list[str]] = {}
    for path in (p for arm in arms.values() for p in arm):
        meta = read_json(path, "--arm")["meta"]
        commit = meta.get("train_commit") or f"unrecorded (tested at {meta.get('commit')})"
        commits.setdefault(commit, []).append(path)
    return commits


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="llmdpd report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "GLOB"), required=True)
    p.add_argument("--baseline", default=None, help="the arm every other arm is compared with")
    p.add_argument("--select", choices=["last", "best"], default="last",
                   help="the tested checkpoint (last), or the best evaluation during fit (best)")  # fmt: skip
    p.add_argument("--protocol", default="results", help="the protocol's label, in every table")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder of report.{md,json,png}")
    p.add_argument("--paired", action="store_true", help="the arms test the same checkpoints: seed by seed")
    p.add_argument("--effect", type=float, default=10.0,
                   help="the difference that matters, in the table's units (points): it sets the verdict "
                        "'inconclusive' against 'no effect at this power', and the seeds needed")  # fmt: skip
    args = p.parse_args(argv)
    if not args.effect > 0:
        raise ConfigError("--effect", "must be > 0 (the difference that matters, in points)", args.effect)
    arms = {name: load_arm(pattern, args.select) for name, pattern in args.arm}
    if args.baseline is not None and args.baseline not in arms:
        p.error(f"--baseline {args.baseline!r} is not an --arm ({sorted(arms)})")
    if args.paired:
        checkpoints = {name: [read_json(f, "--arm")["meta"].get("ckpt_path") for f in arm]
                       for name, arm in arms.items()}  # fmt: skip
        if len({tuple(c) for c in checkpoints.values()}) > 1 or None in next(iter(checkpoints.values())):
            p.error(f"--paired needs the same checkpoints in every arm, in glob order; got {checkpoints}")
    tasks = [set(seed) for arm in arms.values() for seed in arm.values()]
    every = tasks[0].intersection(*tasks[1:])
    dropped = sorted(tasks[0].union(*tasks[1:]) - every)
    if not every:
        raise ConfigError("--arm", "the results JSONs share no task: nothing to compare", dropped)
    if dropped:
        print(f"note: tasks not in every results JSON are left out: {dropped}", file=sys.stderr)
    if len(commits := training_commits(arms)) > 1:
        print(f"warning: the checkpoints are from {len(commits)} commits: {sorted(commits)}", file=sys.stderr)
    metric = metric_of(arms)
    effect = args.effect / SCALE[metric]
    table = summarize(arms, args.baseline, args.paired, effect)
    text = markdown(table, list(arms), args.protocol, metric, args.select, args.effect, args.paired)
    data = {"protocol": args.protocol, "select": args.select, "metric": metric, "alpha": ALPHA,
            "power": POWER, "effect": effect, "arms": {n: list(a) for n, a in arms.items()},
            "train_commits": commits, "dropped_tasks": dropped, "tasks": table}  # fmt: skip
    atomic_write(args.out / "report.json", json.dumps(data, indent=2).encode())
    atomic_write(args.out / "report.md", (text + "\n").encode())
    png = bar_chart(table, list(arms), f"{args.protocol} ({args.select})", metric)
    atomic_write(args.out / "report.png", png)
    print(text)
    print(args.out / "report.md")
