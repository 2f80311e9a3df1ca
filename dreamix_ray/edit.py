"""Dreamix edit (paper Sec. 4.1): degrade -> base from s -> every SR stage, the last SSR in chunks.

`run_stage` is the one stage runner: `edit()` loops over it, and so do the Ray Data steps and the
Serve deployments, each on its own slice of the plan (a stage, or one chunk of the last SSR).
What passes from a stage to the next is whatever the next one takes: pixels, or the stage's latents when
the next stage takes latents (LTX's stages share one VAE; `StageConfig.latent_input`), so only the last
stage decodes. Callers treat it as an opaque array.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import EditConfig
from .degrade import downsample_to_stage, noise_at_strength, tensor_to_frames, upsample_condition
from .models.cascade import Cascade
from .motion_guidance import MotionPrior, motion_guided
from .request import EditPlan, EditRequest, resolve
from .sampling import (SAMPLERS, draw_noise, guided, guided_batched, sampling_scheduler, scheduler_family,
                       seed_generators, strength_timesteps)
from .sr_consistency import input_kept
from .video import Video

StepCallback = Callable[[str, int, int], None]  # (stage name, steps done, steps total)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # EditConfig.precision other than fp32


@dataclass
class Timings:
    """Wall seconds per stage, and seconds inside the stage networks' forward passes."""

    stage_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    network_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class StageRun:
    """What every stage of one edit shares (k-diffusion's extra_args + callback, as one object)."""

    cascade: Cascade
    plan: EditPlan
    prompts: list[str]
    seeds: list[int]  # one per row: noise comes from (seed, stage, chunk), never from the batch
    progress: bool = False
    timings: Timings | None = None
    on_step: StepCallback | None = None
    _text: tuple | None = field(default=None, repr=False)

    @classmethod
    def of(cls, cascade: Cascade, plan: EditPlan | EditConfig, prompts: list[str], seeds: list[int],
           **kwargs) -> "StageRun":
        """A run of a plan, or of an already resolved EditConfig."""
        if isinstance(plan, EditConfig):
            plan = EditPlan.of(plan, cascade.config)
        return cls(cascade, plan, list(prompts), [int(s) for s in seeds], **kwargs)

    def text(self):
        """(tokens, pooled, uncond or None), encoded once per run, not once per stage or chunk."""
        if self._text is None:
            tokens, pooled = self.cascade.text_encoder(self.prompts)
            negative = self.plan.config.negative_prompt
            uncond = (self.cascade.text_encoder([negative] * len(self.prompts))
                      if self.plan.config.guidance_scale != 1.0 else None)
            self._text = (tokens, pooled, uncond)
        return self._text


def _denoiser(run: StageRun, index: int, cond, anchor, total: int):
    """The stage's guided denoiser; `anchor` is the base's motion-edit input, or an SR stage's input."""
    stage, cfg = run.cascade.stages[index], run.plan.config
    net, name, timings = stage.denoiser, stage.config.name, run.timings
    tokens, pooled, uncond = run.text()

    device = next(net.parameters()).device
    # The one place precision applies (CLI, batch and Serve alike): autocast around the network only, so the
    # guidance, motion guidance and sampler arithmetic stay fp32.
    autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.precision])
                if cfg.precision != "fp32" else contextlib.nullcontext())

    def call(tokens_, pooled_, cond_=cond):
        def fn(x, t):
            start = time.perf_counter()
            with torch.inference_mode(), autocast:
                out = net(x, t, tokens_, pooled_, cond_).to(x.dtype)
            if timings is not None:
                timings.network_s[name] += time.perf_counter() - start
            return out
        return fn

    if uncond is not None and cfg.stage_cfg_mode(scheduler_family(stage.scheduler)) == "batched":
        pair = [torch.cat([a, b]) for a, b in zip((tokens, pooled), uncond)]
        denoise = guided_batched(call(*pair, None if cond is None else torch.cat([cond, cond])), cfg.guidance_scale)
    else:
        denoise = guided(call(tokens, pooled), call(*uncond) if uncond is not None else None, cfg.guidance_scale)
    if index == 0 and run.cascade.config.motion_prior and cfg.motion_guidance > 0:
        prior = MotionPrior.from_dict(run.cascade.config.motion_prior)
        denoise = motion_guided(denoise, stage.scheduler, prior, pooled, cfg.motion_guidance, anchor)
    if index > 0 and cfg.sr_consistency and anchor is not None:
        denoise = input_kept(denoise, stage.scheduler, stage.config, anchor)
    if run.on_step is not None:
        inner, counter = denoise, iter(range(1, total + 1))

        def denoise(x_, t_):
            out = inner(x_, t_)
            run.on_step(name, next(counter), total)
            return out
    return denoise


