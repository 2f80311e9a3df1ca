"""Recover scene attributes (background, colour, shape, size, style, motion) from pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .render import OUTLINE, SUPERSAMPLE, shape_depth, stripe_shade
from .scene import GROW_START, OBJECT_COLOURS, SHAPES, SIZES, Scene
from .segment import (
    FG_THRESHOLD, background_model, components, estimate_background, foreground_distance,
    label_components, track,
)

_OBJ_NAMES = list(OBJECT_COLOURS)
_OBJ_RGB = np.array([OBJECT_COLOURS[n] for n in _OBJ_NAMES], dtype=np.float32)
_OBJ_SHADE = stripe_shade(_OBJ_RGB)
# Shape area as a fraction of its (2*half)^2 box, and inradius in half-size units.
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_INRADIUS = {"circle": 1.0, "square": 1.0, "triangle": 2 / (1 + np.sqrt(5))}
_SIZE_SPLIT = float(np.sqrt(SIZES["small"] * SIZES["large"]))
ATTRIBUTES = ("background", "colour", "shape", "size", "style", "motion")


@dataclass
class ObjectEstimate:
    """Attributes and per-frame trajectory of one detected object (coords in [0,1])."""

    colour: str
    shape: str
    size: str
    style: str
    motion: str
    centroids: np.ndarray  # [T,2] (x, y), NaN where the object was not found
    scales: np.ndarray  # [T] fitted diameter as a fraction of frame width, NaN if missing


@dataclass
class SceneEstimate:
    """Analyzer output for one clip."""

    background: str
    texture: str
    objects: list[ObjectEstimate] = field(default_factory=list)


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points p [N,3] to segments a-b (a, b broadcastable to [N,3])."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)
    return np.linalg.norm(p - a - t[..., None] * ab, axis=-1)


def _colour(pix: np.ndarray, bgp: np.ndarray, exclude: str) -> int:
    """Palette index whose (background, colour, shade) triangle best explains the pixels."""
    best, best_err = 0, np.inf
    for i, name in enumerate(_OBJ_NAMES):
        if name == exclude:
            continue
        c, s = _OBJ_RGB[i], _OBJ_SHADE[i]
        # Edge pixels mix with the background; blurred stripes mix colour and shade.
        d = np.minimum(np.minimum(_seg_dist(pix, bgp, c), _seg_dist(pix, bgp, s)),
                       _seg_dist(pix, c[None], s[None]))
        err = float(np.sqrt(d).sum())  # sqrt: robust to a few stray pixels
        if err < best_err:
            best, best_err = i, err
    return best


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    return mask & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def _coverage(shape: str, outlined: bool, cx: float, cy: float, half: float,
              y0: int, y1: int, x0: int, x1: int, size: int) -> np.ndarray:
    """Supersampled coverage of a candidate shape over a pixel window (same maths as render)."""
    ss = SUPERSAMPLE
    xs = (x0 * ss + np.arange((x1 - x0) * ss) + 0.5) / (size * ss)
    ys = (y0 * ss + np.arange((y1 - y0) * ss) + 0.5) / (size * ss)
    depth = shape_depth(shape, ((xs - cx) / half)[None], ((ys - cy) / half)[:, None])
    inside = depth >= 0
    if outlined:
        inside &= depth < OUTLINE
    return inside.astype(np.float32).reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))


def _fit_frame(alpha: np.ndarray, size: int) -> dict:
    """Fit every (shape, outlined) template to one frame's alpha map; returns errors and halves."""
    ys, xs = np.nonzero(alpha > 0)
    area = float(alpha.sum())
    cy = float((alpha.sum(1) * (np.arange(size) + 0.5)).sum()) / area / size
    cx = float((alpha.sum(0) * (np.arange(size) + 0.5)).sum()) / area / size
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, size)
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, size)
    win = alpha[y0:y1, x0:x1]
    out = {}
    for shape in SHAPES:
        for outlined in (False, True):
            frac = _AREA[shape]
            if outlined:
                rho = _INRADIUS[shape]
                frac *= 1 - ((rho - OUTLINE) / rho) ** 2
            best = (np.inf, 0.0)
            for scale in (0.94, 1.0, 1.06):
                half = scale * np.sqrt(area / frac) / (2 * size)
                # The triangle's area centroid sits a third of its half-size below the box centre.
                by = cy - half / 3 if shape == "triangle" else cy
                tmpl = _coverage(shape, outlined, cx, by, half, y0, y1, x0, x1, size)
                err = float(np.abs(win - tmpl).sum()) / area
                best = min(best, (err, half))
            out[(shape, outlined)] = best
    return out


def _motion(cent: np.ndarray, scales: np.ndarray) -> str:
    """Classify motion from the centroid track and fitted scale per frame."""
    ok = ~np.isnan(cent[:, 0])
    if ok.sum() < 3:
        return "static"
    k = np.flatnonzero(ok).astype(np.float64)
    x, y, s = cent[ok, 0], cent[ok, 1], scales[ok]
    n = k[-1] - k[0]
    sa, sb = np.polyfit(k, s, 1)[::-1]
    s_first, s_last = sa + sb * k[0], sa + sb * k[-1]
    if s_first > 0 and s_last / s_first > 1.35:
        return "growing"
    ypoly = np.polyfit(k, y, 1)
    res = y - np.polyval(ypoly, k)
    if res.max() - res.min() > 0.08:
        return "bouncing"
    dx = np.polyfit(k, x, 1)[0] * n
    dy = ypoly[0] * n
    if max(abs(dx), abs(dy)) < 0.1:
        return "static"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _segment(frames: np.ndarray):
    """Shared first stage: background, distance map, labels and object tracks."""
    bg, texture = estimate_background(frames)
    size = frames.shape[1]
    bg_img, tones = background_model(bg, texture, size)
    dist = foreground_distance(frames, bg_img, tones)
    mask = dist > FG_THRESHOLD
    lab = label_components(mask)
    tracks = track(components(mask, lab))
    return bg, texture, bg_img, dist, lab, tracks


