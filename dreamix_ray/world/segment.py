"""Pixel-level helpers for the analyzer: background naming, connected components, tracking."""

from __future__ import annotations

import numpy as np

from .render import _background, checker_tone
from .scene import BACKGROUND_COLOURS, Scene

FG_THRESHOLD = 28.0  # RGB distance from background; well below the smallest object contrast (~90)
MIN_AREA_FRAC = 0.002  # components smaller than this fraction of the frame are noise

_BG_NAMES = list(BACKGROUND_COLOURS)
_BG_BASE = np.array([BACKGROUND_COLOURS[n] for n in _BG_NAMES], dtype=np.float32)
_BG_TONE = np.stack([checker_tone(c) for c in _BG_BASE])


def estimate_background(frames: np.ndarray) -> tuple[str, str]:
    """(colour name, texture) from border pixels, which objects never reach."""
    f = frames.astype(np.float32)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1).reshape(-1, 3)
    cands = np.concatenate([_BG_BASE, _BG_TONE])
    d = np.linalg.norm(border[:, None, :] - cands[None], axis=-1)
    idx = d.argmin(1)
    names = idx % len(_BG_NAMES)
    best = int(np.bincount(names, minlength=len(_BG_NAMES)).argmax())
    # Checker tones of the winning colour show up on roughly half the border pixels.
    mine = names == best
    tone_frac = float((idx[mine] >= len(_BG_NAMES)).mean()) if mine.any() else 0.0
    return _BG_NAMES[best], ("checkered" if tone_frac > 0.15 else "plain")


def background_model(name: str, texture: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-pixel background image [H,W,3], candidate tones [k,3]) for distance computations."""
    img = _background(Scene(name, texture, ()), size)
    base = np.asarray(BACKGROUND_COLOURS[name], dtype=np.float32)
    tones = np.stack([base, checker_tone(base)]) if texture == "checkered" else base[None]
    return img, tones


def foreground_distance(frames: np.ndarray, bg_img: np.ndarray, tones: np.ndarray) -> np.ndarray:
    """[T,H,W] RGB distance to the nearest plausible background value."""
    f = frames.astype(np.float32)
    d = np.linalg.norm(f - bg_img[None], axis=-1)
    # Comparing against the flat tones too tolerates misaligned checks in generated videos.
    for tone in tones:
        d = np.minimum(d, np.linalg.norm(f - tone, axis=-1))
    return d


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels per frame of a [T,H,W] bool mask (0 = background)."""
    t, h, w = mask.shape
    big = np.iinfo(np.int64).max
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:
        # Min-label propagation; converges in about a component's geodesic radius.
        p = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        m = lab.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(m, p[:, dy:dy + h, dx:dx + w], out=m)
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, 0)


def components(mask: np.ndarray, lab: np.ndarray | None = None) -> list[list[tuple[int, np.ndarray]]]:
    """Per frame, a list of (label, centroid_yx) for components above the noise area."""
    t, h, w = mask.shape
    lab = label_components(mask) if lab is None else lab
    min_area = max(2.0, MIN_AREA_FRAC * h * w)
    out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(t)]
    ids, inv, counts = np.unique(lab.ravel(), return_inverse=True, return_counts=True)
    fy = np.broadcast_to(np.arange(h)[None, :, None], lab.shape).ravel()
    fx = np.broadcast_to(np.arange(w)[None, None, :], lab.shape).ravel()
    sy = np.bincount(inv, weights=fy)
    sx = np.bincount(inv, weights=fx)
    for j, (lid, n) in enumerate(zip(ids, counts)):
        if lid == 0 or n < min_area:
            continue
        frame = int((lid - 1) // (h * w))
        out[frame].append((int(lid), np.array([sy[j] / n, sx[j] / n])))
    return out


def track(comps: list[list[tuple[int, np.ndarray]]]) -> list[list[list[int]]]:
    """Group components into object tracks: result[k][t] = labels of object k in frame t."""
    counts = [len(c) for c in comps]
    if not any(counts):
        return []
    # Object count = most common per-frame count; ties go to the larger count.
    vals, freq = np.unique([c for c in counts if c], return_counts=True)
    k = int(vals[np.flatnonzero(freq == freq.max())].max())
    ref = next(i for i, c in enumerate(counts) if c == k)
    pos = [c for _, c in comps[ref]]
    tracks: list[list[list[int]]] = [[[] for _ in comps] for _ in range(k)]
    for j, (lid, _) in enumerate(comps[ref]):
        tracks[j][ref].append(lid)
    order = list(range(ref + 1, len(comps))) + list(range(ref - 1, -1, -1))
    last = {ref: list(pos)}
    for t in order:
        prev = last[t - 1] if t > ref else last[t + 1]
        cur = list(prev)
        assigned: dict[int, list[np.ndarray]] = {}
        # Greedy nearest-neighbour matching, closest pairs first; fragments join the nearest track.
        pairs = sorted(((float(np.linalg.norm(c - prev[j])), i, j)
                        for i, (_, c) in enumerate(comps[t]) for j in range(k)))
        used_c, used_t = set(), set()
        for _, i, j in pairs:
            if i in used_c or j in used_t:
                continue
            used_c.add(i), used_t.add(j)
            tracks[j][t].append(comps[t][i][0])
            assigned.setdefault(j, []).append(comps[t][i][1])
        for i, (lid, c) in enumerate(comps[t]):
            if i not in used_c:
                j = int(np.argmin([np.linalg.norm(c - p) for p in prev]))
                tracks[j][t].append(lid)
        for j, cs in assigned.items():
            cur[j] = cs[0]
        last[t] = cur
    return tracks
