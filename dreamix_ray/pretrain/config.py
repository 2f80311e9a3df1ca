"""One stage's pretraining run: its config, learning-rate schedule and architecture."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import _Dict


@dataclass(frozen=True)
class PretrainConfig(_Dict):
    """One stage's pretraining run (Imagen Video style: videos plus frames-as-images)."""

    stage: str = "base"
    minutes: float = 60.0
    max_steps: int = 1_000_000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 200  # linear warmup, then cosine decay to lr * final_lr_fraction at max_steps
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.995
    # Steps trained in frame mode on frames as independent images. They teach appearance, never motion:
    # a small share is enough (the base learns colour and shape long before the translations).
    image_fraction: float = 0.05
    # Chance that a translating single-object scene comes with its time-reversed twin (same object and
    # background, opposite direction) in the same batch. Session 3's base moved objects along the right
    # axis but in the wrong direction half the time (BENCHMARKS.md); the twin's caption differs from its
    # pair's only in the direction word, so the gradient of the pair is about direction alone.
    reversed_twins: float = 0.5
    ssr_crop: int = 32  # SSR trains on random crops of its output size (it is fully convolutional)
    ssr_crop_frames: int = 8
    cond_noise: float = 0.1  # max Gaussian noise on an SR stage's low-res input (robust to base errors)
    caption_dropout: float = 0.1  # captions replaced by "" so the model also learns p(x): enables guidance
    seed: int = 0
    # A trained stage (diffusers folder) to start from instead of random weights. A conv that gained
    # input channels keeps the trained slice; the new slice keeps its random init. (Zero would keep the
    # trained model's output exactly, but motion planes then never learn: their gain and their conv
    # weights both start near zero and each one's gradient is proportional to the other. Measured:
    # after 700 steps the left / right gains differed by 0.02.)
    init_from: str = ""
    checkpoint_every_s: float = 180.0
    checkpoint_every: int = 0  # steps, besides checkpoint_every_s; 0 = by time only
    grad_clip: float = 1.0


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to cfg.lr * final_lr_fraction at max_steps (a function of step,
    so a resumed run continues the same schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
