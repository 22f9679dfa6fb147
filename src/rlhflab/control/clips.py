"""Segments as short animated clips, what a person compares in the labelling app.

Christiano et al. (2017, "Deep Reinforcement Learning from Human Preferences", Sec. 2.2) show the labeller two
1-2 s clips of the agent rather than numbers: a person judges motion, not state vectors. Here a Pendulum-v1
segment becomes a looping GIF drawn with Pillow, one frame per step at the environment's own rate (dt = 0.05 s,
20 frames/s), so a clip of L steps plays in L / 20 seconds, as fast as the agent moved. Gymnasium's own renderer
needs pygame and a display; drawing the few shapes here keeps the clip small (a few tens of KB) and the package
free of both.

A frame shows what gymnasium's renderer shows, in its orientation: the rod from the pivot to the bob (theta = 0
points up, positive theta turns counter-clockwise), and the torque the step applied as an arc around the pivot
whose sweep grows with |torque| and whose arrowhead shows its sense (positive = counter-clockwise). A thin bar at
the bottom fills as the clip plays, so a labeller sees where the loop restarts.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from rlhflab.control.segments import Segment
from rlhflab.errors import ConfigError, DataError

SIZE = 160  # pixels, square
DT = 0.05  # Pendulum-v1's step, seconds: one frame per step plays the clip in real time
MAX_TORQUE = 2.0  # Pendulum-v1's action bound
_SUPERSAMPLE = 3  # drawn this much larger, then shrunk: smooth edges without an anti-aliasing renderer
_ROD_FRACTION = 0.36  # rod length as a share of the frame side: the bob stays inside at any angle

BACKGROUND = (255, 255, 255)
ROD = (204, 77, 77)  # gymnasium's rod colour
BOB = (29, 53, 87)
PIVOT = (40, 40, 40)
TORQUE = (233, 150, 30)
BAR = (69, 123, 157)
DRAWABLE = ("Pendulum-v1",)


def _palette() -> Image.Image:
    """The shapes' colours and their blends with the background (the smoothed edges) and with each other where
    they overlap: a fixed palette keeps every colour exact (an adaptive one may merge the bob with the pivot)."""
    shapes = [ROD, BOB, PIVOT, TORQUE, BAR]
    colours = [BACKGROUND, *shapes]
    for a in shapes:
        for w in (0.25, 0.5, 0.75):
            colours.append(tuple(round(w * x + (1 - w) * y) for x, y in zip(a, BACKGROUND)))
    for a, b in ((ROD, BOB), (ROD, PIVOT), (ROD, TORQUE)):
        colours.append(tuple(round((x + y) / 2) for x, y in zip(a, b)))
    image = Image.new("P", (1, 1))
    image.putpalette([v for c in colours for v in c] + [0, 0, 0] * (256 - len(colours)))
    return image


_PALETTE = _palette()


def bob_xy(theta: float, size: int = SIZE) -> tuple[float, float]:
    """Where the bob of angle `theta` (0 = upright, counter-clockwise positive) is drawn in a frame of `size`
    pixels: (x right, y down), as gymnasium's Pendulum renderer places it."""
    centre, rod = size / 2, _ROD_FRACTION * size
    return centre - rod * math.sin(theta), centre - rod * math.cos(theta)


def _check(segment: Segment) -> None:
    if segment.env_id not in DRAWABLE:
        raise ConfigError(
            f"env_id {segment.env_id!r}: clips can only be drawn for {', '.join(DRAWABLE)}; label segments of "
            "other environments with a synthetic labeller"
        )
    obs, act = np.asarray(segment.observations), np.asarray(segment.actions)
    if obs.ndim != 2 or obs.shape[1] != 3:
        raise DataError(
            f"a Pendulum-v1 observation is (cos theta, sin theta, theta_dot); got shape {obs.shape}",
            field="observations",
        )
    if act.reshape(len(segment), -1).shape[1] != 1:
        raise DataError(f"a Pendulum-v1 action is one torque; got shape {act.shape}", field="actions")
    if not (np.isfinite(obs).all() and np.isfinite(act).all()):
        raise DataError("a segment to draw must hold finite numbers only", field="observations")


