"""The Ray Train worker task: the core training loop (training/loop.py) with this worker's rank,
device and engine (DeepSpeed ZeRO or DDP), checkpointing into Ray Train's storage.

Every rank writes its part of a checkpoint (training/checkpoint.py's format) into a local folder and
reports it under one name; Ray Train merges the folders in storage and restores the newest on a rerun.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import ray.train.torch
import torch

from ..finetune import FinetuneConfig, finetune_specs
from ..models.text import TextEncoder
from ..pretrain import PretrainConfig, pretrain_spec
from ..training.engines import EngineConfig
from ..training.loop import TrainSpec, train


class RayCheckpoints:
    """Checkpoints in Ray Train's storage (local path or s3://), named as the loop names them."""

    def __init__(self, ctx):
        self.ctx = ctx

    def describe(self) -> str:
        return f"run {self.ctx.get_experiment_name()!r}"

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as folder:
                yield Path(folder)

    @contextlib.contextmanager
    def writer(self, name: str, metrics: dict) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix=f"dreamix-ckpt-r{self.ctx.get_world_rank()}-") as tmp:
            yield Path(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def job_specs(job: dict) -> list[TrainSpec]:
    """The job's specs in training order; every rank builds identical ones."""
    if job["kind"] == "finetune":
        ref = job["payload"]  # the driver's stage weights, data and prompt embedding, via the object store
        payload = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        return finetune_specs(payload["stages"], payload["text"], FinetuneConfig.from_dict(job["cfg"]), job["lr"],
                              checkpoint_every=job.get("checkpoint_every"))
    if job["kind"] == "pretrain":
        text_encoder = TextEncoder("minilm")
        return [pretrain_spec(PretrainConfig.from_dict(cfg), text_encoder) for cfg in job["cfgs"]]
    raise ValueError(f"unknown training job kind {job['kind']!r}")


def train_worker_task(job: dict) -> None:
    """Ray Train entry: this worker's part of the job's specs, resumed from the run's newest checkpoint."""
    ctx = ray.train.get_context()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device("cpu")
    if job.get("use_gpu"):
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    fail_after = job.get("fail_after_step")

    def on_step(name: str, step: int, total: int, loss: float) -> None:
        if step == fail_after:
            _crash()

    train(job_specs(job), RayCheckpoints(ctx), EngineConfig(**job["engine"]), on_step=on_step, device=device)


def _crash() -> None:
    """Test hook (job["fail_after_step"]): every worker process dies hard, as on losing the nodes, once
    Ray Train has registered the checkpoints reported so far."""
    ray.train.get_all_reported_checkpoints()
    os._exit(1)
