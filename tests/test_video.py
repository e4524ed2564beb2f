"""Tests for llmdpd_pl.video: frame orientation, recorded episodes, GIF encoding, the TensorBoard summary.

Orientation is checked against geometry, not against a stored picture: the goal site, recoloured pure
green, is moved to known world points, and where it shows up in a frame is compared with the pinhole
projection of those points through the render camera (MuJoCo's camera pose and vertical field of view).
Frames are small (64–128 px) and episodes short: rendering costs ~0.1 s a frame on CPU whatever the size.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from PIL import Image

from llmdpd_pl.media import gif_summary
from llmdpd_pl.rollouts import PolicyFn, expert_policy, random_policy, run_episodes
from llmdpd_pl.video import (
    MAX_GIF_FPS,
    camera_upside_down,
    encode_gif,
    make_video_env,
    record_episode,
    upright,
)

SEED = 0
# Meta-World's scripted policies warn "Constant(s) may be too high" on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

SIZE = 128
# Two points on the table, left and right of the middle, and one 25 cm above their midpoint; all three
# are in view of the cameras tested below and not hidden by the arm in its reset pose (layout 0).
LOW_LEFT, LOW_RIGHT, HIGH = (-0.15, 0.75, 0.05), (0.15, 0.75, 0.05), (0.0, 0.75, 0.3)


def _marker_env(camera: str) -> gym.Env:
    """A reach env rendering from ``camera``, whose goal site is a 4 cm green sphere (a free marker)."""
    env = make_video_env("reach", SEED, SIZE, camera)  # type: ignore[arg-type]
    env.reset(seed=0)
    model = env.unwrapped.model  # type: ignore[attr-defined]
    site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
    model.site_rgba[site] = (0.0, 1.0, 0.0, 1.0)
    model.site_size[site, 0] = 0.04
    return env


def _place_marker(env: gym.Env, point: tuple[float, float, float]) -> None:
    model, data = env.unwrapped.model, env.unwrapped.data  # type: ignore[attr-defined]
    model.site_pos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")] = point  # a world-body site
    mujoco.mj_forward(model, data)


def _find_marker(frame: np.ndarray) -> np.ndarray:
    """(row, col) of the centre of the green pixels (pixel (i, j) spans [i, i+1] × [j, j+1])."""
    f = frame.astype(int)
    rows, cols = np.nonzero((f[..., 1] > 100) & (f[..., 0] < 80) & (f[..., 2] < 80))
    assert len(rows) >= 10, f"marker hidden or out of view ({len(rows)} pixels)"
    return np.array([rows.mean() + 0.5, cols.mean() + 0.5])


def _project(env: gym.Env, point: tuple[float, float, float]) -> np.ndarray:
    """(row, col) of a world point in the render camera's own image: a pinhole camera looking down its −z
    axis with +y up and +x right (MuJoCo's convention), and ``cam_fovy`` the vertical field of view."""
    base = env.unwrapped
    model, data, camera = base.model, base.data, base.mujoco_renderer.camera_id  # type: ignore[attr-defined]
    rotation = data.cam_xmat[camera].reshape(3, 3)  # columns: the camera's axes in world coordinates
    x, y, z = rotation.T @ (np.asarray(point) - data.cam_xpos[camera])
    focal = (SIZE / 2) / np.tan(np.deg2rad(model.cam_fovy[camera]) / 2)
    return np.array([SIZE / 2 - focal * y / -z, SIZE / 2 + focal * x / -z])


def _turn(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Sign of the turn a → b → c in (row, col) coordinates; a mirror image reverses it."""
    (r1, c1), (r2, c2) = b - a, c - a
    return float(np.sign(r1 * c2 - c1 * r2))


@pytest.mark.parametrize(
    ("camera", "upside_down"),
    [
        ("corner", True),  # up axis (-0.19, -0.19, -0.96): mounted upside down
        ("corner2", True),
        ("topview", False),  # looks straight down, up axis +y (the far side of the table)
    ],
)
def test_frames_are_upright_and_not_mirrored(camera: str, upside_down: bool) -> None:
    env = _marker_env(camera)
    try:
        assert camera_upside_down(env) is upside_down
        points = (LOW_LEFT, LOW_RIGHT, HIGH)
        raw, turned, projected = [], [], []
        for point in points:
            _place_marker(env, point)
            frame = env.render()
            assert isinstance(frame, np.ndarray) and frame.shape == (SIZE, SIZE, 3)
            raw.append(_find_marker(frame))
            turned.append(_find_marker(upright(frame, camera_upside_down(env))))
            projected.append(_project(env, point))
    finally:
        env.close()

    # gymnasium's renderer returns the camera's own view: neither flipped nor turned (the premise of
    # `upright`). 1 px: a sphere's image is not centred exactly on its centre's projection.
    np.testing.assert_allclose(raw, projected, atol=1.0)

    # Not mirrored: the three points turn the same way as in the camera's own view. A vertical flip,
    # the usual fix for upside-down frames, would mirror them.
    assert _turn(*turned) == _turn(*projected) != 0
    if upside_down:
        flipped = [np.array([SIZE - r, c]) for r, c in raw]  # where frame[::-1] puts them
        assert _turn(*flipped) == -_turn(*projected)

    # Upright: the high point is above (a smaller row than) the low ones, for a camera that looks at
    # the scene from the side; a camera looking straight down has no up in the world to check.
    if camera != "topview":
        assert turned[2][0] < min(turned[0][0], turned[1][0]) - 5


def test_upright_turns_by_180_degrees() -> None:
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(upright(frame, False), frame)
    np.testing.assert_array_equal(upright(frame, True), np.rot90(frame, 2))


# ------------------------------------------------------------------------------- episodes
@pytest.fixture(scope="module")
def small_env() -> Iterator[gym.Env]:
    env = make_video_env("reach", SEED, 64, "corner")
    yield env
    env.close()


def test_record_episode_matches_the_scored_episode(small_env: gym.Env) -> None:
    # The expert is deterministic, so the video episode k and the scored episode k (same layout seed,
    # same layout k through LayoutReset) must agree to the last bit; rendering changes no physics.
    layout, steps, stride = 3, 100, 10
    policy: PolicyFn = expert_policy()
    video = record_episode(policy, "reach", layout, small_env, max_steps=steps, stride=stride)
    scored = run_episodes(policy, "reach", [layout], 1, SEED, max_steps=steps)
    assert video.frames.shape == (1 + steps // stride, 64, 64, 3) and video.frames.dtype == np.uint8
    assert (video.success, video.episode_return, video.length) == (
        scored.successes == 1,
        scored.return_sum,
        scored.length_sum,
    )
    assert video.success  # reach's expert succeeds by step ~60 on every layout, else this proves little

    # Another layout starts from another scene.
    other = record_episode(policy, "reach", layout + 1, small_env, max_steps=1)
    assert not np.array_equal(other.frames[0], video.frames[0])


def test_stride_keeps_reset_frame_and_every_kth_step(small_env: gym.Env) -> None:
    every = record_episode(random_policy(SEED), "reach", 0, small_env, max_steps=6, stride=1)
    third = record_episode(random_policy(SEED), "reach", 0, small_env, max_steps=6, stride=3)
    assert len(every.frames) == 7 and len(third.frames) == 3
    np.testing.assert_array_equal(third.frames, every.frames[[0, 3, 6]])  # same seed, same episode


# ------------------------------------------------------------------------------- GIF and TensorBoard
def _frames(n: int) -> np.ndarray:
    """n distinct frames (Pillow merges identical consecutive frames): a bright square moving right."""
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    for i in range(n):
        frames[i, 8:16, 4 * i : 4 * i + 8] = (255, 200, 0)
    return frames


def test_encode_gif_frames_size_and_delay() -> None:
    frames = _frames(5)
    gif = encode_gif(frames, fps=20)
    image = Image.open(io.BytesIO(gif))
    assert gif[:6] == b"GIF89a"
    assert (image.n_frames, image.size) == (5, (48, 32))  # size is (width, height)
    assert image.info["duration"] == 50 and image.info["loop"] == 0  # 20 fps: 5 cs a frame, looping
    for i in range(5):
        image.seek(i)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), frames[i])  # 2 colours: lossless


@pytest.mark.parametrize("fps", [0, MAX_GIF_FPS + 1])
def test_encode_gif_rejects_bad_fps(fps: int) -> None:
    with pytest.raises(ValueError, match=f"fps must be in \\[1, {MAX_GIF_FPS}\\], got {fps}"):
        encode_gif(_frames(2), fps)


def test_gif_summary_reads_back_from_an_event_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    gif = encode_gif(_frames(3), fps=10)
    writer = SummaryWriter(str(tmp_path))
    writer._get_file_writer().add_summary(gif_summary("test/seen/reach/video_ep0", gif, 32, 48), 7)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["test/seen/reach/video_ep0"]
    (image,) = events.Images("test/seen/reach/video_ep0")
    assert (image.step, image.height, image.width) == (7, 32, 48)
    assert image.encoded_image_string == gif
