"""Deterministic anti-aliased numpy renderer for shapes-world scenes."""

from __future__ import annotations

import numpy as np

from .scene import COLOURS, ObjectSpec, Scene, object_states

SUPERSAMPLE = 4
CHECKS = 8  # checker squares across the frame (frame units, so resolution independent)
STRIPES = 6  # stripes across the object's height
OUTLINE = 0.3  # border thickness in units of the object's half-size
SHADE = 0.55  # stripe shade = colour * SHADE


def checker_tone(rgb) -> np.ndarray:
    """Second tone of a checkered background: a subtle lighter/darker shade of the same hue."""
    c = np.asarray(rgb, dtype=np.float32)
    return c + 0.12 * (255 - c) if c.mean() < 100 else c * 0.88


def stripe_shade(rgb) -> np.ndarray:
    """Darker shade used for the alternate stripes of a striped object."""
    return np.asarray(rgb, dtype=np.float32) * SHADE


def shape_depth(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed inside-depth in half-size units (>0 inside); u, v are local coords in [-1,1]."""
    if shape == "circle":
        return 1 - np.sqrt(u * u + v * v)
    if shape == "square":
        return 1 - np.maximum(np.abs(u), np.abs(v))
    if shape == "triangle":
        # Apex at the top (v=-1), base at v=1; the side term is the true distance to the edge.
        return np.minimum(1 - v, (v + 1 - 2 * np.abs(u)) / np.sqrt(5.0))
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, size: int) -> np.ndarray:
    """Background image [size,size,3] float32, box-filtered from the supersampled grid."""
    base = np.asarray(COLOURS[scene.background], dtype=np.float32)
    if scene.texture == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy()
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    idx = (np.floor(c * CHECKS).astype(int))
    odd = ((idx[:, None] + idx[None, :]) % 2).astype(np.float32)
    odd = odd.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))[..., None]
    return base * (1 - odd) + checker_tone(base) * odd


def _draw(frame: np.ndarray, obj: ObjectSpec, cx: float, cy: float, half: float) -> None:
    """Composite one object into a float frame in place (coverage-weighted box filter)."""
    size = frame.shape[0]
    ss = SUPERSAMPLE
    x0 = max(int(np.floor((cx - half) * size)) - 1, 0)
    x1 = min(int(np.ceil((cx + half) * size)) + 1, size)
    y0 = max(int(np.floor((cy - half) * size)) - 1, 0)
    y1 = min(int(np.ceil((cy + half) * size)) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return
    # Sample positions of the supersampled grid restricted to the object's pixel box.
    xs = (x0 * ss + np.arange((x1 - x0) * ss) + 0.5) / (size * ss)
    ys = (y0 * ss + np.arange((y1 - y0) * ss) + 0.5) / (size * ss)
    u = ((xs - cx) / half)[None, :]
    v = ((ys - cy) / half)[:, None]
    depth = shape_depth(obj.shape, u, v)
    inside = depth >= 0
    if obj.style == "outlined":
        inside &= depth < OUTLINE
    colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    h, w = y1 - y0, x1 - x0
    cover = inside.astype(np.float32).reshape(h, ss, w, ss).mean((1, 3))[..., None]
    if obj.style == "striped":
        # Stripes live in object-local coordinates so they travel and scale with the object.
        odd = (np.floor((v + 1) * STRIPES / 2).astype(int) % 2 == 1)
        shade_frac = (inside & odd).astype(np.float32).reshape(h, ss, w, ss).mean((1, 3))[..., None]
        paint = colour * (cover - shade_frac) + stripe_shade(colour) * shade_frac
    else:
        paint = colour * cover
    region = frame[y0:y1, x0:x1]
    region *= 1 - cover
    region += paint


def render(scene: Scene, num_frames: int = 16, size: int = 64, fps: float = 8.0) -> np.ndarray:
    """Render a scene to uint8 frames [T, size, size, 3]; pure function of its arguments."""
    t = np.arange(num_frames) / float(fps)
    bg = _background(scene, size)
    states = [object_states(o, t) for o in scene.objects]
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for k in range(num_frames):
        frame = bg.copy()
        for obj, (xs, ys, hs) in zip(scene.objects, states):
            _draw(frame, obj, float(xs[k]), float(ys[k]), float(hs[k]))
        out[k] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out
