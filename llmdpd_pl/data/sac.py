"""Medium-replay data made here by D4RL's recipe: train SAC to "medium", keep its whole replay buffer.

D4RL's ``<env>-medium-replay`` is every transition an rlkit SAC stored until its evaluation return reached
"medium" (``scripts/generation/mujoco/convert_buffer.py`` reads ``replay_buffer/*``); stable-baselines3's SAC
plays that part here. Out come two Minari datasets, each with ``llmdpd.json``: the replay buffer split into
episodes, with D4RL's reference scores, and held-out episodes of the final policy (the trajectory prompts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from minari.data_collector import EpisodeBuffer
from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm.auto import tqdm

from llmdpd_pl.data.publish import NewDataset, publish
from llmdpd_pl.data.spec import (
    SACRecipe,
    corruption,
    read_metadata,
    recipe_record,
    summarize,
)
from llmdpd_pl.errors import ConfigError
from llmdpd_pl.locomotion import is_gym_env, make_locomotion, reference
from llmdpd_pl.utils import PROGRESS_INTERVAL, derive_seed

log = logging.getLogger(__name__)

#: The SAC behind D4RL (rlkit's ``examples/sac.py``): MLP [256, 256], Adam 3e-4, batch 256, τ 0.005,
#: γ 0.99, one gradient step per env step, automatic entropy tuning. CPU: these MLPs gain nothing on a GPU.
SAC_KWARGS: dict[str, Any] = dict(
    learning_rate=3e-4, batch_size=256, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1,
    ent_coef="auto", policy_kwargs={"net_arch": [256, 256]}, device="cpu", verbose=0,
)


class _SeededResets(gym.Wrapper):  # type: ignore[type-arg]
    """Seeds reset ``k`` by ``derive_seed(seed, "train", k)``, whatever SB3 passes: resets keep no state."""

    def __init__(self, env: gym.Env, seed: int) -> None:  # type: ignore[type-arg]
        super().__init__(env)
        self.base_seed, self.episodes = seed, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.episodes += 1
        return self.env.reset(seed=derive_seed(self.base_seed, "train", self.episodes - 1), options=options)


def _episode(
    index: int, seed: int, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminated: bool
) -> EpisodeBuffer:
    """Episode ``index`` from ``reset(seed)``: (T+1, O), (T, A), (T,); it ends terminated, else truncated."""
    end = np.arange(len(actions)) == len(actions) - 1  # (T,)
    return EpisodeBuffer(id=index, seed=seed, observations=obs, actions=actions, rewards=rewards,
                         terminations=end & terminated, truncations=end & (not terminated))


def _rollout(model: SAC, env: gym.Env, index: int, seed: int, deterministic: bool) -> EpisodeBuffer:  # type: ignore[type-arg]
    """Episode ``index`` of the policy, from ``reset(seed)``."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, terminated, truncated = [obs], [], [], False, False
    while not (terminated or truncated):
        action, _ = model.predict(obs, deterministic=deterministic)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
    return _episode(index, seed, np.array(observations), np.array(actions), np.array(rewards), terminated)


def _replay_episodes(model: SAC, seed: int) -> list[EpisodeBuffer]:
    """Every transition of the replay buffer, split at ``done``: terminated iff done and not a timeout.

    SB3 stores per step the observation, the *real* next one (``infos["terminal_observation"]`` where the
    VecEnv auto-reset), the action scaled to [-1, 1], reward, ``done`` and ``timeout``. Steps ``s..e`` give
    observations ``obs[s..e]`` + ``next_obs[e]``; the last episode, cut by the stop, is truncated."""
    buf = model.replay_buffer
    assert buf is not None
    n = buf.buffer_size if buf.full else buf.pos
    obs, next_obs, done = buf.observations[:n, 0], buf.next_observations[:n, 0], buf.dones[:n, 0] > 0
    actions = model.policy.unscale_action(buf.actions[:n, 0]).astype(model.action_space.dtype)
    rewards, timeouts = buf.rewards[:n, 0].astype(np.float64), buf.timeouts[:n, 0] > 0
    episodes, start = [], 0
    for k, end in enumerate(np.flatnonzero(done | (np.arange(n) == n - 1))):
        assert np.array_equal(obs[start + 1 : end + 1], next_obs[start:end])  # one episode, no gap
        s, terminated = slice(start, end + 1), bool(done[end] and not timeouts[end])
        observations = np.concatenate([obs[s], next_obs[end : end + 1]])
        seed_k = derive_seed(seed, "train", k)
        episodes.append(_episode(k, seed_k, observations, actions[s], rewards[s], terminated))
        start = end + 1
    return episodes


