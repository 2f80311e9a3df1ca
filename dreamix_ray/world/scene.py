"""Vocabularies and frozen scene descriptions for the procedural shapes world."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# One shared palette so the analyzer can name any pixel with a single nearest-colour lookup.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 135, 20),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# White/black/gray objects are left out: a striped white object's dark shade would be gray.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    k: COLOURS[k] for k in ("red", "green", "blue", "yellow", "purple", "orange")
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    k: COLOURS[k] for k in ("white", "black", "gray", "blue", "green")
}

SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.42}  # diameter / side as a fraction of frame width
STYLES = ("solid", "striped", "outlined")
BACKGROUND_TEXTURES = ("plain", "checkered")
MOTIONS = ("left", "right", "up", "down", "static", "bouncing", "growing")

# Defaults are the attribute values a canonical caption leaves unsaid.
DEFAULT_SIZE = "large"
DEFAULT_STYLE = "solid"
DEFAULT_TEXTURE = "plain"

# Motion is defined in seconds so any fps / frame count samples the same continuous clip.
CLIP_SECONDS = 2.0
TRAVEL = 0.5  # frame widths crossed by left/right/up/down over CLIP_SECONDS
SPEED = TRAVEL / CLIP_SECONDS
BOUNCE_HEIGHT = 0.25  # frame heights
BOUNCE_PERIOD = 1.0  # seconds per bounce
GROW_START, GROW_END = 0.6, 1.3  # scale factor at t=0 and t=CLIP_SECONDS
MARGIN = 0.02  # keeps anti-aliased edges off the frame border
MIN_GAP = 0.1  # min gap between objects: keeps them separate blobs even at 16x16

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class ObjectSpec:
    """One moving shape; start_x/start_y are its centre at t=0 in [0,1] frame coordinates."""

    shape: str
    colour: str
    size: str
    style: str
    motion: str
    start_x: float
    start_y: float

    @property
    def diameter(self) -> float:
        """Nominal diameter / side length as a fraction of frame width."""
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    """A background plus a tuple of objects; seed records how it was sampled."""

    background: str
    texture: str
    objects: tuple[ObjectSpec, ...]
    seed: int = 0

    def __post_init__(self):
        if self.background not in BACKGROUND_COLOURS or self.texture not in BACKGROUND_TEXTURES:
            raise ValueError(f"bad background {self.background!r}/{self.texture!r}")
        for o in self.objects:
            if (o.shape not in SHAPES or o.colour not in OBJECT_COLOURS or o.size not in SIZES
                    or o.style not in STYLES or o.motion not in MOTIONS):
                raise ValueError(f"bad object {o}")
            if o.colour == self.background:
                raise ValueError("object colour must differ from the background")

    def replace_object(self, i: int, **attrs) -> "Scene":
        """Return a copy with object i's attributes replaced (start kept valid for new motion/size)."""
        obj = dataclasses.replace(self.objects[i], **attrs)
        if not {"start_x", "start_y"} & attrs.keys():
            obj = _clamp_start(obj)
        objs = self.objects[:i] + (obj,) + self.objects[i + 1:]
        return dataclasses.replace(self, objects=objs)

    def replace(self, **attrs) -> "Scene":
        """Return a copy with scene-level attributes (background, texture, ...) replaced."""
        return dataclasses.replace(self, **attrs)


def max_radius(size: str, motion: str) -> float:
    """Largest half-extent the object reaches during the clip."""
    scale = GROW_END if motion == "growing" else 1.0
    return SIZES[size] * scale / 2


def start_range(size: str, motion: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x_lo, x_hi), (y_lo, y_hi) for the start centre so the whole trajectory stays inside."""
    r = max_radius(size, motion) + MARGIN
    xlo, xhi, ylo, yhi = r, 1 - r, r, 1 - r
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        # Shrink the interval on the side the object travels toward.
        if dx > 0:
            xhi -= TRAVEL
        elif dx < 0:
            xlo += TRAVEL
        if dy > 0:
            yhi -= TRAVEL
        elif dy < 0:
            ylo += TRAVEL
    elif motion == "bouncing":
        ylo += BOUNCE_HEIGHT  # start_y is the floor; the object rises above it
    return (xlo, xhi), (ylo, yhi)


def _clamp_start(obj: ObjectSpec) -> ObjectSpec:
    """Move the start point into the valid range after an edit changed motion or size."""
    (xlo, xhi), (ylo, yhi) = start_range(obj.size, obj.motion)
    x = float(np.clip(obj.start_x, xlo, max(xlo, xhi)))
    y = float(np.clip(obj.start_y, ylo, max(ylo, yhi)))
    return dataclasses.replace(obj, start_x=x, start_y=y)


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, background: str, fixed: dict,
                   avoid_colours: set[str]) -> ObjectSpec:
    colours = [c for c in OBJECT_COLOURS if c != background and c not in avoid_colours]
    colour = fixed.get("colour") or _pick(rng, colours)
    size = fixed.get("size") or _pick(rng, SIZES)
    motion = fixed.get("motion") or _pick(rng, MOTIONS)
    shape = fixed.get("shape") or _pick(rng, SHAPES)
    style = fixed.get("style") or _pick(rng, STYLES)
    (xlo, xhi), (ylo, yhi) = start_range(size, motion)
    x = fixed.get("start_x", float(rng.uniform(xlo, max(xlo, xhi))))
    y = fixed.get("start_y", float(rng.uniform(ylo, max(ylo, yhi))))
    return ObjectSpec(shape, colour, size, style, motion, round(x, 4), round(y, 4))


def object_states(obj: ObjectSpec, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and half-size (frame units) of an object at times t (seconds)."""
    t = np.asarray(t, dtype=np.float64)
    x = np.full_like(t, obj.start_x)
    y = np.full_like(t, obj.start_y)
    half = np.full_like(t, SIZES[obj.size] / 2)
    if obj.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[obj.motion]
        x = x + dx * SPEED * t
        y = y + dy * SPEED * t
    elif obj.motion == "bouncing":
        y = y - BOUNCE_HEIGHT * np.abs(np.sin(np.pi * t / BOUNCE_PERIOD))
    elif obj.motion == "growing":
        half = half * (GROW_START + (GROW_END - GROW_START) * t / CLIP_SECONDS)
    return x, y, half


def _min_gap(a: ObjectSpec, b: ObjectSpec) -> float:
    """Smallest distance between the two objects' bounding discs over the clip (negative = overlap)."""
    t = np.linspace(0, CLIP_SECONDS, 33)
    ax, ay, ar = object_states(a, t)
    bx, by, br = object_states(b, t)
    # Treat shapes as squares of half-side r (conservative for circles and triangles).
    gap = np.maximum(np.abs(ax - bx) - ar - br, np.abs(ay - by) - ar - br)
    return float(gap.min())


OBJECT_KEYS = ("shape", "colour", "size", "style", "motion", "start_x", "start_y")


def sample_scene(rng: np.random.Generator, n_objects: int = 1, **fixed) -> Scene:
    """Random scene; `fixed` pins background/texture or attributes of the first object."""
    bad = set(fixed) - set(OBJECT_KEYS) - {"background", "texture"}
    if bad:
        raise ValueError(f"unknown scene attributes: {sorted(bad)}")
    obj_fixed = {k: v for k, v in fixed.items() if k in OBJECT_KEYS}
    bg_choices = [b for b in BACKGROUND_COLOURS if b != obj_fixed.get("colour")]
    background = fixed.get("background") or _pick(rng, bg_choices)
    if obj_fixed.get("colour") == background:
        raise ValueError("object colour must differ from the background")
    texture = fixed.get("texture") or _pick(rng, BACKGROUND_TEXTURES)
    seed = int(rng.integers(2**31))
    # Rejection-sample whole object sets so every object stays its own blob for the clip.
    for _ in range(500):
        objects = [_sample_object(rng, background, obj_fixed, set())]
        for _ in range(1, n_objects):
            used = {o.colour for o in objects}
            for _ in range(20):
                cand = _sample_object(rng, background, {}, used)
                if all(_min_gap(cand, o) > MIN_GAP for o in objects):
                    objects.append(cand)
                    break
        if len(objects) == n_objects:
            return Scene(background, texture, tuple(objects), seed)
    raise RuntimeError(f"could not place {n_objects} non-overlapping objects")
