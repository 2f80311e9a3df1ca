"""The diffusion losses shared by pretraining, finetuning and the Ray Train loop (paper Sec. 4.2)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .degrade import downsample_for_training, upsample_condition
from .errors import UserError
from .models.cascade import Stage
from .sampling import scheduler_family


def diffusion_loss(stage: Stage, x0_bcfhw, cond_bcfhw, tokens, pooled, gen: torch.Generator,
                   frame_mode_on: bool) -> torch.Tensor:
    """||D(z_t, t, text, c) - target||^2 at a uniform timestep; frame mode masks the temporal layers.

    The target follows the scheduler's prediction_type: v for our stages, epsilon for ModelScope-family ones.
    """
    t_b, noise_bcfhw = draw_training_noise(stage, x0_bcfhw, gen)
    return v_loss(stage, x0_bcfhw, cond_bcfhw, tokens, pooled, t_b, noise_bcfhw, frame_mode_on)


def draw_training_noise(stage: Stage, x0_bcfhw, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps [B] and noise diffusion_loss draws from `gen`, in its order."""
    t_b = torch.randint(0, stage.scheduler.config.num_train_timesteps, (x0_bcfhw.shape[0],), generator=gen)
    return t_b, torch.randn(x0_bcfhw.shape, generator=gen)


def v_loss(stage: Stage, x0_bcfhw, cond_bcfhw, tokens, pooled, t_b, noise_bcfhw, frame_mode_on: bool,
           reduction: str = "mean") -> torch.Tensor:
    """diffusion_loss at given draws; reduction="sum" lets shards of a batch add up to its mean."""
    if scheduler_family(stage.scheduler) == "flow":
        raise UserError(f"stage {stage.config.name!r}: finetuning flow-matching stages (Wan) is not supported yet; "
                        "edit with the cascade as converted (docs/REAL_MODELS.md, Wan)")
    device = stage.denoiser.device  # draws are made on the CPU, the same on any device
    x0_bcfhw, noise_bcfhw, t_b, tokens, pooled = (v.to(device) for v in (x0_bcfhw, noise_bcfhw, t_b, tokens, pooled))
    cond_bcfhw = cond_bcfhw.to(device) if cond_bcfhw is not None else None
    x_t = stage.scheduler.add_noise(x0_bcfhw, noise_bcfhw, t_b)
    target = prediction_target(stage.scheduler, x0_bcfhw, noise_bcfhw, t_b)
    pred = stage.denoiser(x_t, t_b, tokens, pooled, cond_bcfhw, frame_mode_on=frame_mode_on)
    return F.mse_loss(pred, target, reduction=reduction)


def prediction_target(scheduler, x0_bcfhw, noise_bcfhw, t_b) -> torch.Tensor:
    """What the network regresses, by the scheduler's prediction_type (v, epsilon or x0)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise_bcfhw
    if kind == "v_prediction":
        return scheduler.get_velocity(x0_bcfhw, noise_bcfhw, t_b)
    if kind == "sample":
        return x0_bcfhw
    raise ValueError(f"unknown prediction_type {kind!r} in the stage's scheduler config")


@dataclass
class TrainBatch:
    """One step's global batch with every random draw made, so any split of it sums to the same loss."""

    frames_step: bool  # frame mode (L_frame / image step): the same on every data-parallel rank
    x0_bcfhw: torch.Tensor
    cond_bcfhw: torch.Tensor | None
    tokens: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, D]
    t_b: torch.Tensor
    noise_bcfhw: torch.Tensor

    def loss(self, stage: Stage, reduction: str = "mean") -> torch.Tensor:
        return v_loss(stage, self.x0_bcfhw, self.cond_bcfhw, self.tokens, self.pooled, self.t_b, self.noise_bcfhw,
                      self.frames_step, reduction)


def is_frame_step(seed: int, step: int, alpha: float) -> bool:
    """Whether `step` trains L_frame (prob. 1 - alpha) or L_vid; a pure function of (seed, step),
    so every data-parallel rank makes the same choice and the collectives line up."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 >= alpha


def sr_condition(stage: Stage, hi_bcfhw: torch.Tensor, frames_as_images: bool) -> torch.Tensor | None:
    """The low-res input an SR stage trains with, made from its target; frames as images are their own
    temporal low-res version (a TSR sees each still frame as a constant clip)."""
    kind = stage.config.kind
    if kind == "base" or stage.config.latent is not None:  # latent SSRs refine by SDEdit: no condition
        return None
    if kind == "tsr" and frames_as_images:
        return hi_bcfhw
    return upsample_condition(downsample_for_training(hi_bcfhw, stage.config), stage.config)
