"""The two kinds of training job the Ray Train loop runs, as stage tasks built from the shared core code:
finetuning (finetune_batch: the mixed objective) and shapes-world pretraining (pretrain_batch)."""

from __future__ import annotations

import functools

from ..finetune import FinetuneConfig, finetune_batch
from ..pretrain import PretrainConfig, learning_rate, pretrain_batch, stage_denoisers, warm_start
from .train_loop import StageTask


def _payload(job: dict):
    import ray

    ref = job["payload"]
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def build_tasks(job: dict) -> list[StageTask]:
    """The job's stages in training order; every rank builds identical tasks."""
    if job["kind"] == "finetune":
        return _finetune_tasks(job)
    if job["kind"] == "pretrain":
        return _pretrain_tasks(job)
    raise ValueError(f"unknown training job kind {job['kind']!r}")


def _finetune_tasks(job: dict) -> list[StageTask]:
    """One task per finetuned stage, all in one run (paper: base and SSR stages, each on its own data)."""
    cfg = FinetuneConfig.from_dict(job["cfg"])
    payload = _payload(job)
    text = payload["text"]
    tasks = []
    for cascade_index, stage, data in payload["stages"]:
        def batch(step, stage=stage, data=data, cascade_index=cascade_index):
            return finetune_batch(stage, data, text, cfg, cascade_index, step)

        tasks.append(StageTask(stage.config.name, stage, cfg.steps, job["lr"], cfg.grad_clip, batch,
                               cfg.checkpoint_every))
    return tasks


def _pretrain_tasks(job: dict) -> list[StageTask]:
    """One task per pretrained stage, built exactly as pretrain.train_stage builds it."""
    from ..models.cascade import build_cascade
    from ..models.embedded import embedded_config
    from ..models.text import TextEncoder

    text_encoder = TextEncoder("minilm")
    tasks = []
    for cfg_dict in job["cfgs"]:
        cfg = PretrainConfig.from_dict(cfg_dict)
        if cfg.motion_supervision:  # the auxiliary loss lives in train_stage's loop only
            raise ValueError("motion_supervision runs in one process only (pretrain.train_stage), not on Ray Train")
        cascade = build_cascade(embedded_config(text_encoder.spec()), stage_denoisers(cfg), text_encoder, cfg.seed)
        stage = next(s for s in cascade.stages if s.config.name == cfg.stage)
        if cfg.init_from:  # a resumed run then loads its checkpoint over these weights
            warm_start(stage.denoiser, cfg.init_from)

        def batch(step, stage=stage, cfg=cfg):
            return pretrain_batch(stage, cfg, step, text_encoder)

        tasks.append(StageTask(cfg.stage, stage, cfg.max_steps, cfg.lr, cfg.grad_clip, batch,
                               job["checkpoint_every"], ema_decay=cfg.ema_decay, minutes=cfg.minutes,
                               lr_at=functools.partial(learning_rate, cfg)))
    return tasks