def run_stage(run: StageRun, index: int, x_bcfhw: torch.Tensor, chunk: int = 0, encoded: bool = False
              ) -> torch.Tensor:
    """Stage `index` of the plan on its input: the base on the downsampled input x0 (from the plan's
    strength; `encoded`: x0 is already in the base's latents, from the batch's degrade step), an SR stage on the previous output or one chunk of it, `plan.chunk_input(chunk)` (from pure
    noise, or by SDEdit from the upsampled output at its start strength). Returns pixels, or this stage's
    latents when the next stage takes latents."""
    stage, plan = run.cascade.stages[index], run.plan.stages[index]
    start = time.perf_counter()
    scheduler = sampling_scheduler(stage.scheduler, stage.config.sampler, plan.eta)
    # The base's salt is (0,) and an SR stage's (stage, chunk): what every earlier release drew.
    gens = seed_generators(run.seeds, 0) if index == 0 else seed_generators(run.seeds, index, chunk)
    x_bcfhw = x_bcfhw.to(run.cascade.device)
    if index == 0:
        x0 = x_bcfhw if encoded else stage.encode(x_bcfhw)  # a latent base degrades its VAE latents (latent.py)
        x, timesteps = noise_at_strength(x0, plan.start_strength, scheduler, plan.steps, gens)
        cond, anchor = None, x0 if run.plan.config.motion_from_input else None  # motion_guidance.py
    elif stage.config.latent_input:  # LTX: the latent upsampler, then the refine pass by SDEdit (1 = from noise)
        x, timesteps = noise_at_strength(stage.upsampler(x_bcfhw), plan.start_strength, scheduler, plan.steps, gens)
        cond = anchor = None
    else:
        cond, anchor = upsample_condition(x_bcfhw, stage.config), x_bcfhw
        if plan.from_noise:
            timesteps = strength_timesteps(scheduler, plan.steps, 1.0)
            x = draw_noise(tuple(cond.shape), gens, cond.dtype, cond.device)
        elif stage.vae is None:  # SDEdit from the upsampled output: the SR stage sharpens what the base drew
            x, timesteps = noise_at_strength(cond, plan.start_strength, scheduler, plan.steps, gens)
        else:  # a latent SSR (zeroscope_v2_XL) refines by SDEdit from the upscaled output, with no concat
            x, timesteps = noise_at_strength(stage.encode(cond), plan.start_strength, scheduler, plan.steps, gens)
            cond = None
    denoise = _denoiser(run, index, cond, anchor, len(timesteps))
    label = f"{stage.config.name} ({stage.config.kind})" if run.progress else False
    sample = SAMPLERS[scheduler_family(scheduler)]  # stochastic DDIM, DPM-Solver++ or flow (sampling.py)
    out = sample(denoise, x, scheduler, timesteps, plan.eta, gens, progress=label)
    following = run.cascade.stages[index + 1] if index + 1 < len(run.cascade.stages) else None
    if following is None or not following.config.latent_input:
        out = stage.decode(out, plan.chunk_halo(chunk))
    if run.timings is not None:
        run.timings.stage_s[stage.config.name] += time.perf_counter() - start
    return out


