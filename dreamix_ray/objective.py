"""The diffusion losses shared by pretraining, finetuning and the Ray Train loop (paper Sec. 4.2)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .degrade import downsample_for_training, upsample_condition
from .models.cascade import Stage
from .sampling import fresh_scheduler, scheduler_family


def diffusion_loss(stage: Stage, x0_bcfhw, cond_bcfhw, tokens, pooled, gen: torch.Generator,
                   frame_mode_on: bool) -> torch.Tensor:
    """||D(z_t, t, text, c) - target||^2 at a uniform timestep; frame mode masks the temporal layers (a Wan
    stage folds its latent frames into the batch).

    The stage's family sets the noising and the target (`training_point`): DDIM stages regress their
    scheduler's prediction_type (v for ours, epsilon for ModelScope-family ones), flow stages the velocity.
    """
    t_b, noise_bcfhw = draw_training_noise(stage, x0_bcfhw, gen)
    return v_loss(stage, x0_bcfhw, cond_bcfhw, tokens, pooled, t_b, noise_bcfhw, frame_mode_on)


def draw_training_noise(stage: Stage, x0_bcfhw, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training timestep indices [B] (uniform over num_train_timesteps) and noise diffusion_loss draws from
    `gen`, in its order; the same draws for every family (`training_point` maps an index to its noise level)."""
    t_b = torch.randint(0, stage.scheduler.config.num_train_timesteps, (x0_bcfhw.shape[0],), generator=gen)
    return t_b, torch.randn(x0_bcfhw.shape, generator=gen)


def v_loss(stage: Stage, x0_bcfhw, cond_bcfhw, tokens, pooled, t_b, noise_bcfhw, frame_mode_on: bool,
           reduction: str = "mean") -> torch.Tensor:
    """diffusion_loss at given draws; reduction="sum" lets shards of a batch add up to its mean."""
    device = stage.denoiser.device  # draws are made on the CPU, the same on any device
    x0_bcfhw, noise_bcfhw, t_b, tokens, pooled = (v.to(device) for v in (x0_bcfhw, noise_bcfhw, t_b, tokens, pooled))
    cond_bcfhw = cond_bcfhw.to(device) if cond_bcfhw is not None else None
    x_t, t_net, target = training_point(stage.scheduler, x0_bcfhw, noise_bcfhw, t_b)
    pred = stage.denoiser(x_t, t_net, tokens, pooled, cond_bcfhw, frame_mode_on=frame_mode_on)
    return F.mse_loss(pred, target, reduction=reduction)


def training_point(scheduler, x0_bcfhw, noise_bcfhw, t_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, the timestep the network sees, its regression target) at training timestep indices `t_b`, by the
    scheduler's family: the one place training tells DDIM stages from flow-matching ones."""
    if scheduler_family(scheduler) == "flow":
        return flow_training_point(scheduler, x0_bcfhw, noise_bcfhw, t_b)
    x_t = scheduler.add_noise(x0_bcfhw, noise_bcfhw, t_b)
    return x_t, t_b, prediction_target(scheduler, x0_bcfhw, noise_bcfhw, t_b)


def flow_training_point(scheduler, x0_bcfhw, noise_bcfhw, t_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow matching: x_t = (1 - sigma) x0 + sigma eps, target the velocity eps - x0, the network at timestep
    sigma * num_train_timesteps. sigma is the index's entry of a fresh scheduler's training sigmas, which carry
    its shift: diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (weighting_scheme "none": a uniform
    index into `noise_scheduler_copy.timesteps`, then `get_sigmas`), and DiffSynth-Studio's Wan training (a
    uniform timestep id of its shifted FlowMatchScheduler set for 1000 training steps; it also weights the loss
    per timestep, which we do not). A fresh copy, since sampling's set_timesteps rewrites a scheduler's sigmas."""
    sigma_b = fresh_scheduler(scheduler).sigmas[t_b.cpu()].to(x0_bcfhw.device, x0_bcfhw.dtype)
    sigma = sigma_b.view(-1, *[1] * (x0_bcfhw.dim() - 1))
    x_t = (1 - sigma) * x0_bcfhw + sigma * noise_bcfhw
    return x_t, sigma_b * scheduler.config.num_train_timesteps, noise_bcfhw - x0_bcfhw


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
