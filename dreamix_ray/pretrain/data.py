"""The shapes-world training data: every step's batch is a pure function of (seed, step).

One in eight (colour, shape, motion, background) combinations is held out for evaluation; a
translating scene may come with its time-reversed twin in the same batch (PretrainConfig.reversed_twins).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..config import StageConfig
from ..degrade import downsample_for_training, frames_to_tensor, upsample_condition
from ..models.cascade import Stage
from ..models.text import TextEncoder
from ..objective import TrainBatch, draw_training_noise
from ..world.captions import caption
from ..world.render import render
from ..world.scene import DIRECTIONS, TRAVEL, Scene, sample_scene
from .config import PretrainConfig

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reversed_twin(scene: Scene) -> Scene:
    """The single translating object starts where it would end and travels back the other way."""
    obj = scene.objects[0]
    dx, dy = DIRECTIONS[obj.motion]
    return scene.replace_object(0, motion=OPPOSITE[obj.motion], start_x=round(obj.start_x + dx * TRAVEL, 4),
                                start_y=round(obj.start_y + dy * TRAVEL, 4))


def held_out(scene) -> bool:
    """Held-out (colour, shape, motion, background) combos: never trained on, used for evaluation."""
    o = scene.objects[0]
    key = f"{o.colour}|{o.shape}|{o.motion}|{scene.background}".encode()
    return hashlib.sha256(key).digest()[0] % 8 == 0


def training_scenes(rng: np.random.Generator, n: int, reversed_twins: float = 0.0):
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng, n_objects=1 if rng.random() < 0.85 else 2)
        if held_out(scene):
            continue
        scenes.append(scene)
        # reversed_twins=0 draws nothing extra, so the batches are the ones the shipped base trained on
        if (reversed_twins > 0 and len(scene.objects) == 1 and scene.objects[0].motion in OPPOSITE
                and rng.random() < reversed_twins):
            twin = reversed_twin(scene)
            if len(scenes) < n and not held_out(twin):
                scenes.append(twin)
    return scenes


def step_scenes(cfg: PretrainConfig, step: int) -> tuple[list[Scene], list[str], np.random.Generator]:
    """Step `step`'s scenes, their captions ("" where dropped) and the generator world_batch goes on
    drawing from (SSR crops, condition noise); a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    scenes = training_scenes(rng, cfg.batch_size, cfg.reversed_twins)
    captions = [caption(s, rng) for s in scenes]
    # A separate stream, so the scenes, crops and noise of a step do not depend on the dropout rate.
    drop = np.random.default_rng([cfg.seed, step, 1]).random(len(captions)) < cfg.caption_dropout
    return scenes, ["" if d else c for c, d in zip(captions, drop)], rng


def world_batch(stage: StageConfig, cfg: PretrainConfig, step: int):
    """(target [B,3,F,H,W], low-res condition or None, captions) for `step`; a pure function of (seed, step)."""
    scenes, captions, rng = step_scenes(cfg, step)
    if stage.kind == "ssr":
        hi = torch.cat([frames_to_tensor(render(s, stage.frames, stage.height, stage.fps)) for s in scenes])
        c, f = cfg.ssr_crop, cfg.ssr_crop_frames
        ys = rng.integers(0, (stage.height - c) // stage.factor + 1, len(scenes)) * stage.factor
        xs = rng.integers(0, (stage.width - c) // stage.factor + 1, len(scenes)) * stage.factor
        ts = rng.integers(0, stage.frames - f + 1, len(scenes))
        hi = torch.stack([hi[i, :, t:t + f, y:y + c, x:x + c] for i, (t, y, x) in enumerate(zip(ts, ys, xs))])
    else:
        hi = torch.cat([frames_to_tensor(render(s, stage.frames, stage.height, stage.fps)) for s in scenes])
    if stage.kind == "base":
        return hi, None, captions
    low = downsample_for_training(hi, stage)
    sigma = torch.from_numpy(rng.uniform(0, cfg.cond_noise, (len(scenes), 1, 1, 1, 1))).float()
    noise = torch.from_numpy(rng.standard_normal(low.shape)).float()
    return hi, upsample_condition(low + sigma * noise, stage), captions


def pretrain_batch(stage: Stage, cfg: PretrainConfig, step: int, text_encoder: TextEncoder) -> TrainBatch:
    """Step `step`'s whole batch with its draws (image step or not, timesteps, noise); a pure function of
    (seed, step), the same on every engine and rank."""
    x0, cond, captions = world_batch(stage.config, cfg, step)
    tokens, pooled = text_encoder(captions)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    image_step = torch.rand((), generator=gen).item() < cfg.image_fraction
    t_b, noise = draw_training_noise(stage, x0, gen)
    return TrainBatch(image_step, x0, cond, tokens, pooled, t_b, noise)