def _checkpoint(work: Path, model: SAC, state: dict[str, Any]) -> None:
    """Write ``work/step-<n>`` under a temporary name, rename it, drop older ones; reseed RNGs by seed, n."""
    step, tmp = work / f"step-{model.num_timesteps:09d}", Path(tempfile.mkdtemp(prefix=".tmp-", dir=work))
    model.save(tmp / "model.zip")
    model.save_replay_buffer(tmp / "buffer.pkl")
    (tmp / "state.json").write_text(json.dumps(state))
    os.rename(tmp, step)
    for old in set(work.iterdir()) - {step}:
        shutil.rmtree(old, ignore_errors=True)
    model.set_random_seed(derive_seed(state["args"]["seed"], "sac", model.num_timesteps))


def _resume(
    work: Path, venv: DummyVecEnv, resets: _SeededResets, args: dict[str, Any]
) -> tuple[SAC, dict[str, Any]] | None:
    """(model, state) of the latest checkpoint in ``work``, env and RNGs as they were; None if none."""
    if not (steps := sorted(work.glob("step-*"))):
        return None
    if (state := json.loads((steps[-1] / "state.json").read_text()))["args"] != args:
        raise ConfigError("data.dataset.sac", f"{work} holds a collection with other arguments "
                          f"({state['args']}): delete it", args)  # fmt: skip
    model = SAC.load(steps[-1] / "model.zip", device="cpu")
    model.load_replay_buffer(steps[-1] / "buffer.pkl")
    resets.episodes = state["episodes"]
    model.set_env(venv, force_reset=True)  # learn() resets the env: episode `episodes` starts
    model.set_random_seed(derive_seed(args["seed"], "sac", model.num_timesteps))  # as _checkpoint left them
    return model, state


def _publish(
    root: Path, env: gym.Env, sidecar: dict[str, Any],  # type: ignore[type-arg]
    datasets: list[tuple[str, str, str, list[EpisodeBuffer]]],
) -> list[dict[str, Any]]:
    """Publish each ``(dataset_id, kind, level, episodes)`` with its sidecar, in order; return the summary
    rows (last dataset first)."""
    ref = reference(env.spec.id)  # type: ignore[union-attr]
    new, rows = [], list[dict[str, Any]]()
    for dataset_id, kind, level, episodes in datasets:
        stats = [{"task": sidecar["task"], "level": level, "index": ep.id, "seed": ep.seed, "success": False,
                  "return": float(np.sum(ep.rewards)), "length": len(ep.rewards),
                  "terminated": bool(ep.terminations[-1])} for ep in episodes]  # fmt: skip
        meta, rows = {**sidecar, "kind": kind, "episodes": stats}, summarize(stats, kind) + rows
        new.append(NewDataset(dataset_id, episodes, meta, {
            "env": env.spec, "eval_env": env.spec, "data_format": "hdf5",
            "algorithm_name": f"stable-baselines3 SAC, D4RL's medium-replay recipe: {meta['recipe']}",
            "ref_min_score": ref.min_score if ref else None, "ref_max_score": ref.max_score if ref else None,
            "description": f"{meta['task']}, {level}: "
            + ("replay buffer" if kind == "train" else "held out"),
        }))  # fmt: skip
    publish(root, new)
    return rows


