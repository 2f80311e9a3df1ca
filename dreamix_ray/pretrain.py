"""Pretrain the embedded cascade's stages on the procedural shapes world (videos and images)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import StageConfig, _Dict
from .degrade import downsample_for_training, frames_to_tensor, upsample_condition
from .models.cascade import Cascade, Stage, build_cascade
from .models.embedded import EMBEDDED_DENOISERS, embedded_config
from .models.text import TextEncoder
from .objective import TrainBatch, draw_training_noise
from .sampling import make_scheduler
from .world.captions import caption
from .world.render import render
from .world.scene import DIRECTIONS, TRAVEL, Scene, sample_scene


@dataclass(frozen=True)
class PretrainConfig(_Dict):
    """One stage's pretraining run (Imagen Video style: videos plus frames-as-images)."""

    stage: str = "base"
    minutes: float = 60.0
    max_steps: int = 1_000_000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 200  # linear warmup, then cosine decay to lr * final_lr_fraction at max_steps
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.995
    # Steps trained in frame mode on frames as independent images. They teach appearance, never motion:
    # a small share is enough (the base learns colour and shape long before the translations).
    image_fraction: float = 0.05
    # Chance that a translating single-object scene comes with its time-reversed twin (same object and
    # background, opposite direction) in the same batch. Session 3's base moved objects along the right
    # axis but in the wrong direction half the time (BENCHMARKS.md); the twin's caption differs from its
    # pair's only in the direction word, so the gradient of the pair is about direction alone.
    reversed_twins: float = 0.5
    ssr_crop: int = 32  # SSR trains on random crops of its output size (it is fully convolutional)
    ssr_crop_frames: int = 8
    cond_noise: float = 0.1  # max Gaussian noise on an SR stage's low-res input (robust to base errors)
    caption_dropout: float = 0.1  # captions replaced by "" so the model also learns p(x): enables guidance
    seed: int = 0
    # A trained stage (diffusers folder) to start from instead of random weights. A conv that gained
    # input channels keeps the trained slice; the new slice keeps its random init. (Zero would keep the
    # trained model's output exactly, but motion planes then never learn: their gain and their conv
    # weights both start near zero and each one's gradient is proportional to the other. Measured:
    # after 700 steps the left / right gains differed by 0.02.)
    init_from: str = ""
    # Weight of an auxiliary loss that teaches a base's motion planes the caption's direction from the
    # world's labels (motion_targets); 0 = the plain diffusion loss. Single-process training only.
    motion_supervision: float = 0.0
    motion_planes: int = 0  # text-driven motion planes for the base (StageDenoiser); 0 = the shipped design
    coord_planes: bool = False  # x / y coordinate planes for the base (StageDenoiser); off = the shipped design
    checkpoint_every_s: float = 180.0
    grad_clip: float = 1.0


def stage_denoisers(cfg: PretrainConfig) -> dict:
    """The embedded architecture, with the base's motion / coordinate planes if this run asks for them."""
    if not (cfg.motion_planes or cfg.coord_planes):
        return EMBEDDED_DENOISERS
    if cfg.stage != "base":
        raise ValueError(f"motion and coordinate planes are base-stage options; {cfg.stage!r} has none")
    base = {**EMBEDDED_DENOISERS["base"], "motion_planes": cfg.motion_planes, "coord_planes": cfg.coord_planes}
    return {**EMBEDDED_DENOISERS, "base": base}


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


