"""Noise schedules, the samplers (stochastic DDIM, DPM-Solver++, stochastic flow Euler) and the start-at-strength
cut (paper Sec. 4.1, App. A.1).

A stage's family follows its scheduler: "ddim" (DDIMScheduler: our stages, ModelScope / zeroscope) or "flow"
(FlowMatchEulerDiscreteScheduler: Wan). A DDIM-family stage may sample with DPM-Solver++ instead ("dpm", its
StageConfig.sampler; `sampling_scheduler` makes the run's scheduler). `add_noise_at` and `SAMPLERS` pick the
run scheduler's forward process and sampler, so edit.run_stage stays one runner."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
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


def sampling_scheduler(scheduler, sampler: str = "ddim", eta: float = 0.0):
    """The private scheduler one stage run samples with: a copy of the stage's own, or for sampler "dpm++" a
    DPM-Solver++ (2M) on the same noise schedule (same betas, prediction type, zero terminal SNR, trailing
    timesteps). eta > 0 picks its SDE variant, which re-injects noise every step as stochastic DDIM does
    (its amount is fixed by the solver, not scaled by eta)."""
    if sampler == "ddim" or scheduler_family(scheduler) == "flow":
        return fresh_scheduler(scheduler)
    algorithm = "sde-dpmsolver++" if eta > 0 else "dpmsolver++"
    return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type=algorithm, solver_order=2,
                                                   final_sigmas_type="zero")


def kept_steps(steps: int, strength: float) -> int:
    """How many of `steps` timesteps run from strength s: the last round(steps * s) (diffusers' get_timesteps)."""
    return min(int(steps * strength + 1e-6), steps)


def strength_timesteps(scheduler: DDIMScheduler, steps: int, strength: float) -> torch.Tensor:
    """The last round(steps * s) of `steps` timesteps: SDEdit as a cut of the list (diffusers' get_timesteps)."""
    scheduler.set_timesteps(steps)
    keep = kept_steps(steps, strength)
    return scheduler.timesteps[steps - keep:]


def scheduler_family(scheduler) -> str:
    """"flow" for a flow-matching scheduler (x_t = (1 - sigma) x0 + sigma eps), "dpm" for a DPM-Solver++ run of
    a DDIM-family stage (the same forward process), else "ddim"."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow"
    return "dpm" if isinstance(scheduler, DPMSolverMultistepScheduler) else "ddim"


def add_noise_at(scheduler, x0_bcfhw: torch.Tensor, noise_bcfhw: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) of the scheduler's family: DDIM's add_noise, or flow's (1 - sigma_t) x0 + sigma_t eps
    (scale_noise, as diffusers' WanVideoToVideoPipeline)."""
    if scheduler_family(scheduler) == "flow":
        return scheduler.scale_noise(x0_bcfhw, t_b, noise_bcfhw)
    return scheduler.add_noise(x0_bcfhw, noise_bcfhw, t_b)


def seed_generators(seeds: list[int], *salt: int) -> list[torch.Generator]:
    """One generator per row, derived from (row seed, stage, chunk) so no draw depends on batching or order."""
    gens = []
    for seed in seeds:
        digest = hashlib.sha256(repr((int(seed),) + tuple(salt)).encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return gens


def draw_noise(shape: tuple[int, ...], generators: list[torch.Generator], dtype=torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Row b's noise comes from generators[b] alone (CPU generators, moved to `device`: device-independent).
    The copy to a GPU goes through pinned memory without blocking: a pageable copy would wait for the GPU
    to drain its queue once per sampling step."""
    noise = randn_tensor(shape, generator=generators, dtype=dtype, device=torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cpu":
        return noise
    return noise.pin_memory().to(device, non_blocking=True)


def signal_noise_scales(scheduler, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) per row, shaped and placed to multiply `like` (B, C, F, H, W)."""
    alpha_bar = _alphas_cumprod_on(scheduler, t.device)[t].view(-1, 1, 1, 1, 1)
    return alpha_bar.sqrt().to(like.device, like.dtype), (1 - alpha_bar).sqrt().to(like.device, like.dtype)


def _alphas_cumprod_on(scheduler, device: torch.device) -> torch.Tensor:
    """The scheduler's alpha_bar table on `device`, copied once per scheduler: indexing the CPU table with a
    GPU timestep would read the timestep back to the host every step. Stages sample on a private scheduler
    (fresh_scheduler), so the copy lives as long as one stage run."""
    copies = scheduler.__dict__.setdefault("_dreamix_alphas_cumprod", {})
    if device not in copies:
        copies[device] = scheduler.alphas_cumprod.to(device)
    return copies[device]


def ddim_sample(
    denoise: Denoise,
    x_bcfhw: torch.Tensor,
    scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
    timesteps: torch.Tensor,
    eta: float,
    generators: list[torch.Generator],
    progress: bool | str = False,
) -> torch.Tensor:
    """Stochastic DDIM from the first of `timesteps` to 0 (eta > 0 re-injects fresh noise each step); on a
    DPM-Solver++ scheduler (sampling_scheduler) its second-order step instead, the SDE variant's noise drawn the
    same way. A DPM scheduler finds its place in the schedule from the first timestep, so an SDEdit start works
    for both."""
    dpm = scheduler_family(scheduler) == "dpm"
    stochastic = scheduler.config.algorithm_type.startswith("sde") if dpm else eta > 0
    step_args = {} if dpm else {"eta": eta}
    desc = progress if isinstance(progress, str) else "sampling"
    for t in tqdm(timesteps.tolist(), desc=desc, disable=not progress, leave=False, unit="step"):
        t_b = torch.full((x_bcfhw.shape[0],), t, dtype=torch.long, device=x_bcfhw.device)
        v_bcfhw = denoise(x_bcfhw, t_b)
        noise = draw_noise(tuple(x_bcfhw.shape), generators, x_bcfhw.dtype, x_bcfhw.device) if stochastic else None
        x_bcfhw = scheduler.step(v_bcfhw, t, x_bcfhw, variance_noise=noise, **step_args).prev_sample
    return x_bcfhw


def flow_sample(
    denoise: Denoise,
    x_bcfhw: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    timesteps: torch.Tensor,
    eta: float,
    generators: list[torch.Generator],
    progress: bool | str = False,
) -> torch.Tensor:
    """Flow matching from the first of `timesteps` to sigma 0: diffusers' Euler step at eta 0; eta > 0 is DDIM's
    eta on the flow schedule (alpha = 1 - sigma), fresh noise of std c = eta * sigma' * sqrt(1 - (alpha sigma' /
    (alpha' sigma))^2) per step, so eta 1 samples the posterior q(x' | x, x0) as ancestral DDPM does."""
    if len(timesteps) == 0:  # strength 0: nothing to sample
        return x_bcfhw
    # Host values are read once, before the loop: sigmas as floats, and the timesteps copied to the device
    # in one go, so a step reads nothing back from the device (the scheduler keeps its CPU copy).
    sigmas, first = scheduler.sigmas.tolist(), scheduler.index_for_timestep(timesteps[0])
    on_device = timesteps.to(x_bcfhw.device)
    desc = progress if isinstance(progress, str) else "sampling"
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False, unit="step")):
        t_b = on_device[i].expand(x_bcfhw.shape[0])
        v_bcfhw = denoise(x_bcfhw, t_b)  # the network predicts the velocity eps - x0
        if eta <= 0:
            x_bcfhw = scheduler.step(v_bcfhw, t, x_bcfhw).prev_sample
            continue
        sigma, sigma_next = sigmas[first + i], sigmas[first + i + 1]
        x0_bcfhw, eps_bcfhw = x_bcfhw - sigma * v_bcfhw, x_bcfhw + (1 - sigma) * v_bcfhw
        ratio = (1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)
        c = eta * sigma_next * max(0.0, 1 - ratio ** 2) ** 0.5
        noise = draw_noise(tuple(x_bcfhw.shape), generators, x_bcfhw.dtype, x_bcfhw.device)
        x_bcfhw = (1 - sigma_next) * x0_bcfhw + (sigma_next ** 2 - c ** 2) ** 0.5 * eps_bcfhw + c * noise
    return x_bcfhw


SAMPLERS = {"ddim": ddim_sample, "dpm": ddim_sample, "flow": flow_sample}


def guided(denoise_cond: Denoise, denoise_uncond: Denoise | None, scale: float) -> Denoise:
    """Classifier-free guidance; scale 1 (the paper's setting) calls the conditional model only."""
    if scale == 1.0 or denoise_uncond is None:
        return denoise_cond

    def denoise(x, t):
        cond, uncond = denoise_cond(x, t), denoise_uncond(x, t)
        return uncond + scale * (cond - uncond)

    return denoise


def guided_batched(denoise_pair: Denoise, scale: float) -> Denoise:
    """Classifier-free guidance in one forward at batch 2B: `denoise_pair` sees [x, x] and is conditioned on
    [text, negative text] (faster than two forwards; `guided` runs them one after the other, at half the memory)."""

    def denoise(x, t):
        cond, uncond = denoise_pair(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise
