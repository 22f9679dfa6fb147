"""Pendulum-v1 segments drawn as GIF clips: one frame per step at 20 frames/s, the bob where the angle puts it."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from rlhflab.control.clips import BOB, DT, SIZE, bob_xy, clip_data_uri, clip_gif
from rlhflab.control.segments import Segment
from rlhflab.errors import ConfigError, DataError


def _segment(thetas, torques=None, env_id="Pendulum-v1") -> Segment:
    thetas = np.asarray(thetas, dtype=np.float32)
    n = len(thetas)
    obs = np.stack([np.cos(thetas), np.sin(thetas), np.zeros(n, dtype=np.float32)], axis=1)
    torques = np.zeros(n) if torques is None else np.asarray(torques)
    return Segment(obs, torques.reshape(n, 1).astype(np.float32), np.zeros(n, dtype=np.float32), env_id)


def _frames(gif: bytes) -> list[Image.Image]:
    image = Image.open(io.BytesIO(gif))
    out = []
    for k in range(image.n_frames):
        image.seek(k)
        out.append(image.convert("RGB"))
    return out


def _near(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _bob_pixels(frame: Image.Image) -> list[tuple[int, int]]:
    """Where the bob's colour is in a frame."""
    rgb = np.asarray(frame).astype(int)
    mask = (np.abs(rgb - np.array(BOB)).sum(axis=2)) < 40
    ys, xs = np.nonzero(mask)
    return list(zip(xs.tolist(), ys.tolist()))


def test_a_clip_has_one_frame_per_step_at_the_env_rate():
    thetas = np.linspace(0.0, 2.0, 25)
    gif = clip_gif(_segment(thetas, np.linspace(-2, 2, 25)))
    image = Image.open(io.BytesIO(gif))
    assert image.format == "GIF" and image.size == (SIZE, SIZE)
    assert image.n_frames == 25
    assert image.info["duration"] == DT * 1000 == 50  # ms: 20 frames/s, Pendulum-v1's dt
    assert image.info["loop"] == 0  # loops for ever
    assert len(gif) < 60_000  # a few tens of KB


@pytest.mark.parametrize("theta", [0.0, 0.7, -1.9, math.pi])
def test_the_bob_is_drawn_where_the_angle_puts_it(theta):
    (frame,) = _frames(clip_gif(_segment([theta])))
    x, y = bob_xy(theta)
    assert _near(frame.getpixel((round(x), round(y))), BOB)  # the bob's centre
    pixels = _bob_pixels(frame)
    cx, cy = np.mean(pixels, axis=0)
    assert abs(cx - x) < 2 and abs(cy - y) < 2  # and the blob of its colour is centred there


def test_upright_is_above_the_pivot_and_hanging_below():
    up, down = _frames(clip_gif(_segment([0.0, math.pi])))
    up_y = np.mean([y for _, y in _bob_pixels(up)])
    down_y = np.mean([y for _, y in _bob_pixels(down)])
    assert up_y < SIZE / 2 - 40 and down_y > SIZE / 2 + 40  # screen y grows downwards
    assert np.abs(np.asarray(up).astype(int) - np.asarray(down).astype(int)).sum() > 0
    # Positive theta turns counter-clockwise (gymnasium's convention): a quarter turn puts the bob left of the pivot.
    (left,) = _frames(clip_gif(_segment([math.pi / 2])))
    assert np.mean([x for x, _ in _bob_pixels(left)]) < SIZE / 2 - 40


def test_torque_is_drawn_and_its_sense_shows():
    frames = _frames(clip_gif(_segment([0.0, 0.0, 0.0], [0.0, 2.0, -2.0])))
    none, ccw, cw = (np.asarray(f).astype(int) for f in frames)
    bar = slice(0, SIZE - 6)  # leave out the progress bar, which differs frame to frame
    assert np.abs(none[bar] - ccw[bar]).sum() > 0 and np.abs(ccw[bar] - cw[bar]).sum() > 0
    # A full-torque arc sweeps 270 degrees from 12 o'clock in the torque's sense: counter-clockwise covers the
    # upper-left quarter around the pivot and leaves the upper-right one empty; clockwise the other way round.
    orange = np.array([233, 150, 30])

    def has_orange(img, xs, ys):
        return (np.abs(img[ys, xs] - orange).sum(axis=-1) < 60).any()

    c = SIZE // 2
    left, right, top = slice(c - 28, c - 5), slice(c + 5, c + 28), slice(c - 28, c - 8)
    assert has_orange(ccw, left, top) and not has_orange(ccw, right, top)
    assert has_orange(cw, right, top) and not has_orange(cw, left, top)


def test_data_uri_decodes_to_the_gif():
    segment = _segment([0.1, 0.2])
    uri = clip_data_uri(segment)
    prefix = "data:image/gif;base64,"
    assert uri.startswith(prefix) and base64.b64decode(uri[len(prefix) :]) == clip_gif(segment)


def test_only_pendulum_can_be_drawn():
    with pytest.raises(ConfigError, match="CartPole-v1.*Pendulum-v1"):
        clip_gif(_segment([0.0], env_id="CartPole-v1"))
    bad = Segment(np.zeros((2, 4)), np.zeros((2, 1)), np.zeros(2))
    with pytest.raises(DataError, match="observations"):
        clip_gif(bad)
    nan = Segment(np.full((1, 3), np.nan), np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(DataError, match="finite"):
        clip_gif(nan)
