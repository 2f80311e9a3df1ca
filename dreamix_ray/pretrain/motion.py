"""Motion from the captions: the motion prior motion guidance uses, and the base's experimental
text-driven motion planes (fitted projection, auxiliary supervision; BENCHMARKS.md)."""

from __future__ import annotations

import torch

from ..models.cascade import Stage
from ..models.text import TextEncoder
from ..motion_guidance import MotionPrior, fit_motion_prior
from ..world.scene import DIRECTIONS, TRAVEL, Scene
from .config import PretrainConfig
from .data import step_scenes


def motion_targets(scenes: list[Scene], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's direction as (dx, dy) * 0.8 [B, 2] (non-translations (0, 0)) and which rows count
    [B]: single-object scenes whose caption was kept."""
    target = torch.tensor([DIRECTIONS.get(s.objects[0].motion, (0.0, 0.0)) for s in scenes])
    counts = torch.tensor([len(s.objects) == 1 and c != "" for s, c in zip(scenes, captions)])
    return 0.8 * target, counts


def motion_supervision_loss(stage: Stage, pooled_bd: torch.Tensor, cfg: PretrainConfig, step: int) -> torch.Tensor:
    target, counts = motion_targets(*step_scenes(cfg, step)[:2])
    gain = stage.denoiser.motion_gain(pooled_bd)[:, :2]
    return ((gain - target) ** 2).sum(1)[counts].mean() if counts.any() else gain.sum() * 0


@torch.no_grad()
def fit_motion_projection(denoiser, text_encoder: TextEncoder, cfg: PretrainConfig, steps: int = 200) -> float:
    """Set the motion planes' text projection by ridge regression onto the directions of `steps` batches
    of training captions (what motion_supervision_loss would converge to, at once: by gradient descent
    at the UNet's learning rate, the gains had separated by only about 0.1 after 250 steps). Returns
    the fitted gains' mean squared error against the targets."""
    pooled, targets = [], []
    for step in range(steps):
        scenes, captions, _ = step_scenes(cfg, step)
        target, counts = motion_targets(scenes, captions)
        pooled.append(text_encoder([c for c, k in zip(captions, counts) if k])[1])
        targets.append(target[counts])
    x, y = torch.cat(pooled).double(), torch.cat(targets).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    logits = torch.atanh(y.clamp(-0.8, 0.8))  # tanh(W p + b) = target
    gram = x1.T @ x1
    # ridge at 1% of the mean feature energy: best on held-out captions from 60 batches to 200
    ridge = 0.01 * gram.diagonal().mean() * torch.eye(x1.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(gram + ridge, x1.T @ logits)  # [D+1, 2]
    proj = denoiser.motion_from_text
    proj.weight.zero_()
    proj.bias.zero_()
    proj.weight[:2] = solution[:-1].T.float()
    proj.bias[:2] = solution[-1].float()
    return float(((torch.tanh(x1 @ solution) - y) ** 2).sum(1).mean())


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
