"""Procedural shapes world: scenes, renderer, captions and a pixel-level analyzer."""

from .analyze import SceneEstimate, agreement, analyze, compare
from .captions import canonical_caption, caption, parse_caption
from .render import render
from .scene import ObjectSpec, Scene, sample_scene

__all__ = [
    "ObjectSpec", "Scene", "SceneEstimate", "agreement", "analyze", "canonical_caption",
    "caption", "compare", "parse_caption", "render", "sample_scene",
]
