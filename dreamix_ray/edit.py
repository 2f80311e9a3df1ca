"""Dreamix edit (paper Sec. 4.1): degrade -> base from s -> every SR stage, last SSR in chunks."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import EditConfig
from .degrade import downsample_to_stage, noise_at_strength, tensor_to_frames, upsample_condition
from .models.cascade import Cascade
from .models.latent import refine_strength
from .motion_guidance import MotionPrior, motion_guided
from .sampling import ddim_sample, draw_noise, fresh_scheduler, guided, seed_generators, strength_timesteps
from .sr_consistency import input_kept
from .video import Video

StepCallback = Callable[[str, int, int], None]  # (stage name, steps done, steps total)


@dataclass
class Timings:
    """Wall seconds per stage, and seconds inside the stage networks' forward passes."""

    stage_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    network_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class _Text:
    tokens: torch.Tensor
    pooled: torch.Tensor
    uncond: tuple[torch.Tensor, torch.Tensor] | None


def _encode(cascade: Cascade, prompts: list[str], guidance_scale: float) -> _Text:
    tokens, pooled = cascade.text_encoder(prompts)
    uncond = cascade.text_encoder([""] * len(prompts)) if guidance_scale != 1.0 else None
    return _Text(tokens, pooled, uncond)


def _denoiser(cascade, index, text: _Text, cond, cfg: EditConfig, timings: Timings | None,
              anchor: torch.Tensor | None = None):
    """The stage's guided denoiser; `anchor` is the base's motion-edit input, or an SR stage's input."""
    net = cascade.stages[index].denoiser
    name = cascade.stages[index].config.name

    def call(tokens, pooled):
        def fn(x, t):
            start = time.perf_counter()
            with torch.inference_mode():
                out = net(x, t, tokens, pooled, cond)
            if timings is not None:
                timings.network_s[name] += time.perf_counter() - start
            return out
        return fn

    uncond = call(*text.uncond) if text.uncond is not None else None
    denoise = guided(call(text.tokens, text.pooled), uncond, cfg.guidance_scale)
    if index == 0 and cascade.config.motion_prior and cfg.motion_guidance > 0:
        prior = MotionPrior.from_dict(cascade.config.motion_prior)
        denoise = motion_guided(denoise, cascade.stages[0].scheduler, prior, text.pooled, cfg.motion_guidance,
                                anchor)
    if index > 0 and cfg.sr_consistency and anchor is not None:
        denoise = input_kept(denoise, cascade.stages[index].scheduler, cascade.stages[index].config, anchor)
    return denoise


def _sample(cascade, index, x, timesteps, scheduler, text, cond, cfg, gens, timings, progress, on_step, anchor=None):
    stage = cascade.stages[index]
    denoise = _denoiser(cascade, index, text, cond, cfg, timings, anchor)
    if on_step is not None:
        total, inner = len(timesteps), denoise
        counter = iter(range(1, total + 1))

        def denoise(x_, t_):
            out = inner(x_, t_)
            on_step(stage.config.name, next(counter), total)
            return out
    label = f"{stage.config.name} ({stage.config.kind})" if progress else False
    return ddim_sample(denoise, x, scheduler, timesteps, cfg.stage_eta(stage.config), gens, progress=label)


def run_base(cascade: Cascade, x0_bcfhw: torch.Tensor, prompts: list[str], seeds: list[int], cfg: EditConfig,
             progress: bool = False, timings: Timings | None = None, on_step: StepCallback | None = None):
    """Base stage from strength s (paper Sec. 4.1); rows are independent (per-row seeds)."""
    stage = cascade.base
    start = time.perf_counter()
    scheduler = fresh_scheduler(stage.scheduler)
    gens = seed_generators(seeds, 0)
    x0 = stage.encode(x0_bcfhw.to(cascade.device))  # a latent stage degrades its VAE latents (models/latent.py)
    x_s, timesteps = noise_at_strength(x0, cfg.strength, scheduler, cfg.stage_steps(0, stage.config), gens)
    text = _encode(cascade, prompts, cfg.guidance_scale)
    anchor = x0 if cfg.motion_from_input else None  # a motion edit re-animates the input (motion_guidance.py)
    out = _sample(cascade, 0, x_s, timesteps, scheduler, text, None, cfg, gens, timings, progress, on_step, anchor)
    out = stage.decode(out)
    if timings is not None:
        timings.stage_s[stage.config.name] += time.perf_counter() - start
    return out


