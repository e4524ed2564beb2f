"""The statistics behind a verdict of ``llmdpd report``: a t-test on the seed means, and its power.

The unit of inference is the seed: one number per training seed and arm, the seed's mean over the tasks
of a row, each task's value already the mean of its episodes, so the episode noise is inside it. Two arms
are compared by Welch's t-test (independent seeds), or by the paired t-test on the per-seed differences
when the i-th seed of each arm is the same checkpoint. Both are scipy's (``scipy.stats.ttest_ind``,
``ttest_rel``), with their 95% intervals. Power comes from the noncentral t (``scipy.stats.nct``).

The verdict words are defined in ``docs/verdicts.md``:

- **supported**: the test rejects "no difference" at two-sided α = 0.05;
- **inconclusive**: it does not, and the minimum detectable effect (MDE) at 80% power is larger than the
  effect that matters;
- **no effect at this power**: it does not, and the MDE is at most the effect that matters;
- **no test (1 seed)**: an arm has one seed, so there is no spread between seeds to test against;
- **no test (no spread)**: every seed of each arm has the same value (or every paired difference is the
  same) but the arms differ, so the t statistic is infinite; with 50 episodes a seed, that is chance.

Values are in the metric's own units throughout (a success rate as a fraction).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05  # two-sided level of every test
POWER = 0.8  # the power at which the minimum detectable effect is given
MAX_SEEDS = 100_000  # seeds_needed is None beyond this
NO_SPREAD = 1e-9  # a spread below this (in the metric's units) is zero: float noise of equal seeds

TestName = Literal["Welch t-test", "paired t-test"]
Verdict = Literal["supported", "inconclusive", "no effect at this power", "no test (1 seed)",
                  "no test (no spread)"]  # fmt: skip


@dataclass(frozen=True)
class TTest:
    """One t-test of arm − base on the seed means.

    ``std`` is the spread the test divides by: the pooled std of the two arms' seeds (Welch), or the std
    of the per-seed differences (paired). ``sizes`` is (seeds of arm, seeds of base).
    """

    name: TestName
    difference: float
    ci95: tuple[float, float]
    p_value: float
    std: float
    sizes: tuple[int, int]


def pooled_std(arm: np.ndarray, base: np.ndarray) -> float:
    """s_p = √(((n₁ − 1) s₁² + (n₂ − 1) s₂²) / (n₁ + n₂ − 2)), with s the std over seeds (ddof 1)."""
    n1, n2 = len(arm), len(base)
    return float(np.sqrt(((n1 - 1) * arm.var(ddof=1) + (n2 - 1) * base.var(ddof=1)) / (n1 + n2 - 2)))


def t_test(arm: Sequence[float], base: Sequence[float], paired: bool = False) -> TTest:
    """Welch's t-test of mean(arm) − mean(base), or (``paired``) the t-test of the mean of armᵢ − baseᵢ,
    with scipy's p-value and 95% interval. Needs at least two seeds per arm and some spread."""
    a, b = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    if paired and len(a) != len(b):
        raise ValueError(f"a paired difference needs as many seeds per arm, not {len(a)} and {len(b)}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a t-test needs at least 2 seeds per arm, not {len(a)} and {len(b)}")
    with warnings.catch_warnings():  # one arm's seeds all equal: scipy warns, and its answer is right
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        if paired:
            result, std = stats.ttest_rel(a, b), float(np.std(a - b, ddof=1))
        else:
            result, std = stats.ttest_ind(a, b, equal_var=False), pooled_std(a, b)
    low, high = result.confidence_interval(1 - ALPHA)
    name: TestName = "paired t-test" if paired else "Welch t-test"
    return TTest(name, float(a.mean() - b.mean()), (float(low), float(high)), float(result.pvalue), std,
                 (len(a), len(b)))  # fmt: skip


