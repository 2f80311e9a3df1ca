"""Degrade (paper Sec. 4.1): downsample to the base stage, then noise at strength s."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import StageConfig, validate_strength
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # decoding is not needed to train or sample, so PyAV loads only when used
    from .video import Video


def frames_to_tensor(frames_fhwc: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [1, 3, F, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames_fhwc)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2).unsqueeze(0)


def tensor_to_frames(x_bcfhw: torch.Tensor) -> np.ndarray:
    """float [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    x = (x_bcfhw.detach().float().clamp(-1, 1) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def downsample_to_stage(video: Video, stage: StageConfig, num_frames: int | None = None,
                        fit: str = "crop") -> torch.Tensor:
    """The input at the base stage's fps, frame count and size, as [1, 3, F, H, W]."""
    from .video import resample

    small = resample(video, fps=stage.fps, num_frames=num_frames or stage.frames,
                     height=stage.height, width=stage.width, fit=fit)
    return frames_to_tensor(small.frames)


def noise_at_strength(x0_bcfhw: torch.Tensor, strength: float, scheduler, steps: int,
                      generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s ~ q(x_s | x_0) at the first timestep the strength cut keeps; returns (x_s, remaining timesteps).
    For a flow stage that is x_s = (1 - sigma_s) x0 + sigma_s eps with the schedule's (shifted) sigma_s.

    The noise is always drawn (even at s = 0) so a row's later draws do not depend on s.
    """
    # Here, not at the top: sampling imports diffusers' schedulers, which a process that only downsamples
    # videos (the batch pipeline's Decode actors) should not wait for.
    from .sampling import add_noise_at, draw_noise, strength_timesteps

    strength = validate_strength(strength)
    timesteps = strength_timesteps(scheduler, steps, strength)
    noise = draw_noise(tuple(x0_bcfhw.shape), generators, x0_bcfhw.dtype, x0_bcfhw.device)
    if len(timesteps) == 0:
        return x0_bcfhw, timesteps
    t0 = timesteps[:1].repeat(x0_bcfhw.shape[0])
    return add_noise_at(scheduler, x0_bcfhw, noise, t0), timesteps


def upsample_condition(prev_bcfhw: torch.Tensor, stage: StageConfig) -> torch.Tensor:
    """The previous stage's output at this SR stage's frame count (tsr) or size (ssr)."""
    if stage.kind == "tsr":
        return prev_bcfhw.repeat_interleave(stage.factor, dim=2)
    if stage.kind == "ssr":
        b, c, f, h, w = prev_bcfhw.shape
        frames = prev_bcfhw.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        if stage.latent is None:
            up = F.interpolate(frames, scale_factor=stage.factor, mode="bilinear", align_corners=False)
        else:  # a latent SSR refines at its own size (zeroscope: 576x320 -> 1024x576 is no integer factor)
            up = F.interpolate(frames, size=(stage.height, stage.width), mode="bilinear", align_corners=False)
        return up.reshape(b, f, c, *up.shape[-2:]).permute(0, 2, 1, 3, 4)
    raise ValueError(f"stage {stage.name!r} of kind {stage.kind!r} takes no condition")


def downsample_for_training(hi_bcfhw: torch.Tensor, stage: StageConfig) -> torch.Tensor:
    """The low-res input an SR stage sees, made from its high-res target (training pairs)."""
    if stage.kind == "tsr":
        return hi_bcfhw[:, :, :: stage.factor]
    b, c, f, h, w = hi_bcfhw.shape
    frames = hi_bcfhw.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    low = F.avg_pool2d(frames, stage.factor)
    return low.reshape(b, f, c, h // stage.factor, w // stage.factor).permute(0, 2, 1, 3, 4)
