"""Keep the TSR's input frames in its output (EditConfig.sr_consistency).

A TSR x k only adds frames: output frame k*i is input frame i, and whatever the base drew must
survive it. Our small TSR (425 pretraining steps) does not always do that: given a solid circle it
can return a striped or speckled one at the same size. So at every step the TSR's clean-clip
estimate x0 has those frames replaced by the input (the replacement method of Ho et al. 2022, "Video
Diffusion Models", Sec. 3.1, applied to x0), and its noise estimate is made consistent with x_t and
the new x0, so DDIM's next x0 is exactly the replaced one; the frames in between stay the model's.

The SSR is left alone: forcing its 4x4 block means onto its input (ILVR's low-pass replacement) made
edits worse on the tuning videos (BENCHMARKS.md, "Motion edits and the SR stages").
"""

from __future__ import annotations

import torch

from .config import StageConfig
from .sampling import Denoise, signal_noise_scales


def project_tsr(x0_bcfhw: torch.Tensor, prev_bcfhw: torch.Tensor, factor: int) -> torch.Tensor:
    """x0 with frames 0, k, 2k, ... set to the TSR's input frames."""
    out = x0_bcfhw.clone()
    out[:, :, ::factor] = prev_bcfhw
    return out


def input_kept(denoise: Denoise, scheduler, stage: StageConfig, prev_bcfhw: torch.Tensor) -> Denoise:
    """`denoise` of a pixel TSR whose clean-clip estimate always holds `prev_bcfhw` (its input) as its
    keyframes; any other stage's `denoise` unchanged."""
    prediction = scheduler.config.prediction_type
    if stage.kind != "tsr" or stage.latent is not None or prediction not in ("v_prediction", "epsilon"):
        return denoise

    def fn(x, t):
        out = denoise(x, t)
        a, s = signal_noise_scales(scheduler, t, x)
        x0 = a * x - s * out if prediction == "v_prediction" else (x - s * out) / a.clamp_min(1e-4)
        x0 = project_tsr(x0, prev_bcfhw.to(x.device, x.dtype), stage.factor)
        eps = (x - a * x0) / s  # the noise that makes x_t consistent with the new x0
        return a * eps - s * x0 if prediction == "v_prediction" else eps

    return fn
