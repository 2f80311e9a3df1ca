"""Noise schedule, stochastic DDIM and the start-at-strength cut (paper Sec. 4.1, App. A.1)."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(**overrides) -> DDIMScheduler:
    """Cosine schedule rescaled to zero terminal SNR, v-prediction, trailing timesteps.

    Zero terminal SNR makes q(x_1 | x_0) pure noise, so strength 1 equals text-to-video.
    """
    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                  prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    config.update(overrides)
    return DDIMScheduler(**config)


def fresh_scheduler(scheduler: DDIMScheduler) -> DDIMScheduler:
    """A private copy: set_timesteps mutates a scheduler, and stages are shared across calls."""
    return type(scheduler).from_config(scheduler.config)


def kept_steps(steps: int, strength: float) -> int:
    """How many of `steps` timesteps run from strength s: the last round(steps * s) (diffusers' get_timesteps)."""
    return min(int(steps * strength + 1e-6), steps)


def strength_timesteps(scheduler: DDIMScheduler, steps: int, strength: float) -> torch.Tensor:
    """The last round(steps * s) of `steps` timesteps: SDEdit as a cut of the list (diffusers' get_timesteps)."""
    scheduler.set_timesteps(steps)
    keep = kept_steps(steps, strength)
    return scheduler.timesteps[steps - keep:]


def seed_generators(seeds: list[int], *salt: int) -> list[torch.Generator]:
    """One generator per row, derived from (row seed, stage, chunk) so no draw depends on batching or order."""
    gens = []
    for seed in seeds:
        digest = hashlib.sha256(repr((int(seed),) + tuple(salt)).encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return gens


def draw_noise(shape: tuple[int, ...], generators: list[torch.Generator], dtype=torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Row b's noise comes from generators[b] alone (CPU generators, moved to `device`: device-independent)."""
    return randn_tensor(shape, generator=generators, dtype=dtype, device=torch.device(device))


def signal_noise_scales(scheduler, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) per row, shaped and placed to multiply `like` (B, C, F, H, W)."""
    alpha_bar = scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1, 1)  # the scheduler's table stays on the CPU
    return alpha_bar.sqrt().to(like.device, like.dtype), (1 - alpha_bar).sqrt().to(like.device, like.dtype)


def ddim_sample(
    denoise: Denoise,
    x_bcfhw: torch.Tensor,
    scheduler: DDIMScheduler,
    timesteps: torch.Tensor,
    eta: float,
    generators: list[torch.Generator],
    progress: bool | str = False,
) -> torch.Tensor:
    """Stochastic DDIM from the first of `timesteps` to 0 (eta > 0 re-injects fresh noise each step)."""
    steps = timesteps.tolist()
    desc = progress if isinstance(progress, str) else "sampling"
    for t in tqdm(steps, desc=desc, disable=not progress, leave=False, unit="step"):
        t_b = torch.full((x_bcfhw.shape[0],), t, dtype=torch.long, device=x_bcfhw.device)
        v_bcfhw = denoise(x_bcfhw, t_b)
        noise = draw_noise(tuple(x_bcfhw.shape), generators, x_bcfhw.dtype, x_bcfhw.device) if eta > 0 else None
        x_bcfhw = scheduler.step(v_bcfhw, t, x_bcfhw, eta=eta, variance_noise=noise).prev_sample
    return x_bcfhw


def guided(denoise_cond: Denoise, denoise_uncond: Denoise | None, scale: float) -> Denoise:
    """Classifier-free guidance; scale 1 (the paper's setting) calls the conditional model only."""
    if scale == 1.0 or denoise_uncond is None:
        return denoise_cond

    def denoise(x, t):
        cond, uncond = denoise_cond(x, t), denoise_uncond(x, t)
        return uncond + scale * (cond - uncond)

    return denoise
