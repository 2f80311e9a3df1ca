"""Plain-English captions for shapes-world scenes, with paraphrases and a best-effort parser."""

from __future__ import annotations

import re

import numpy as np

from .scene import (
    BACKGROUND_COLOURS, COLOURS, DEFAULT_SIZE, DEFAULT_STYLE, DEFAULT_TEXTURE, MOTIONS, SHAPES,
    ObjectSpec, Scene,
)

# First entry of every list is the canonical wording.
SHAPE_WORDS = {
    "circle": ["circle", "ball", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape", "wedge"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
STYLE_WORDS = {
    "solid": ["solid", "filled"],
    "striped": ["striped", "stripy"],
    "outlined": ["outlined", "hollow"],
}
MOTION_WORDS = {
    "left": ["moving left", "slides to the left", "drifting leftwards", "moves left",
             "heading left"],
    "right": ["moving right", "slides to the right", "drifting rightwards", "moves right",
              "heading right"],
    "up": ["moving up", "rising", "floats upwards", "moves up", "drifting upwards"],
    "down": ["moving down", "sinking", "falls downwards", "moves down", "drifting downwards"],
    "static": ["standing still", "staying still", "motionless", "resting in place",
               "not moving"],
    "bouncing": ["bouncing", "bounces", "hopping", "bouncing in place"],
    "growing": ["growing", "getting bigger", "expanding", "swelling", "grows"],
}
TEXTURE_WORDS = {"plain": ["plain"], "checkered": ["checkered", "checked", "chequered"]}
BACKGROUND_NOUNS = ["background", "backdrop"]

# Parser lookups; multi-word phrases are matched longest-first so "not moving" beats "moving".
_MOTION_ORDER = ("static", "bouncing", "growing", "left", "right", "up", "down")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _choose(rng: np.random.Generator | None, options: list[str]) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _object_phrase(obj: ObjectSpec, rng: np.random.Generator | None) -> str:
    words = []
    # Paraphrases sometimes also state default attributes, so "large"/"solid" appear in training text.
    if obj.size != DEFAULT_SIZE or (rng is not None and rng.random() < 0.25):
        words.append(_choose(rng, SIZE_WORDS[obj.size]))
    if obj.style != DEFAULT_STYLE or (rng is not None and rng.random() < 0.15):
        words.append(_choose(rng, STYLE_WORDS[obj.style]))
    words.append(obj.colour)
    words.append(_choose(rng, SHAPE_WORDS[obj.shape]))
    words.append(_choose(rng, MOTION_WORDS[obj.motion]))
    return _article(" ".join(words))


def _background_phrase(scene: Scene, rng: np.random.Generator | None) -> str:
    tex = "" if scene.texture == DEFAULT_TEXTURE else _choose(rng, TEXTURE_WORDS[scene.texture]) + " "
    return f"{tex}{scene.background}"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Describe a scene; rng picks paraphrases, None gives the canonical caption."""
    objs = " and ".join(_object_phrase(o, rng) for o in scene.objects)
    bg = _background_phrase(scene, rng)
    if rng is None:
        return f"{objs} on {_article(bg)} background"
    noun = _choose(rng, BACKGROUND_NOUNS)
    templates = [
        "{objs} on {a_bg} {noun}",
        "{objs} over {bg}",
        "on {a_bg} {noun}, {objs}",
        "{objs} against {a_bg} {noun}",
        "{a_bg} {noun} with {objs}",
    ]
    text = _choose(rng, templates).format(objs=objs, bg=bg, a_bg=_article(bg), noun=noun)
    return text


def canonical_caption(scene: Scene) -> str:
    """The canonical (paraphrase-free) caption of a scene."""
    return caption(scene, None)


def _find(text: str, table: dict[str, list[str]], order=None) -> tuple[str | None, int]:
    """Earliest-matching key of `table` in text (longest phrase wins at equal position)."""
    best, best_pos, best_len = None, len(text) + 1, 0
    for key in order or table:
        for phrase in table[key]:
            m = re.search(r"\b" + re.escape(phrase) + r"\b", text)
            if m and (m.start() < best_pos or (m.start() == best_pos and len(phrase) > best_len)):
                best, best_pos, best_len = key, m.start(), len(phrase)
    return best, best_pos


_COLOUR_RE = "|".join(COLOURS)
_TEX_RE = "|".join(w for ws in TEXTURE_WORDS.values() for w in ws)
_NOUN_RE = "|".join(BACKGROUND_NOUNS)
_BG_PATTERNS = [
    # "<colour> background/backdrop" (optionally preceded by a texture word)
    re.compile(rf"(?:\b(?:a|an|the)\s+)?(?:\b({_TEX_RE})\s+)?\b({_COLOUR_RE})\s+(?:{_NOUN_RE})\b"),
    # "on/over/against <colour>" with no noun
    re.compile(rf"\b(?:on|over|against)\s+(?:(?:a|an|the)\s+)?(?:({_TEX_RE})\s+)?({_COLOUR_RE})\b"),
    # "a blue checkerboard"
    re.compile(rf"(?:\b(?:a|an|the)\s+)?\b({_COLOUR_RE})\s+(checkerboard)\b"),
]


def _parse_background(text: str) -> tuple[str | None, str | None, str]:
    """(background colour, texture, text with the background phrase removed)."""
    for i, pat in enumerate(_BG_PATTERNS):
        m = pat.search(text)
        if not m:
            continue
        if i == 2:
            colour, tex = m.group(1), "checkered"
        else:
            tex_word, colour = m.group(1), m.group(2)
            tex = _find(tex_word, TEXTURE_WORDS)[0] if tex_word else None
        return colour, tex, text[:m.start()] + " " + text[m.end():]
    return None, None, text


def _parse_object(chunk: str) -> dict:
    obj = {
        "colour": next((c for c in re.findall(r"[a-z]+", chunk) if c in COLOURS), None),
        "shape": _find(chunk, SHAPE_WORDS)[0],
        "size": _find(chunk, SIZE_WORDS)[0],
        "style": _find(chunk, STYLE_WORDS)[0],
        "motion": _find(chunk, MOTION_WORDS, _MOTION_ORDER)[0],
    }
    return obj


def parse_caption(text: str, fill_defaults: bool = True) -> dict:
    """Best-effort inverse of caption(): background, texture, objects and first-object keys."""
    # fill_defaults: size/style/texture left unsaid by canonical captions get their defaults so
    # they round-trip; any other attribute that is not found is None.
    text = " ".join(re.findall(r"[a-z]+", text.lower()))
    background, texture, rest = _parse_background(text)
    chunks = [c for c in re.split(r"\band\b|,|\bwith\b", rest) if re.search(r"[a-z]", c)]
    objects = [o for o in (_parse_object(c) for c in chunks) if o["shape"] or o["colour"]]
    if fill_defaults:
        texture = texture or DEFAULT_TEXTURE
        for o in objects:
            o["size"] = o["size"] or DEFAULT_SIZE
            o["style"] = o["style"] or DEFAULT_STYLE
    out = {"background": background, "texture": texture, "objects": objects}
    first = objects[0] if objects else {k: None for k in ("colour", "shape", "size", "style", "motion")}
    out.update(first)
    return out


def scene_attributes(scene: Scene) -> dict:
    """Ground-truth dict in parse_caption's layout (for comparing prompts with scenes)."""
    objs = [{"colour": o.colour, "shape": o.shape, "size": o.size, "style": o.style,
             "motion": o.motion} for o in scene.objects]
    out = {"background": scene.background, "texture": scene.texture, "objects": objs}
    out.update(objs[0])
    return out


assert set(SHAPE_WORDS) == set(SHAPES) and set(MOTION_WORDS) == set(MOTIONS)
assert set(BACKGROUND_COLOURS) <= set(COLOURS)


def names_the_world(prompt: str) -> bool:
    """Whether a prompt names a shapes-world shape or background (what the embedded cascade can draw)."""
    parsed = parse_caption(prompt, fill_defaults=False)
    return parsed["background"] is not None or any(o["shape"] for o in parsed["objects"])
