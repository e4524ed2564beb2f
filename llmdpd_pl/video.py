"""Rollout videos: one Meta-World episode rendered offscreen, turned upright, encoded as an animated GIF.

Rendering goes through EGL (``MUJOCO_GL=egl`` unless the user chose another backend), which needs no
display and works on CPU through Mesa's llvmpipe: about 0.1 s a frame at any size up to 480², most of it
the 4096² shadow map. A video therefore records every ``stride``-th step.

**Orientation.** gymnasium's renderer returns each frame as the camera sees it (tests pin this against a
pinhole projection of known points). Meta-World's corner cameras are mounted upside down: their up axis
points below the horizon, so their frames show the floor at the top. A vertical flip (``frame[::-1]``)
would put the floor back at the bottom but mirror the scene left to right. Turning the frame by 180°
(``frame[::-1, ::-1]``) gives what the same camera would see mounted upright, so that is what
:func:`upright` does, for every camera whose up axis points downwards.

Video episodes are separate from the scored ones and leave them untouched. Episode ``k`` of a task runs
layout ``k`` of the task's evaluation layouts, like scored episode ``k`` (through :class:`LayoutReset`),
but draws its own action noise, so its outcome is recorded next to it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from llmdpd_pl.envs import LayoutReset, layout_seed, make_env
from llmdpd_pl.media import MediaSink
from llmdpd_pl.rollouts import PolicyFn
from llmdpd_pl.utils import PROGRESS_INTERVAL, atomic_write

#: The cameras defined in Meta-World's scene (``xyz_base.xml``).
CameraName = Literal["corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV"]
#: GIF frame delays are whole centiseconds, and viewers slow delays under 2 cs down to 10 cs.
MAX_GIF_FPS = 50


@dataclass(frozen=True)
class Video:
    """One recorded episode. ``frames`` is (T, H, W, 3) uint8: the reset state, then every stride-th step."""

    task: str
    episode: int
    frames: np.ndarray
    success: bool
    episode_return: float
    length: int


def make_video_env(task: str, seed: int, size: int, camera: CameraName) -> gym.Env:
    """One ``task`` env with the evaluation layouts (as :func:`make_eval_envs`) rendering ``size``² frames."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # gymnasium reads it when the first frame is rendered
    kwargs: dict[str, Any] = dict(render_mode="rgb_array", width=size, height=size, camera_name=camera)
    return LayoutReset(make_env(task, seed=layout_seed(seed, task), **kwargs))


def camera_upside_down(env: gym.Env) -> bool:
    """Whether the env's render camera has its up axis (its y axis) pointing below the horizon now."""
    base: Any = env.unwrapped
    camera = base.mujoco_renderer.camera_id
    if camera < 0:
        return False  # gymnasium's free camera is always upright
    up = base.data.cam_xmat[camera].reshape(3, 3)[:, 1]  # rotation columns are the camera axes in world frame
    return bool(up[2] < 0)


def upright(frame: np.ndarray, upside_down: bool) -> np.ndarray:
    """``frame`` (H, W, 3) turned by 180° if its camera is upside down (a flip would mirror the scene)."""
    return np.ascontiguousarray(frame[::-1, ::-1]) if upside_down else frame


def record_episode(
    policy: PolicyFn, task: str, episode: int, env: gym.Env, max_steps: int, stride: int = 1
) -> Video:
    """Run episode ``episode`` (layout ``episode mod 50``) of ``task`` in ``env`` and keep its frames.

    ``env`` comes from :func:`make_video_env`. Frames: the reset state, then the state after every
    ``stride``-th step, so ``1 + length // stride`` frames. Whether the camera is upside down is decided
    once, at reset, so a camera that tracks the gripper does not turn mid-video.
    """
    obs, _ = env.reset(seed=episode)
    turn = camera_upside_down(env)
    frames = [_frame(env, turn)]
    total, success, length = 0.0, False, 0
    for t in range(max_steps):
        action = policy(obs[None], task)[0]  # the policy takes a batch: (1, S) → (1, A)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        success |= float(info.get("success", 0.0)) > 0
        length = t + 1
        if length % stride == 0:
            frames.append(_frame(env, turn))
        if terminated or truncated:
            break
    return Video(task, episode, np.stack(frames), success, total, length)


def _frame(env: gym.Env, upside_down: bool) -> np.ndarray:
    frame = env.render()
    assert isinstance(frame, np.ndarray)  # render_mode="rgb_array": (H, W, 3) uint8
    return upright(frame, upside_down)


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """(T, H, W, 3) uint8 frames as an endlessly looping GIF at ``fps`` (1 to :data:`MAX_GIF_FPS`).

    GIF delays are whole centiseconds, so the delay is ``1000 / fps`` ms rounded to 10 ms. Pillow merges
    identical consecutive frames into one with their delays summed (a still robot costs no frames).
    """
    if not 1 <= fps <= MAX_GIF_FPS:
        raise ValueError(f"fps must be in [1, {MAX_GIF_FPS}], got {fps}")
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=10 * round(100 / fps), loop=0
    )
    return buffer.getvalue()


class VideoRecorder:
    """Records episodes of a policy per task as GIFs and TensorBoard images, with one env per task, built
    once (about 0.6 s) and reused.

    Args:
        seed: Evaluation seed (the layouts, as the scored episodes').
        size: Frame width and height in pixels.
        camera: Meta-World camera.
        stride: Keep the frame of every this many steps.
        fps: GIF frame rate.
        max_steps: Episode length.
    """

    def __init__(
        self, seed: int, size: int, camera: CameraName, stride: int, fps: int, max_steps: int
    ) -> None:
        self.seed, self.size, self.camera, self.stride, self.fps = seed, size, camera, stride, fps
        self.max_steps = max_steps
        self._envs: dict[str, gym.Env] = {}

    def record(
        self,
        policy: PolicyFn,
        tasks: Sequence[tuple[str, str]],
        episodes: int,
        directory: Path,
        tag: str,
        step: int,
        sinks: Sequence[MediaSink] = (),
    ) -> list[dict[str, Any]]:
        """Episodes 0 … ``episodes`` − 1 of each (task, split) as ``directory/<split>/<task>_ep<k>.gif`` and,
        in each of the loggers' ``sinks``, a video ``<tag>/<split>/<task>/video_ep<k>`` at ``step``; one
        JSON entry per video."""
        bar = tqdm(total=len(tasks) * episodes * self.max_steps, desc="video", unit="step", leave=False,
                   mininterval=PROGRESS_INTERVAL)  # fmt: skip
        entries = []
        for task, split in tasks:
            if task not in self._envs:
                self._envs[task] = make_video_env(task, self.seed, self.size, self.camera)
            for k in range(episodes):
                video = record_episode(policy, task, k, self._envs[task], self.max_steps, self.stride)
                gif = encode_gif(video.frames, self.fps)
                path = atomic_write(directory / split / f"{task}_ep{k}.gif", gif)
                height, width = video.frames.shape[1:3]
                for sink in sinks:
                    sink.gif(f"{tag}/{split}/{task}/video_ep{k}", gif, path, height, width, step)
                entries.append({"task": task, "split": split, "episode": k, "path": str(path),
                                "frames": len(video.frames), "success": video.success,
                                "return": video.episode_return, "length": video.length})  # fmt: skip
                bar.update(self.max_steps)
        bar.close()
        return entries

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
