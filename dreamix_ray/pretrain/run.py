"""Pretrain one embedded-cascade stage with the training loop, and assemble the trained cascade."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..models.cascade import Cascade, build_cascade
from ..models.embedded import EMBEDDED_DENOISERS, embedded_config
from ..models.text import TextEncoder
from ..sampling import make_scheduler
from ..training.checkpoint import LocalCheckpoints
from ..training.loop import TrainSpec, train
from ..training.warm_start import warm_start
from .config import PretrainConfig, learning_rate
from .data import pretrain_batch
from .motion import fit_world_motion_prior


def pretrain_spec(cfg: PretrainConfig, text_encoder: TextEncoder, log=None) -> TrainSpec:
    """Stage cfg.stage of the embedded cascade as a spec of the loop, built alike on every engine and rank."""
    log = log or (lambda _: None)
    cascade = build_cascade(embedded_config(text_encoder.spec()), EMBEDDED_DENOISERS, text_encoder, cfg.seed)
    stage = next(s for s in cascade.stages if s.config.name == cfg.stage)

    def init(module: torch.nn.Module) -> None:
        if cfg.init_from:
            log(f"[{cfg.stage}] warm start from {cfg.init_from}: " + warm_start(module, cfg.init_from))

    return TrainSpec(cfg.stage, stage, cfg.max_steps, cfg.lr, cfg.grad_clip,
                     lambda step: pretrain_batch(stage, cfg, step, text_encoder), seed=cfg.seed,
                     checkpoint_every=cfg.checkpoint_every, checkpoint_every_s=cfg.checkpoint_every_s,
                     minutes=cfg.minutes, ema_decay=cfg.ema_decay,
                     lr_at=lambda step: learning_rate(cfg, step), init=init)


def train_stage(cfg: PretrainConfig, run_dir: str | Path, text_encoder: TextEncoder | None = None,
                log=print) -> Path:
    """Train one stage in this process until `minutes` or `max_steps`, checkpointing under
    run_dir/<stage>/checkpoints; a rerun resumes. Returns the stage's EMA folder (run_dir/<stage>/ema)."""
    text_encoder = text_encoder or TextEncoder("minilm")
    out = Path(run_dir) / cfg.stage
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = LocalCheckpoints(out / "checkpoints")
    train([pretrain_spec(cfg, text_encoder, log)], checkpoints, on_step=_StepLog(out, log), log=log)
    with checkpoints.latest() as last:
        return publish_ema(last, run_dir, cfg.stage)


def publish_ema(checkpoint: Path, run_dir: str | Path, stage: str) -> Path:
    """Copy a run's exported EMA to run_dir/<stage>/ema, where export_cascade reads it."""
    ema = Path(run_dir, stage, "ema")
    shutil.rmtree(ema, ignore_errors=True)
    shutil.copytree(Path(checkpoint, "exports", stage), ema)
    return ema


class _StepLog:
    """Every 25 steps: the mean loss to log.jsonl and the log, and the thread count from run_dir/threads."""

    def __init__(self, out: Path, log):
        self.out, self.log, self.losses = out, log, []

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        if step % 25:
            return
        _follow_thread_file(self.out.parent / "threads")
        rec = {"step": step, "loss": float(np.mean(self.losses)), "time": time.time()}
        with (self.out / "log.jsonl").open("a") as log_file:
            log_file.write(json.dumps(rec) + "\n")
        self.log(f"[{name}] step {step} loss {rec['loss']:.4f}")
        self.losses = []


def _follow_thread_file(path: Path) -> None:
    """Let a long run take more cores when a neighbouring run finishes (write a number to `path`)."""
    try:
        threads = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    if threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


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