def collect_medium_replay(
    env_id: str, recipe: SACRecipe, seed: int, root: Path, train_id: str, prompts_id: str,
    prompt_episodes: int = 5, progress: bool = True, pause_after: int | None = None,
) -> dict[str, Any]:
    """Train SAC on ``env_id`` to the medium level; write its replay buffer and prompt episodes to Minari.

    Complete datasets are reused. Resuming: at the first episode end past every ``checkpoint_every`` steps,
    the agent (weights, Adam and entropy state, counters) and its replay buffer go to
    ``root/.sac/<train_id, / → __>/`` (deleted on success), and SB3 reseeds the global torch / NumPy /
    Python and the action-space RNGs from ``(seed, step)``. Env resets are seeded by episode index, so at
    an episode boundary no state is lost: a resumed run writes bitwise the datasets of an uninterrupted one,
    given the same machine and torch thread count (these change float reduction order). Only the sidecars'
    ``wall_seconds`` and ``steps_per_second`` differ: they add up every session's time.

    Args:
        env_id: Gymnasium id, e.g. ``"Hopper-v5"``.
        recipe: How SAC is trained and the data recorded.
        seed: Seeds SAC, the env resets, the evaluations and the prompt episodes.
        root: Folder of the Minari datasets (``MINARI_DATASETS_PATH`` layout).
        train_id: Dataset id of the replay buffer, e.g. ``"llmdpd/hopper/medium-replay-v0"``.
        prompts_id: Dataset id of the held-out prompt episodes.
        prompt_episodes: Episodes of the final policy (stochastic, never in the replay data) to record there.
        progress: Show a tqdm bar over env steps, with the last evaluation return.
        pause_after: Stop after the first checkpoint at or past this env step, leaving the work folder
            (e.g. to split a collection across sessions); the call then returns ``complete: False``.

    Returns:
        ``{"complete", "rows", "behaviour"}``: rows as ``collect.summarize`` makes them; SAC's ``stop_step``,
        ``eval_return``, ``eval_curve`` ([[step, return]]), ``reached_medium``, ``wall_seconds`` and
        ``steps_per_second``.
    """
    if not is_gym_env(env_id):
        raise ConfigError("data.seen_tasks", "not a registered Gymnasium env id", env_id)
    medium, max_steps = recipe.targets(env_id)
    root, args = Path(root).resolve(), recipe_record(env_id, recipe, seed, prompt_episodes)
    if (root / train_id).exists() and (bad := corruption(root / prompts_id) or corruption(root / train_id)):
        log.warning("collect: dataset %s or %s is corrupt (%s); rebuilding both", train_id, prompts_id, bad)
        for dataset_id in (train_id, prompts_id):
            shutil.rmtree(root / dataset_id, ignore_errors=True)
    if (root / train_id).exists():  # moved into place last: both datasets are complete
        meta, prompts_meta = read_metadata(root / train_id), read_metadata(root / prompts_id)
        if meta["recipe"] != args:
            raise ConfigError("data.dataset.version", f"{root / train_id} was built from "
                              f"{meta['recipe']}: bump the version or delete it", args)  # fmt: skip
        rows = summarize(meta["episodes"], "train") + summarize(prompts_meta["episodes"], "prompts")
        return {"complete": True, "rows": rows, "behaviour": meta["behaviour"]}

    (work := root / ".sac" / train_id.replace("/", "__")).mkdir(parents=True, exist_ok=True)
    make = lambda: make_locomotion(env_id, seed, max_episode_steps=recipe.max_episode_steps)  # noqa: E731
    resets, eval_env = _SeededResets(make(), seed), make()
    venv = DummyVecEnv([lambda: resets])
    state: dict[str, Any] = {"args": args, "episodes": 0, "eval_curve": [], "wall_seconds": 0.0}
    model, state = _resume(work, venv, resets, args) or (SAC(
        "MlpPolicy", venv, buffer_size=max_steps, learning_starts=recipe.learning_starts, seed=seed,
        **SAC_KWARGS), state)
    buf, n, start = model.replay_buffer, model.num_timesteps, time.perf_counter() - state["wall_seconds"]
    assert buf is not None
    bar = tqdm(total=max_steps, initial=n, desc=f"SAC {env_id}", unit="step", disable=not progress,
               mininterval=PROGRESS_INTERVAL)
    step_bar = lambda _locals, _globals: bar.update(1) or True  # noqa: E731  (SB3 stops on a falsy return)
    pending = reached = False
    while n < max_steps and not reached:  # learn in chunks that end at evaluations and checkpoints
        ends = [max_steps, (n // recipe.eval_every + 1) * recipe.eval_every]
        ends.append(n + 1 if pending else (n // recipe.checkpoint_every + 1) * recipe.checkpoint_every)
        model.learn(min(ends) - n, callback=step_bar, reset_num_timesteps=False)
        n = model.num_timesteps
        if n % recipe.eval_every == 0 or n == max_steps:
            evals = [_rollout(model, eval_env, i, derive_seed(seed, "eval", i), True)
                     for i in range(recipe.eval_episodes)]
            ret = float(np.mean([np.sum(e.rewards) for e in evals]))
            state["eval_curve"].append([n, ret])
            bar.set_postfix(eval_return=f"{ret:.0f}")
            reached = ret >= medium
        pending = pending or n % recipe.checkpoint_every == 0
        if pending and not reached and n < max_steps and buf.dones[buf.pos - 1, 0]:  # an episode just ended
            state.update(episodes=int(buf.dones[: buf.pos].sum()), wall_seconds=time.perf_counter() - start)
            _checkpoint(work, model, state)
            pending = False
            if pause_after is not None and n >= pause_after:
                break
    bar.close()
    if n < max_steps and not reached:  # paused
        return {"complete": False, "rows": [], "behaviour": {"stop_step": n, **state}}
    wall = time.perf_counter() - start
    behaviour = {"stop_step": n, "eval_return": state["eval_curve"][-1][1], "eval_curve": state["eval_curve"],
                 "reached_medium": reached, "wall_seconds": wall, "steps_per_second": n / wall}

    prompts = [_rollout(model, eval_env, i, derive_seed(seed, "prompts", i), False)
               for i in range(prompt_episodes)]
    train = _replay_episodes(model, seed)
    rows = _publish(root, eval_env, {"task": env_id, "recipe": args, "behaviour": behaviour},
                    [(prompts_id, "prompts", "prompt", prompts), (train_id, "train", "medium-replay", train)])
    eval_env.close()
    venv.close()
    shutil.rmtree(work)
    return {"complete": True, "rows": rows, "behaviour": behaviour}