def run_sr_stage(cascade: Cascade, index: int, prev_bcfhw: torch.Tensor, prompts: list[str], seeds: list[int],
                 cfg: EditConfig, chunk: int = 0, progress: bool = False, timings: Timings | None = None,
                 on_step: StepCallback | None = None) -> torch.Tensor:
    """One SR stage, conditioned on text and the upsampled previous output, from pure noise or (sr_strength
    < 1) from that output noised to the strength."""
    stage = cascade.stages[index]
    start = time.perf_counter()
    cond = upsample_condition(prev_bcfhw, stage.config)
    scheduler = fresh_scheduler(stage.scheduler)
    timesteps = strength_timesteps(scheduler, cfg.stage_steps(index, stage.config), 1.0)
    gens = seed_generators(seeds, index, chunk)
    start_strength = cfg.stage_sr_strength(cascade.config)
    if stage.vae is None and start_strength >= 1.0:
        x = draw_noise(tuple(cond.shape), gens, cond.dtype, cond.device)
    elif stage.vae is None:  # SDEdit from the upsampled output: the SR stage sharpens what the base drew
        x, timesteps = noise_at_strength(cond, start_strength, scheduler, cfg.stage_steps(index, stage.config), gens)
    else:  # a latent SSR (zeroscope_v2_XL) refines by SDEdit from the upscaled output, with no concat
        x, timesteps = noise_at_strength(stage.encode(cond), refine_strength(stage.config), scheduler,
                                         cfg.stage_steps(index, stage.config), gens)
        cond = None
    text = _encode(cascade, prompts, cfg.guidance_scale)
    out = _sample(cascade, index, x, timesteps, scheduler, text, cond, cfg, gens, timings, progress, on_step,
                  prev_bcfhw)
    out = stage.decode(out)
    if timings is not None:
        timings.stage_s[stage.config.name] += time.perf_counter() - start
    return out


def chunk_bounds(num_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """Frame ranges of the last SSR's input chunks (paper App. A.1: 32 frames each)."""
    return [(s, min(s + chunk_frames, num_frames)) for s in range(0, num_frames, chunk_frames)]


def run_cascade(cascade: Cascade, x0_bcfhw: torch.Tensor, prompts: list[str], seeds: list[int], cfg: EditConfig,
                progress: bool = False, timings: Timings | None = None,
                on_step: StepCallback | None = None) -> np.ndarray:
    """Base then every SR stage; the last SSR runs in chunks written straight into the uint8 output."""
    x = run_base(cascade, x0_bcfhw, prompts, seeds, cfg, progress, timings, on_step)
    return run_sr_stages(cascade, x, prompts, seeds, cfg, progress, timings, on_step)


def run_sr_stages(cascade: Cascade, x: torch.Tensor, prompts: list[str], seeds: list[int], cfg: EditConfig,
                  progress: bool = False, timings: Timings | None = None,
                  on_step: StepCallback | None = None) -> np.ndarray:
    """Every SR stage after the base, from the base's output `x`; returns uint8 frames (B, F, H, W, C)."""
    last_ssr = cascade.last_ssr_index()
    for index in range(1, len(cascade.stages)):
        if index != last_ssr:
            x = run_sr_stage(cascade, index, x, prompts, seeds, cfg, 0, progress, timings, on_step)
            continue
        b, f = x.shape[0], x.shape[2]
        out = None  # sized by the first chunk: a latent SSR resizes to its own size, not by a factor
        for chunk, (lo, hi) in enumerate(chunk_bounds(f, cfg.ssr_chunk_frames)):
            part = run_sr_stage(cascade, index, x[:, :, lo:hi], prompts, seeds, cfg, chunk, progress, timings,
                                on_step)
            frames = tensor_to_frames(part)
            if out is None:
                out = np.empty((b, f) + frames.shape[2:], dtype=np.uint8)
            out[:, lo:hi] = frames
        return out
    return tensor_to_frames(x)


def output_fps(cascade: Cascade) -> float:
    return cascade.stages[-1].config.fps


def edit(video: Video, prompt: str, cfg: EditConfig, cascade: Cascade, progress: bool = False,
         timings: Timings | None = None, on_step: StepCallback | None = None) -> Video:
    """Edit `video` toward `prompt`: the paper's degrade-then-invert (Sec. 4.1)."""
    x0 = downsample_to_stage(video, cascade.base.config, cfg.num_frames, cfg.fit)
    frames = run_cascade(cascade, x0, [prompt], [cfg.seed], cfg, progress, timings, on_step)[0]
    return Video(frames, output_fps(cascade))


def generate(prompt: str, cfg: EditConfig, cascade: Cascade, progress: bool = False,
             timings: Timings | None = None, on_step: StepCallback | None = None) -> Video:
    """Text-to-video: strength 1 with no input video (the paper's baseline)."""
    base = cascade.base.config
    frames = cfg.num_frames or base.frames
    x0 = torch.zeros(1, 3, frames, base.height, base.width)
    gen_cfg = EditConfig(**{**cfg.to_dict(), "strength": 1.0, "motion_from_input": False})
    out = run_cascade(cascade, x0, [prompt], [cfg.seed], gen_cfg, progress, timings, on_step)[0]
    return Video(out, output_fps(cascade))


def num_chunks(num_frames: int, chunk_frames: int) -> int:
    return math.ceil(num_frames / chunk_frames)