def motion_targets(scenes: list[Scene], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's direction as (dx, dy) * 0.8 [B, 2] (non-translations (0, 0)) and which rows count
    [B]: single-object scenes whose caption was kept."""
    target = torch.tensor([DIRECTIONS.get(s.objects[0].motion, (0.0, 0.0)) for s in scenes])
    counts = torch.tensor([len(s.objects) == 1 and c != "" for s, c in zip(scenes, captions)])
    return 0.8 * target, counts


def motion_supervision_loss(stage: Stage, pooled_bd: torch.Tensor, cfg: PretrainConfig, step: int) -> torch.Tensor:
    target, counts = motion_targets(*step_scenes(cfg, step)[:2])
    gain = stage.denoiser.motion_gain(pooled_bd)[:, :2]
    return ((gain - target) ** 2).sum(1)[counts].mean() if counts.any() else gain.sum() * 0


@torch.no_grad()
def fit_motion_projection(denoiser, text_encoder: TextEncoder, cfg: PretrainConfig, steps: int = 200) -> float:
    """Set the motion planes' text projection by ridge regression onto the directions of `steps` batches
    of training captions (what motion_supervision_loss would converge to, at once: by gradient descent
    at the UNet's learning rate, the gains had separated by only about 0.1 after 250 steps). Returns
    the fitted gains' mean squared error against the targets."""
    pooled, targets = [], []
    for step in range(steps):
        scenes, captions, _ = step_scenes(cfg, step)
        target, counts = motion_targets(scenes, captions)
        pooled.append(text_encoder([c for c, k in zip(captions, counts) if k])[1])
        targets.append(target[counts])
    x, y = torch.cat(pooled).double(), torch.cat(targets).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    logits = torch.atanh(y.clamp(-0.8, 0.8))  # tanh(W p + b) = target
    gram = x1.T @ x1
    # ridge at 1% of the mean feature energy: best on held-out captions from 60 batches to 200
    ridge = 0.01 * gram.diagonal().mean() * torch.eye(x1.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(gram + ridge, x1.T @ logits)  # [D+1, 2]
    proj = denoiser.motion_from_text
    proj.weight.zero_()
    proj.bias.zero_()
    proj.weight[:2] = solution[:-1].T.float()
    proj.bias[:2] = solution[-1].float()
    return float(((torch.tanh(x1 @ solution) - y) ** 2).sum(1).mean())


@torch.no_grad()
def fit_world_motion_prior(text_encoder: TextEncoder, cfg: PretrainConfig, steps: int = 200):
    """The motion prior for motion guidance (motion_guidance.py), fitted on the single-object captions of
    `steps` training batches: each caption's class is its translation, or "none" for any other motion."""
    from .motion_guidance import fit_motion_prior

    classes = ["none", *DIRECTIONS]
    pooled, labels = [], []
    for step in range(steps):
        scenes, captions, _ = step_scenes(cfg, step)
        keep = [(s, c) for s, c in zip(scenes, captions) if len(s.objects) == 1 and c]
        if keep:
            pooled.append(text_encoder([c for _, c in keep])[1])
            labels += [classes.index(s.objects[0].motion) if s.objects[0].motion in DIRECTIONS else 0 for s, _ in keep]
    vectors = [(0.0, 0.0)] + [DIRECTIONS[m] for m in classes[1:]]
    return fit_motion_prior(torch.cat(pooled), torch.tensor(labels), vectors, travel=TRAVEL)


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reversed_twin(scene: Scene) -> Scene:
    """The single translating object starts where it would end and travels back the other way."""
    obj = scene.objects[0]
    dx, dy = DIRECTIONS[obj.motion]
    return scene.replace_object(0, motion=OPPOSITE[obj.motion], start_x=round(obj.start_x + dx * TRAVEL, 4),
                                start_y=round(obj.start_y + dy * TRAVEL, 4))


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to cfg.lr * final_lr_fraction at max_steps (a function of step,
    so a resumed run continues the same schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    (seed, step), shared by train_stage and the Ray Train loop."""
    x0, cond, captions = world_batch(stage.config, cfg, step)
    tokens, pooled = text_encoder(captions)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    image_step = torch.rand((), generator=gen).item() < cfg.image_fraction
    t_b, noise = draw_training_noise(stage, x0, gen)
    return TrainBatch(image_step, x0, cond, tokens, pooled, t_b, noise)


class EMA:
    """Exponential moving average of weights; the exported model is the average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.shadow = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach().to(s.device, s.dtype), 1 - d)  # DeepSpeed: bf16 or GPU weights, fp32 average


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_stage(cfg: PretrainConfig, run_dir: str | Path, text_encoder: TextEncoder | None = None,
                log=print) -> Path:
    """Train one stage until `minutes` or `max_steps`, checkpointing; a rerun resumes."""
    text_encoder = text_encoder or TextEncoder("minilm")
    cascade = build_cascade(embedded_config(text_encoder.spec()), stage_denoisers(cfg), text_encoder, cfg.seed)
    stage = next(s for s in cascade.stages if s.config.name == cfg.stage)
    model = stage.denoiser.train()
    out = Path(run_dir) / cfg.stage
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, step = out / "checkpoint.pt", 0
    if cfg.init_from and not ckpt_path.exists():
        log(f"[{cfg.stage}] warm start from {cfg.init_from}: " + warm_start(model, cfg.init_from))
    if cfg.motion_supervision:
        if getattr(model, "motion_from_text", None) is None:
            raise ValueError(f"motion_supervision needs a stage with motion planes; {cfg.stage!r} has none")
        if not ckpt_path.exists():
            mse = fit_motion_projection(model, text_encoder, cfg)
            log(f"[{cfg.stage}] motion planes fitted to the captions' directions (mse {mse:.3f})")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMA(model, cfg.ema_decay)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.shadow.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        log(f"[{cfg.stage}] resumed at step {step}")
    deadline = time.time() + cfg.minutes * 60
    last_ckpt, losses = time.time(), []
    with (out / "log.jsonl").open("a") as log_file:
        while step < cfg.max_steps and time.time() < deadline:
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            batch = pretrain_batch(stage, cfg, step, text_encoder)
            loss = batch.loss(stage)
            if cfg.motion_supervision:
                loss = loss + cfg.motion_supervision * motion_supervision_loss(stage, batch.pooled, cfg, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model, step)
            step += 1
            losses.append(loss.item())
            if step % 25 == 0:
                _follow_thread_file(out.parent / "threads")
                rec = {"step": step, "loss": float(np.mean(losses)), "time": time.time()}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                log(f"[{cfg.stage}] step {step} loss {rec['loss']:.4f}")
                losses = []
            if time.time() - last_ckpt > cfg.checkpoint_every_s:
                _checkpoint(ckpt_path, model, ema, opt, step)
                last_ckpt = time.time()
    _checkpoint(ckpt_path, model, ema, opt, step)
    return ckpt_path


def warm_start(model: torch.nn.Module, weights_dir: str | Path) -> str:
    """Load a trained stage's weights into `model` (see PretrainConfig.init_from); returns a summary."""
    from safetensors.torch import load_file

    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {weights_dir} to warm-start from")
    trained, own = load_file(str(files[0])), model.state_dict()
    grown, unknown = [], [k for k in trained if k not in own]
    with torch.no_grad():
        for name, value in trained.items():
            if name not in own:
                continue
            target = own[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif _more_input_channels(target.shape, value.shape):
                target[:, :value.shape[1]].copy_(value)  # the new input channels keep their init
                grown.append(name)
            else:
                raise ValueError(f"{weights_dir}: {name} has shape {tuple(value.shape)}, this model "
                                 f"{tuple(target.shape)}: not the same architecture")
    if unknown:
        raise ValueError(f"{weights_dir} has weights this model lacks ({unknown[:3]}...): another architecture")
    new = [k for k in own if k not in trained]
    return f"{len(trained) - len(grown)} tensors copied, grown {grown or 'none'}, new {new or 'none'}"


def _more_input_channels(new: torch.Size, old: torch.Size) -> bool:
    """A conv weight [out, in, ...] that only gained input channels."""
    return (len(new) == len(old) >= 2 and new[1] > old[1]
            and new[0] == old[0] and tuple(new[2:]) == tuple(old[2:]))


def _follow_thread_file(path: Path) -> None:
    """Let a long run take more cores when a neighbouring run finishes (write a number to `path`)."""
    try:
        threads = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    if threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def _checkpoint(path: Path, model, ema: EMA, opt, step: int) -> None:
    _save_atomic({"model": model.state_dict(), "ema": ema.shadow.state_dict(), "opt": opt.state_dict(),
                  "step": step}, path)
    ema.shadow.save_pretrained(path.parent / "ema")  # diffusers format: export reads only this


def export_cascade(run_dir: str | Path, out_dir: str | Path, text_encoder: TextEncoder | None = None) -> Cascade:
    """Assemble the EMA weights of every trained stage into a cascade directory."""
    text_encoder = text_encoder or TextEncoder("minilm")
    cascade = build_cascade(embedded_config(text_encoder.spec()), EMBEDDED_DENOISERS, text_encoder)
    for stage in cascade.stages:
        ema_dir = Path(run_dir) / stage.config.name / "ema"
        if not ema_dir.is_dir():
            raise FileNotFoundError(f"stage {stage.config.name!r} has no trained weights in {ema_dir}")
        stage.denoiser = type(stage.denoiser).from_pretrained(ema_dir).eval()
        stage.scheduler = make_scheduler()
    prior = fit_world_motion_prior(text_encoder, PretrainConfig(stage="base"))
    cascade.config = dataclasses.replace(cascade.config, motion_prior=prior.to_dict())
    cascade.save_pretrained(out_dir)
    return cascade


def _pretrain_on_ray(cfg: PretrainConfig, args) -> None:
    """One stage on Ray Train + DeepSpeed; a rerun with the same --run-dir resumes from its checkpoint."""
    from .cluster.train import TrainSettings, ensure_ray, pretrain_on_ray, read_state

    settings = TrainSettings(workers=args.workers, zero=args.zero, use_gpu=args.gpu, threads=args.threads)
    ensure_ray(args.address)
    result = pretrain_on_ray(cfg, args.run_dir, settings)
    losses = read_state(result.checkpoint)["losses"][cfg.stage]
    print(f"[{cfg.stage}] {len(losses)} steps on {args.workers} Ray Train workers, last loss {losses[-1]:.4f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dreamix pretrain", description=__doc__)
    p.add_argument("--stages", nargs="+", default=["base", "tsr", "ssr"], choices=["base", "tsr", "ssr"])
    p.add_argument("--minutes", type=float, nargs="+", default=[60.0],
                   help="wall-clock budget per stage (one value, or one per stage)")
    p.add_argument("--run-dir", default="runs/pretrain", help="checkpoints and logs; rerun to resume")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=1_000_000,
                   help="step budget; the learning rate decays (cosine) to a tenth of --lr at this step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by '' (teaches the unconditional model for guidance)")
    p.add_argument("--image-fraction", type=float, default=PretrainConfig.image_fraction,
                   help="share of steps trained in frame mode on frames as images")
    p.add_argument("--reversed-twins", type=float, default=PretrainConfig.reversed_twins,
                   help="chance a translating scene comes with its time-reversed twin in the batch (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--motion-planes", type=int, default=0,
                   help="give the base this many text-driven motion planes (an experiment: BENCHMARKS.md)")
    p.add_argument("--motion-supervision", type=float, default=0.0,
                   help="weight of the auxiliary direction loss on a base's motion planes (single process)")
    p.add_argument("--coord-planes", action="store_true",
                   help="give the base x / y coordinate planes (an experiment: BENCHMARKS.md)")
    p.add_argument("--init-from", default="",
                   help="start from this trained stage folder (e.g. dreamix_ray/default_cascade/base)")
    p.add_argument("--workers", type=int, default=None,
                   help="train on Ray Train with this many DeepSpeed workers (same batches, same result)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage with --workers")
    p.add_argument("--address", default=None, help="Ray cluster address with --workers (default: a local Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker with --workers")
    p.add_argument("--export", default=None, help="write the trained cascade to this directory when done")
    args = p.parse_args(argv)
    if args.init_from and len(args.stages) > 1:
        p.error("--init-from names one stage's weights: give it with a single --stages value")
    if args.motion_supervision and args.workers:
        p.error("--motion-supervision runs in one process only: drop --workers")
    if (args.motion_supervision or args.motion_planes or args.coord_planes) and args.stages != ["base"]:
        p.error("--motion-planes / --motion-supervision / --coord-planes are base-stage options: use --stages base")
    if args.motion_supervision and not args.motion_planes:
        p.error("--motion-supervision trains the base's motion planes: add --motion-planes 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = args.minutes if len(args.minutes) == len(args.stages) else [args.minutes[0]] * len(args.stages)
    for stage, budget in zip(args.stages, minutes):
        cfg = PretrainConfig(stage=stage, minutes=budget, batch_size=args.batch_size, lr=args.lr,
                             max_steps=args.max_steps, seed=args.seed, caption_dropout=args.caption_dropout,
                             image_fraction=args.image_fraction, reversed_twins=args.reversed_twins,
                             init_from=args.init_from, motion_supervision=args.motion_supervision,
                             motion_planes=args.motion_planes, coord_planes=args.coord_planes)
        if args.workers:
            _pretrain_on_ray(cfg, args)
        else:
            train_stage(cfg, args.run_dir, log=lambda m: print(m, flush=True))
    if args.export:
        export_cascade(args.run_dir, args.export)
        print(f"exported cascade to {args.export}")
    return 0
