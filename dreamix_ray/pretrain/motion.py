"""Motion from the captions: the motion prior motion guidance uses (motion_guidance.py)."""

from __future__ import annotations

import torch

from ..models.text import TextEncoder
from ..motion_guidance import MotionPrior, fit_motion_prior
from ..world.scene import DIRECTIONS, TRAVEL
from .config import PretrainConfig
from .data import step_scenes


@torch.no_grad()
def fit_world_motion_prior(text_encoder: TextEncoder, cfg: PretrainConfig, steps: int = 200) -> MotionPrior:
    """The motion prior for motion guidance (motion_guidance.py), fitted on the single-object captions of
    `steps` training batches: each caption's class is its translation, or "none" for any other motion."""
    classes = ["none", *DIRECTIONS]
    pooled, labels = [], []
    for step in range(steps):
        scenes, captions, _ = step_scenes(cfg, step)
        keep = [(s, c) for s, c in zip(scenes, captions) if len(s.objects) == 1 and c]
        if keep:
            pooled.append(text_encoder([c for _, c in keep])[1])
            labels += [classes.index(s.objects[0].motion) if s.objects[0].motion in DIRECTIONS else 0 for s, _ in keep]
    vectors = [(0.0, 0.0)] + [DIRECTIONS[m] for m in classes[1:]]
    return fit_motion_prior(torch.cat(pooled), torch.tensor(labels), vectors, travel=TRAVEL)
