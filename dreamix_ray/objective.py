"""The diffusion losses shared by pretraining, finetuning and the Ray Train loop (paper Sec. 4.2)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .degrade import downsample_for_training, upsample_condition
from .models.cascade import Stage


def diffusion_loss(stage: Stage, x0_bcfhw, cond_bcfhw, tokens, pooled, gen: torch.Generator,
                   frame_mode_on: bool) -> torch.Tensor:
    """||D(z_t, t, text, c) - v||^2 at a uniform timestep; frame mode masks the temporal layers."""
    b = x0_bcfhw.shape[0]
    t = torch.randint(0, stage.scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(x0_bcfhw.shape, generator=gen)
    x_t = stage.scheduler.add_noise(x0_bcfhw, noise, t)
    target = stage.scheduler.get_velocity(x0_bcfhw, noise, t)
    pred = stage.denoiser(x_t, t, tokens, pooled, cond_bcfhw, frame_mode_on=frame_mode_on)
    return F.mse_loss(pred, target)


def is_frame_step(seed: int, step: int, alpha: float) -> bool:
    """Whether `step` trains L_frame (prob. 1 - alpha) or L_vid; a pure function of (seed, step),
    so every data-parallel rank makes the same choice and the collectives line up."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 >= alpha


def sr_condition(stage: Stage, hi_bcfhw: torch.Tensor, frames_as_images: bool) -> torch.Tensor | None:
    """The low-res input an SR stage trains with, made from its target; frames as images are their own
    temporal low-res version (a TSR sees each still frame as a constant clip)."""
    kind = stage.config.kind
    if kind == "base":
        return None
    if kind == "tsr" and frames_as_images:
        return hi_bcfhw
    return upsample_condition(downsample_for_training(hi_bcfhw, stage.config), stage.config)