def run_cascade(run: StageRun, x_bcfhw: torch.Tensor, first: int = 0, encoded: bool = False) -> np.ndarray:
    """Stages `first`.. of the plan from their input; the last stage runs chunk by chunk straight into the
    uint8 output (B, F, H, W, C), so memory holds one chunk of it at a time (paper App. A.1). A chunk samples
    its halo of context frames too and keeps only its own frames (StagePlan.chunk_input / chunk_halo)."""
    for plan in run.plan.stages[first:-1]:
        x_bcfhw = run_stage(run, plan.index, x_bcfhw, encoded=encoded and plan.index == 0)
    last = run.plan.stages[-1]
    encoded = encoded and last.index == 0  # a one-stage cascade's base takes the degraded latents whole
    if not encoded and x_bcfhw.shape[2] != last.frames:
        raise ValueError(f"stage {last.name!r} planned for {last.frames} input frames, got {x_bcfhw.shape[2]}")
    out, done = None, 0  # sized by the first chunk: a latent SSR resizes to its own size, not by a factor
    for chunk in range(len(last.chunks)):
        lo, hi = last.chunk_input(chunk)
        part = x_bcfhw if encoded else x_bcfhw[:, :, lo:hi]  # the base is one chunk
        frames = tensor_to_frames(run_stage(run, last.index, part, chunk, encoded=encoded))
        if out is None:
            total = run.cascade.stages[last.index].output_frames(last.frames)
            out = np.empty((frames.shape[0], total) + frames.shape[2:], dtype=np.uint8)
        out[:, done:done + frames.shape[1]] = frames
        done += frames.shape[1]
    if done != out.shape[1]:
        raise ValueError(f"stage {last.name!r}: its chunks made {done} frames, planned {out.shape[1]}")
    return out


def chunk_seams(frames_bfhwc: np.ndarray, run: StageRun) -> tuple[float, float]:
    """(mean |frame i+1 - frame i| across the last stage's chunk boundaries, the same inside chunks) of
    run_cascade's output: a seam shows as the first number well above the second."""
    last = run.plan.stages[-1]
    stage = run.cascade.stages[last.index]
    starts = {stage.output_frames(lo) for lo, _ in last.chunks[1:]}  # the first output frame of each later chunk
    steps = np.abs(np.diff(frames_bfhwc.astype(np.float32), axis=1)).mean(axis=(0, 2, 3, 4))  # step i: i -> i+1
    across = [steps[i - 1] for i in sorted(starts)]
    inside = [d for i, d in enumerate(steps) if i + 1 not in starts]
    return float(np.mean(across)) if across else float("nan"), float(np.mean(inside))


def output_fps(cascade: Cascade) -> float:
    return cascade.stages[-1].config.fps


def _plan(plan: EditPlan | EditConfig | EditRequest, cascade: Cascade) -> EditPlan:
    if isinstance(plan, EditRequest):
        return resolve(plan, cascade.config)
    return EditPlan.of(plan, cascade.config) if isinstance(plan, EditConfig) else plan


def edit(video: Video, prompt: str, plan: EditPlan | EditConfig | EditRequest, cascade: Cascade,
         progress: bool = False, timings: Timings | None = None, on_step: StepCallback | None = None) -> Video:
    """Edit `video` toward `prompt`: the paper's degrade-then-invert (Sec. 4.1)."""
    plan = _plan(plan, cascade)
    x0 = downsample_to_stage(video, cascade.base.config, plan.config.num_frames, plan.config.fit)
    run = StageRun.of(cascade, plan, [prompt], [plan.config.seed], progress=progress, timings=timings,
                      on_step=on_step)
    return Video(run_cascade(run, x0)[0], output_fps(cascade))


def blank_input(plan: EditPlan, cascade: Cascade, rows: int = 1) -> torch.Tensor:
    """Text-to-video's input: nothing survives strength 1, so zeros of the base's shape."""
    base = cascade.base.config
    return torch.zeros(rows, 3, plan.stages[0].frames, base.height, base.width)


def generate(prompt: str, plan: EditPlan | EditConfig | EditRequest, cascade: Cascade, progress: bool = False,
             timings: Timings | None = None, on_step: StepCallback | None = None) -> Video:
    """Text-to-video: strength 1 with no input video (the paper's baseline)."""
    plan = _plan(plan, cascade)
    if plan.config.strength != 1.0 or plan.config.motion_from_input:
        plan = plan.replace(cascade.config, strength=1.0, motion_from_input=False)
    run = StageRun.of(cascade, plan, [prompt], [plan.config.seed], progress=progress, timings=timings,
                      on_step=on_step)
    return Video(run_cascade(run, blank_input(plan, cascade))[0], output_fps(cascade))