def _object(frames, bg, bg_img, dist, lab, labels_per_frame) -> ObjectEstimate:
    t, h, w, _ = frames.shape
    own = np.zeros(lab.shape, dtype=bool)
    for k, lids in enumerate(labels_per_frame):
        if lids:
            own[k] = np.isin(lab[k], lids)
    f = frames.astype(np.float32)
    bgf = np.broadcast_to(bg_img, f.shape)
    ci = _colour(f[own], bgf[own], bg)
    c, s = _OBJ_RGB[ci], _OBJ_SHADE[ci]
    # Stripes: interior pixels that sit nearer the dark shade than the colour itself.
    core = _erode(own)
    core = core if core.sum() >= 4 else own
    p = f[core]
    m = np.clip(((p - s) * (c - s)).sum(-1) / float(((c - s) ** 2).sum()), 0, 1)
    striped = float((m < 0.75).mean()) > 0.25
    # Coverage: distance from background relative to the full-contrast distance.
    ref = np.minimum(np.linalg.norm(c - bg_img, axis=-1), np.linalg.norm(s - bg_img, axis=-1)) \
        if striped else np.linalg.norm(c - bg_img, axis=-1)
    alpha = np.where(own, np.clip(dist / ref[None], 0, 1), 0.0)
    errs: dict = {}
    halves: dict = {}
    cent = np.full((t, 2), np.nan)
    for k in range(t):
        if alpha[k].sum() < 1.0:
            continue
        fit = _fit_frame(alpha[k], h)
        for key, (e, hf) in fit.items():
            errs.setdefault(key, []).append(e)
            halves.setdefault(key, np.full(t, np.nan))[k] = hf
        a = alpha[k]
        cent[k] = [(a.sum(0) * (np.arange(w) + 0.5)).sum() / a.sum() / w,
                   (a.sum(1) * (np.arange(h) + 0.5)).sum() / a.sum() / h]
    if not errs:
        return ObjectEstimate(_OBJ_NAMES[ci], "circle", "small", "solid", "static", cent,
                              np.full(t, np.nan))
    shape, outlined = min(errs, key=lambda key: np.mean(errs[key]))
    scales = 2 * halves[(shape, outlined)]
    motion = _motion(cent, scales)
    ok = ~np.isnan(scales)
    if motion == "growing":
        # Frame 0 is t=0 where a growing object is GROW_START of its nominal size.
        kk = np.flatnonzero(ok)
        nominal = np.polyval(np.polyfit(kk, scales[ok], 1), 0) / GROW_START
    else:
        nominal = float(np.median(scales[ok]))
    size = "large" if nominal > _SIZE_SPLIT else "small"
    style = "outlined" if outlined else ("striped" if striped else "solid")
    return ObjectEstimate(_OBJ_NAMES[ci], shape, size, style, motion, cent, scales)


def analyze(frames: np.ndarray) -> SceneEstimate:
    """Estimate a scene from uint8 frames [T,H,W,3] using pixels only."""
    bg, texture, bg_img, dist, lab, tracks = _segment(frames)
    objs = [_object(frames, bg, bg_img, dist, lab, tr) for tr in tracks]
    return SceneEstimate(bg, texture, objs)


def _match(scene: Scene, est: SceneEstimate, i: int = 0) -> ObjectEstimate | None:
    """Estimated object whose first sighting is nearest scene object i's start position."""
    if not est.objects:
        return None
    gt = np.array([scene.objects[i].start_x, scene.objects[i].start_y])

    def dist(o: ObjectEstimate) -> float:
        ok = np.flatnonzero(~np.isnan(o.centroids[:, 0]))
        return float(np.linalg.norm(o.centroids[ok[0]] - gt)) if len(ok) else np.inf

    return min(est.objects, key=dist)


def compare(scene: Scene, estimate: SceneEstimate, i: int = 0) -> dict[str, bool]:
    """Per-attribute correctness of the estimate for scene object i (default: the first)."""
    obj = _match(scene, estimate, i)
    gt = scene.objects[i]
    out = {"background": estimate.background == scene.background}
    for attr in ATTRIBUTES[1:]:
        out[attr] = obj is not None and getattr(obj, attr) == getattr(gt, attr)
    return out


def agreement(results) -> float:
    """Fraction of True entries in one compare() dict or an iterable of them."""
    if isinstance(results, dict):
        results = [results]
    vals = [bool(v) for r in results for v in r.values()]
    return float(np.mean(vals)) if vals else 0.0


def object_found_fraction(frames: np.ndarray) -> float:
    """Fraction of frames in which at least one object-sized blob is found."""
    bg, texture = estimate_background(frames)
    bg_img, tones = background_model(bg, texture, frames.shape[1])
    comps = components(foreground_distance(frames, bg_img, tones) > FG_THRESHOLD)
    return float(np.mean([len(c) > 0 for c in comps]))


def trajectory_smoothness(frames: np.ndarray) -> float:
    """Mean |second difference| of the main object's centroid (frame units); NaN if untracked."""
    objs = analyze(frames).objects
    if not objs:
        return float("nan")
    # Main object = the one seen in the most frames.
    c = max(objs, key=lambda o: int((~np.isnan(o.centroids[:, 0])).sum())).centroids
    vals = np.linalg.norm(c[2:] - 2 * c[1:-1] + c[:-2], axis=-1)
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else float("nan")