def _torque_arc(draw: ImageDraw.ImageDraw, c: float, torque: float, s: int) -> None:
    """An arc around the pivot sweeping up to 270 degrees at full torque, from the top, in the torque's sense,
    with an arrowhead at its end."""
    sweep = 270.0 * min(abs(torque), MAX_TORQUE) / MAX_TORQUE
    if sweep < 5:  # too little torque to see: draw nothing rather than a dot
        return
    radius = 0.16 * SIZE * s
    box = (c - radius, c - radius, c + radius, c + radius)
    # Pillow's angles run clockwise from 3 o'clock on screen; counter-clockwise (positive) torque sweeps from
    # 12 o'clock (-90) towards smaller angles.
    start, end = (-90.0 - sweep, -90.0) if torque > 0 else (-90.0, -90.0 + sweep)
    draw.arc(box, start, end, fill=TORQUE, width=int(3 * s))
    tip = math.radians(start if torque > 0 else end)
    tx, ty = c + radius * math.cos(tip), c + radius * math.sin(tip)
    # the tangent at the tip, pointing along the motion (screen coordinates, y down)
    sense = -1.0 if torque > 0 else 1.0
    dx, dy = -math.sin(tip) * sense, math.cos(tip) * sense
    nx, ny = -dy, dx
    head = 6 * s
    draw.polygon(
        [
            (tx + dx * head, ty + dy * head),
            (tx - dx * head * 0.4 + nx * head * 0.8, ty - dy * head * 0.4 + ny * head * 0.8),
            (tx - dx * head * 0.4 - nx * head * 0.8, ty - dy * head * 0.4 - ny * head * 0.8),
        ],
        fill=TORQUE,
    )


def _frame(theta: float, torque: float, progress: float) -> Image.Image:
    s = _SUPERSAMPLE
    big = SIZE * s
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    c = big / 2
    _torque_arc(draw, c, torque, s)
    bx, by = bob_xy(theta, big)
    draw.line([(c, c), (bx, by)], fill=ROD, width=int(6 * s))
    bob = 9 * s
    draw.ellipse((bx - bob, by - bob, bx + bob, by + bob), fill=BOB)
    pivot = 4 * s
    draw.ellipse((c - pivot, c - pivot, c + pivot, c + pivot), fill=PIVOT)
    draw.rectangle((0, big - 4 * s, big * progress, big), fill=BAR)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def clip_gif(segment: Segment) -> bytes:
    """The segment as a looping GIF: one SIZE x SIZE frame per step, DT seconds each."""
    _check(segment)
    obs = np.asarray(segment.observations, dtype=np.float64)
    torques = np.asarray(segment.actions, dtype=np.float64).reshape(len(segment))
    thetas = np.arctan2(obs[:, 1], obs[:, 0])
    n = len(segment)
    # One fixed palette, no dithering: flat shapes stay flat, which is what keeps the file small.
    frames = [
        _frame(float(th), float(u), (t + 1) / n).quantize(palette=_PALETTE, dither=Image.Dither.NONE)
        for t, (th, u) in enumerate(zip(thetas, torques))
    ]
    out = io.BytesIO()
    # duration in ms; loop=0 loops for ever (a labeller watches both clips as long as they need). The progress
    # bar makes consecutive frames differ, so Pillow never merges two steps into one frame.
    frames[0].save(
        out,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=int(DT * 1000),
        loop=0,
        disposal=1,
    )
    return out.getvalue()


def clip_data_uri(segment: Segment) -> str:
    """The clip as a data: URI, what a segment item of the labelling app holds per response."""
    return "data:image/gif;base64," + base64.b64encode(clip_gif(segment)).decode("ascii")


__all__ = ["DT", "SIZE", "bob_xy", "clip_data_uri", "clip_gif"]
