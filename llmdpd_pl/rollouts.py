"""Rollout evaluation: return and length on every task; on Meta-World the success rate (95% Wilson
interval) and steps to success; on locomotion with D4RL reference returns, the normalised score.

A Meta-World episode is a success if ``info["success"]`` is ever true within its 500 steps. Episodes
are identified by an integer id: a locomotion episode ``i`` is ``reset(seed=i)``; a Meta-World episode
``i`` runs layout ``i mod 50`` of the task's evaluation benchmark (Meta-World ignores ``reset(seed)``, so
:class:`~llmdpd_pl.envs.LayoutReset` sets the layout itself). Episodes are thus reproducible, and DDP
ranks shard them exactly: rank r runs ids r, r+W, r+2W, ... and the counts are summed, so 7 episodes
on 2 ranks are 7 episodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from llmdpd_pl import hidden_goal
from llmdpd_pl.envs import scripted_policy
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.locomotion import normalized_score, reference
from llmdpd_pl.suites import dims, episode_steps, make_eval_envs, suite_of
from llmdpd_pl.utils import atomic_write

#: policy(obs (N, S) float64, task) → actions (N, A) in [-1, 1]
PolicyFn = Callable[[np.ndarray, str], np.ndarray]


@dataclass
class Counts:
    """Additive episode statistics of one task (summed across DDP ranks)."""

    episodes: int = 0
    successes: int = 0
    return_sum: float = 0.0
    length_sum: float = 0.0
    first_success_sum: float = 0.0  # over successful episodes
    return_sq_sum: float = 0.0

    def as_array(self) -> np.ndarray:
        return np.array(
            [self.episodes, self.successes, self.return_sum, self.length_sum, self.first_success_sum,
             self.return_sq_sum]
        )  # fmt: skip

    @classmethod
    def from_array(cls, a: Sequence[float]) -> Counts:
        return cls(int(round(a[0])), int(round(a[1])), float(a[2]), float(a[3]), float(a[4]), float(a[5]))

    def __add__(self, other: Counts) -> Counts:
        return Counts.from_array(self.as_array() + other.as_array())


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion p̂ = successes / n.

    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class TaskResult:
    """One row of the results table: ``policy`` is ``agent`` or a reference (``expert``, ``expert-blind``);
    ``prompt_source`` names the task whose prompts conditioned the agent when not its own (the prompt
    matrix), else None. Success fields are None on locomotion; the normalised score (mean over episodes,
    %) is None on Meta-World and on envs without D4RL reference returns."""

    task: str
    split: str
    policy: str
    episodes: int
    success_rate: float | None
    ci_low: float | None
    ci_high: float | None
    mean_return: float
    mean_length: float
    mean_steps_to_success: float | None
    return_std: float = 0.0
    normalized_score: float | None = None
    prompt_source: str | None = None

    @classmethod
    def from_counts(cls, task: str, split: str, policy: str, c: Counts) -> TaskResult:
        n = max(c.episodes, 1)
        mean = c.return_sum / n
        std = float(np.sqrt(max(c.return_sq_sum / n - mean * mean, 0.0)))
        if suite_of(task) == "locomotion":
            score = float(normalized_score(task, mean)) if reference(task) and c.episodes else None
            return cls(
                task, split, policy, c.episodes, None, None, None, mean, c.length_sum / n, None, std, score
            )
        lo, hi = wilson_interval(c.successes, c.episodes)
        t_success = c.first_success_sum / c.successes if c.successes else None
        return cls(
            task, split, policy, c.episodes, c.successes / n, lo, hi, mean, c.length_sum / n, t_success, std
        )


def shard(episodes: int, rank: int, world_size: int) -> list[int]:
    """Episode ids of this rank: every id in [0, episodes) lands on exactly one rank."""
    return list(range(rank, episodes, world_size))


def run_episodes(
    policy: PolicyFn,
    task: str,
    episode_ids: Sequence[int],
    num_envs: int,
    seed: int,
    max_steps: int | None = None,
    vectorization: Literal["sync", "async"] = "sync",
    progress: tqdm | None = None,
    envs: gym.vector.VectorEnv | None = None,
    check: Callable[[], None] | None = None,
) -> Counts:
    """Run the given episodes of ``task`` in waves of ``num_envs`` parallel envs; return their counts.

    ``check`` is called before every step; it stops the rollouts by raising (a SIGTERM, for instance).

    An episode lasts at most ``max_steps`` (default: the task's full episode). A wave ends when all its
    episodes have; an env whose episode ended early (a locomotion fall) is masked out of the counts. With
    SAME_STEP autoreset the last step's ``info`` belongs to the new episode, and its ``success`` is read
    from ``info["final_info"]``.
    """
    max_steps = episode_steps(task) if max_steps is None else max_steps
    counts = Counts()
    if not episode_ids:
        return counts
    own = envs is None
    if envs is None:
        envs = make_eval_envs(task, min(num_envs, len(episode_ids)), seed, vectorization)
    n_envs = envs.num_envs
    try:
        for start in range(0, len(episode_ids), n_envs):
            ids = list(episode_ids[start : start + n_envs])
            n = len(ids)
            obs, _ = envs.reset(seed=ids + ids[-1:] * (n_envs - n))  # pad a short wave; ignored below
            ret, length = np.zeros(n_envs), np.zeros(n_envs)
            first = np.full(n_envs, -1)
            alive = np.ones(n_envs, bool)
            for t in range(max_steps):
                if check is not None:
                    check()
                action = policy(obs, task)
                obs, reward, terminated, truncated, info = envs.step(action)
                done = terminated | truncated | (t == max_steps - 1)
                success = _success(info, terminated | truncated, n_envs)
                ret += reward * alive
                length += alive
                first = np.where(alive & (first < 0) & success, t + 1, first)
                alive &= ~done
                if progress is not None:
                    progress.update(n)
                if not alive.any():
                    break
            won = first[:n] > 0
            counts.episodes += n
            counts.successes += int(won.sum())
            counts.return_sum += float(ret[:n].sum())
            counts.return_sq_sum += float((ret[:n] ** 2).sum())
            counts.length_sum += float(length[:n].sum())
            counts.first_success_sum += float(first[:n][won].sum())
    finally:
        if own:
            envs.close()
    return counts


def _success(info: dict[str, Any], ended: np.ndarray, n_envs: int) -> np.ndarray:
    """(n_envs,) bool success flags of this step, taking ended episodes' flags from ``final_info``."""
    now = np.asarray(info.get("success", np.zeros(n_envs)), dtype=float) > 0
    if "final_info" in info and ended.any():
        final = np.asarray(info["final_info"].get("success", np.zeros(n_envs)), dtype=float) > 0
        now = np.where(ended, final, now)
    return now


def expert_policy() -> PolicyFn:
    """The scripted Meta-World expert as a :data:`PolicyFn` (the reference row of the results)."""
    cache: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def act(obs: np.ndarray, task: str) -> np.ndarray:
        fn = cache.setdefault(task, scripted_policy(task))
        return np.stack([fn(o) for o in obs])

    return act


def blind_expert_policy() -> PolicyFn:
    """The scripted expert sent to the centre of all hidden-goal regions (the ``expert-blind`` row)."""
    fn = hidden_goal.blind_expert()
    return lambda obs, task: np.stack([fn(o) for o in obs])


def reference_policies(tasks: Sequence[tuple[str, str]]) -> list[tuple[str, PolicyFn, list[tuple[str, str]]]]:
    """(row name, scripted policy, its (task, split)s): ``expert`` on every Meta-World task, and
    ``expert-blind`` on the hidden-goal regions."""
    scripted = [(t, s) for t, s in tasks if suite_of(t) == "metaworld"]
    hidden = [(t, s) for t, s in scripted if hidden_goal.is_hidden(t)]
    rows = [("expert", expert_policy(), scripted), ("expert-blind", blind_expert_policy(), hidden)]
    return [row for row in rows if row[2]]


def random_policy(seed: int = 0) -> PolicyFn:
    rng = np.random.default_rng(seed)
    return lambda obs, task: rng.uniform(-1, 1, size=(len(obs), dims(task)[1])).astype(np.float32)


def mean_success(rows: Sequence[TaskResult], policy: str = "agent") -> dict[str, float]:
    """Mean success rate over the tasks of each split (seen, target, unseen), for ``policy``'s rows.

    A split without rows is left out.
    """
    means = {}
    for split in ("seen", "target", "unseen"):
        rates = [
            r.success_rate
            for r in rows
            if r.split == split and r.policy == policy and r.success_rate is not None
        ]
        if rates:
            means[split] = float(np.mean(rates))
    return means


def format_results(rows: Sequence[TaskResult]) -> str:
    """A readable table: task, split, policy, success %, 95% CI, return ± std, length, steps to success,
    normalised score ("-" where a suite has no such metric)."""
    w = max([20, *(len(r.task) + 2 for r in rows)])  # the task and policy columns fit the longest names
    pw = max([8, *(len(r.policy) + 1 for r in rows)])
    head = (
        f"{'task':<{w}}{'split':<8}{'policy':<{pw}}{'eps':>5}{'success':>9}{'95% CI':>15}"
        f"{'return':>17}{'length':>8}{'t_succ':>8}{'score':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t = "-" if r.mean_steps_to_success is None else f"{r.mean_steps_to_success:.0f}"
        succ = "-" if r.success_rate is None else f"{100 * r.success_rate:.1f}%"
        ci = (
            "-" if r.ci_low is None or r.ci_high is None else f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        )
        ret = f"{r.mean_return:.1f} ± {r.return_std:.1f}"
        score = "-" if r.normalized_score is None else f"{r.normalized_score:.1f}"
        lines.append(
            f"{r.task:<{w}}{r.split:<8}{r.policy:<{pw}}{r.episodes:>5}{succ:>9}"
            f"{ci:>15}{ret:>17}{r.mean_length:>8.0f}{t:>8}{score:>8}"
        )
    for split, mean in mean_success(rows).items():
        lines.append(f"{'mean ' + split:<{w + 8 + pw}}{100 * mean:>8.1f}%")
    return "\n".join(lines)


def write_json(
    rows: Sequence[TaskResult],
    path: str | Path,
    meta: dict[str, Any],
    videos: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write ``{"meta": ..., "results": [rows]}`` atomically, plus ``"videos"`` if given; return the path.

    The JSON is built before anything is written, so an unserialisable value leaves the old file as it was.
    """
    data: dict[str, Any] = {"meta": meta, "results": [asdict(r) for r in rows]}
    if videos is not None:
        data["videos"] = list(videos)
    return atomic_write(path, json.dumps(data, indent=2).encode())


def read_json(path: str | Path, key: str) -> dict[str, Any]:
    """A results JSON that :func:`write_json` wrote: its ``meta``, and rows naming task, split and policy;
    anything else is a :class:`~llmdpd_pl.errors.ConfigError` under ``key`` that names the file."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data["meta"], dict) or not isinstance(data["results"], list):
            raise TypeError("'meta' must be an object and 'results' a list")
        for row in data["results"]:
            row["task"], row["split"], row["policy"]  # noqa: B018 (each row names them)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(key, f"not a results JSON of llmdpd test ({type(err).__name__}: {err})",
                          Path(path)) from None  # fmt: skip
    return data  # type: ignore[no-any-return]