def power(ncp: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided t-test: 1 − β = P(T > t_{1−α/2,ν}) + P(T < −t_{1−α/2,ν}), T ~ t'(ν, δ),
    the noncentral t with ν = ``df`` degrees of freedom and noncentrality δ = ``ncp``."""
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, ncp) + stats.nct.sf(critical, df, -ncp))  # lower tail by symmetry


@lru_cache(maxsize=4096)
def standardized_mde(n_arm: int, n_base: int, paired: bool = False) -> float:
    """The minimum detectable effect in units of the seeds' std: the d with power(δ, ν) = 0.8, where

    two arms: δ = d √(n₁ n₂ / (n₁ + n₂)), ν = n₁ + n₂ − 2 (the two-sample t-test at the pooled std);
    paired:   δ = d √n, ν = n − 1 (the one-sample t-test of the n differences).
    """
    if min(n_arm, n_base) < 2:
        raise ValueError(f"power needs at least 2 seeds per arm, not {n_arm} and {n_base}")
    if paired and n_arm != n_base:
        raise ValueError(f"a paired difference needs as many seeds per arm, not {n_arm} and {n_base}")
    if paired:
        df, scale = n_arm - 1, np.sqrt(n_arm)
    else:
        df, scale = n_arm + n_base - 2, np.sqrt(n_arm * n_base / (n_arm + n_base))
    ncp = optimize.brentq(lambda c: power(c, df) - POWER, 0.0, 50.0)  # power(50, ν ≥ 1) > 0.99
    return float(ncp / scale)


def minimum_detectable_effect(std: float, n_arm: int, n_base: int, paired: bool = False) -> float:
    """MDE = d* σ: the smallest true difference the test finds with 80% power at α = 0.05, for a spread
    σ = ``std`` (pooled over the arms, or of the paired differences) and these seed counts."""
    return std * standardized_mde(n_arm, n_base, paired)


def seeds_needed(effect: float, std: float, paired: bool = False) -> int | None:
    """The fewest seeds per arm, n ≥ 2, with MDE(σ, n, n) ≤ ``effect``: what it takes to detect the effect
    that matters with 80% power. None beyond :data:`MAX_SEEDS`."""
    if not effect > 0:
        raise ValueError(f"the effect that matters must be > 0, not {effect}")

    def detects(n: int) -> bool:
        return minimum_detectable_effect(std, n, n, paired) <= effect

    if detects(2):
        return 2
    low, high = 2, 4  # detects(n) is monotone in n: double, then bisect
    while not detects(high):
        if high >= MAX_SEEDS:
            return None
        low, high = high, min(2 * high, MAX_SEEDS)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if detects(mid) else (mid, high)
    return high


def verdict(p_value: float, mde: float, effect: float) -> Verdict:
    """supported if p < α; otherwise inconclusive if MDE > effect, else no effect at this power."""
    if p_value < ALPHA:
        return "supported"
    return "inconclusive" if mde > effect else "no effect at this power"


@dataclass(frozen=True)
class Difference:
    """arm − base on the seed means: the test, its power, and the verdict. A field that the seeds at
    hand cannot give (one seed, no spread) is None."""

    difference: float
    ci95: tuple[float, float] | None
    test: TestName | None
    p_value: float | None
    mde: float | None
    seeds_needed: int | None
    verdict: Verdict


def compare(arm: Sequence[float], base: Sequence[float], effect: float, paired: bool = False) -> Difference:
    """The verdict on arm − base, from one value per seed of each arm; ``effect`` is the difference that
    matters. The MDE and seeds_needed use the spread the test divides by (:attr:`TTest.std`)."""
    if not effect > 0:
        raise ValueError(f"the effect that matters must be > 0, not {effect}")
    if paired and len(arm) != len(base):
        raise ValueError(f"a paired difference needs as many seeds per arm, not {len(arm)} and {len(base)}")
    point = float(np.mean(arm) - np.mean(base))
    if min(len(arm), len(base)) < 2:
        return Difference(point, None, None, None, None, None, "no test (1 seed)")
    a, b = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    spread = float(np.std(a - b, ddof=1)) if paired else pooled_std(a, b)
    if spread < NO_SPREAD:  # seeds (paired: differences) all equal: scipy's t is 0/0 or ±∞
        if abs(point) >= NO_SPREAD:
            return Difference(point, None, None, None, None, None, "no test (no spread)")
        name: TestName = "paired t-test" if paired else "Welch t-test"
        ci95, p_value, std = None, 1.0, 0.0  # equal arms, seed for seed: nothing to reject, no interval
    else:
        test = t_test(arm, base, paired)
        name, ci95, p_value, std = test.name, test.ci95, test.p_value, test.std
    mde = minimum_detectable_effect(std, len(a), len(b), paired)
    return Difference(point, ci95, name, p_value, mde, seeds_needed(effect, std, paired),
                      verdict(p_value, mde, effect))  # fmt: skip
