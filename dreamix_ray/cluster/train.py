"""Distributed finetuning and pretraining: a Ray Train TorchTrainer whose worker task runs the core
training loop with the DeepSpeed ZeRO-2 / ZeRO-3 or the DDP engine (gloo on CPU, NCCL on GPU, bf16
where the GPU has it). The worker task is in train_worker.py.

Finetuning trains all finetuned stages in ONE run, one after another (each its own engine), so one
name and one checkpoint history cover the artifact; the driver writes the last checkpoint's fp32
weights with `save_artifact` under the single-process key. Pretraining runs one stage per run, since
each stage has its own time budget. A rerun with the same run name and storage resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import _Dict
from ..errors import UserError
from ..finetune import (
    ARTIFACT_FILE, FinetuneConfig, _StageData, artifact_key, finetune_lr,
    finetuned_stage_names, save_artifact, video_bytes,
)
from ..host_memory import worker_env
from ..models.cascade import Cascade, Stage, load_cascade
from ..pretrain import PretrainConfig, publish_ema
from ..storage import ArtifactStore, filesystem, is_s3, join
from ..training.checkpoint import STATE_FILE
from ..training.engines import EngineConfig
from .train_worker import train_worker_task


class TrainSetupError(UserError):
    """A distributed-training setting is unusable; the message says which and what to do."""


@dataclass(frozen=True)
class TrainSettings(_Dict):
    """How a job runs on the cluster; none of it changes the result, so none of it is in the artifact key."""

    workers: int = 2
    engine: str = "deepspeed"  # deepspeed (ZeRO, --zero) | ddp (every rank holds the whole optimizer)
    zero: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp32
    micro_batch: int | None = None  # clips per rank per micro-step (gradient accumulation); None: all at once
    threads: int | None = None  # torch threads per worker
    deepspeed_config: str | None = None  # a DeepSpeed JSON (e.g. infra/deepspeed_zero3.json) over the defaults
    max_failures: int = 0  # worker-group restarts from the last checkpoint within one run
    spread: bool = False  # workers on different nodes where possible (Ray's SPREAD), else packed (PACK)
    keep_checkpoints: int = 2
    # steps between checkpoints; None = the finetune config's (25). How often a run can resume from, not what
    # it trains: a run resumed from any checkpoint gives the same artifact, so it stays out of the key.
    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.workers < 1:
            raise TrainSetupError(f"--workers must be >= 1, got {self.workers}")
        if self.engine not in ("deepspeed", "ddp"):
            raise TrainSetupError(f"the distributed engine must be deepspeed or ddp, got {self.engine!r}")
        if self.zero not in (2, 3):
            raise TrainSetupError(f"--zero must be 2 or 3, got {self.zero}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainSetupError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.max_failures < 0:
            raise TrainSetupError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise TrainSetupError(f"--checkpoint-every must be >= 1 step, got {self.checkpoint_every}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise TrainSetupError(f"the micro-batch must be >= 1 clip, got {self.micro_batch}")


def load_deepspeed_config(settings: TrainSettings) -> dict:
    """The DeepSpeed config: the JSON file's keys over {"zero_optimization": {"stage": zero}}."""
    base = {"zero_optimization": {"stage": settings.zero}}
    if not settings.deepspeed_config:
        return base
    path = Path(settings.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except OSError as exc:
        raise TrainSetupError(f"cannot read DeepSpeed config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise TrainSetupError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if {"optimizer", "scheduler"} & set(user):
        raise TrainSetupError(f"DeepSpeed config {path} sets an optimizer or scheduler; remove it: the loop "
                              "uses AdamW at the finetune/pretrain learning rate")
    stage = user.get("zero_optimization", {}).get("stage", settings.zero)
    if stage != settings.zero:
        raise TrainSetupError(f"DeepSpeed config {path} is for ZeRO-{stage} but --zero is {settings.zero}")
    user["zero_optimization"] = {**user.get("zero_optimization", {}), "stage": settings.zero}
    return user


def micro_steps(batch_size: int, settings: TrainSettings) -> int:
    """Micro-steps per optimizer step so a rank never holds more than `micro_batch` clips at once."""
    if not settings.micro_batch:
        return 1
    return max(1, math.ceil(batch_size / (settings.workers * settings.micro_batch)))


def _job(kind: str, settings: TrainSettings, batch_size: int, **fields) -> dict:
    engine = EngineConfig(kind=settings.engine, zero=settings.zero, precision=settings.precision,
                          micro_steps=micro_steps(batch_size, settings), deepspeed=load_deepspeed_config(settings))
    return dict(kind=kind, engine=dataclasses.asdict(engine), use_gpu=settings.use_gpu, threads=settings.threads,
                checkpoint_every=settings.checkpoint_every, **fields)


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError a worker raised (ResumeError, a bad setting), if that is why the run failed."""
    failures = exc.worker_failures.values() if isinstance(exc, ray.train.WorkerGroupError) else [exc]
    for err in failures:
        seen = set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, UserError):  # Ray's wrapper subclasses it but prints a traceback: keep the line
                return type(err)(str(err.args[0]) if err.args else str(err))
            err = getattr(err, "cause", None) or err.__cause__
    return None


def _worker_env_vars(settings: TrainSettings) -> dict[str, str]:
    """The training loop runs on a thread of its own (host_memory.worker_env); DeepSpeed picks CUDA unless told."""
    return {**worker_env(), **({} if settings.use_gpu else {"DS_ACCELERATOR": "cpu"})}


def run_training(job: dict, settings: TrainSettings, name: str, storage: str, fail_after_step: int | None = None):
    """One TorchTrainer run (resumes `name` under `storage` if it has checkpoints); returns the Result."""
    fs, path = filesystem(storage) if is_s3(storage) else (None, str(Path(storage).expanduser().resolve()))
    if fail_after_step is not None:  # test hook: a worker dies hard after this step
        job = {**job, "fail_after_step": fail_after_step}
    trainer = TorchTrainer(
        train_worker_task, train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                               resources_per_worker={"CPU": settings.cpus_per_worker},
                                               placement_strategy="SPREAD" if settings.spread else "PACK"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            worker_runtime_env={"env_vars": _worker_env_vars(settings)},
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints)))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user = _user_error(exc)
        if user is not None:
            raise user from None
        raise


def read_state(checkpoint) -> dict:
    """state.json of a run's checkpoint (training/checkpoint.py's TrainState)."""
    with checkpoint.as_directory() as d:
        return json.loads(Path(d, STATE_FILE).read_text())


def default_storage(store: ArtifactStore) -> str:
    return join(store.root, "_train")


def finetune_job(video, cfg: FinetuneConfig, cascade: Cascade, settings: TrainSettings) -> dict:
    """The finetune job: stage weights, their training data and the prompt embedding go through the
    object store, so workers need neither the model directory nor the text encoder."""
    names = finetuned_stage_names(cascade, cfg)
    stages = [(i, Stage(s.config, s.denoiser, s.scheduler), _StageData(video, s, cfg))
              for i, s in enumerate(cascade.stages) if s.config.name in names]
    payload = {"text": cascade.text_encoder([cfg.prompt]), "stages": stages}
    return _job("finetune", settings, cfg.batch_size, cfg=cfg.to_dict(), lr=finetune_lr(cfg, cascade),
                payload=ray.put(payload))


def finetune_on_ray(video, cfg: FinetuneConfig, cascade: Cascade, store: ArtifactStore, settings: TrainSettings,
                    source_bytes: bytes | None = None, name: str | None = None, storage: str | None = None,
                    fail_after_step: int | None = None):
    """Finetune on Ray Train (or reuse the stored artifact); returns (artifact key, Result or None)."""
    key = artifact_key(source_bytes if source_bytes is not None else video_bytes(video), cfg, cascade)
    if store.has(key, ARTIFACT_FILE):
        return key, None
    result = run_training(finetune_job(video, cfg, cascade, settings), settings, name or key,
                          storage or default_storage(store), fail_after_step)
    with result.checkpoint.as_directory() as last:
        save_artifact(Path(last) / "exports", cfg, key, store, cascade)
    return key, result


def pretrain_on_ray(cfg: PretrainConfig, run_dir: str, settings: TrainSettings, name: str | None = None,
                    storage: str | None = None, fail_after_step: int | None = None):
    """Pretrain one embedded-cascade stage on Ray Train; its EMA lands in run_dir/<stage>/ema, where
    `export_cascade` reads it. Returns the Result."""
    job = _job("pretrain", settings, cfg.batch_size, cfgs=[cfg.to_dict()])
    result = run_training(job, settings, name or f"pretrain-{cfg.stage}",
                          storage or str(Path(run_dir, "_ray")), fail_after_step)
    with result.checkpoint.as_directory() as last:
        publish_ema(Path(last), run_dir, cfg.stage)
    return result


def ensure_ray(address: str | None = None) -> bool:
    """Connect to `address` (or start a local Ray) unless this process already has Ray up; True if it connected."""
    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=True)
    return True


def distributed_finetune(args, video, cfg: FinetuneConfig, source_bytes: bytes) -> str:
    """`dreamix finetune --workers N [--zero 2|3] [--address ADDR]`: returns the artifact key."""
    settings = TrainSettings(workers=args.workers, zero=getattr(args, "zero", 2) or 2,
                             use_gpu=bool(getattr(args, "gpu", False)),
                             deepspeed_config=getattr(args, "deepspeed_config", None),
                             micro_batch=getattr(args, "micro_batch", None),
                             max_failures=getattr(args, "max_failures", 0) or 0,
                             spread=bool(getattr(args, "spread", False)),
                             checkpoint_every=getattr(args, "checkpoint_every", None))
    cascade = load_cascade(getattr(args, "model", None))
    store = ArtifactStore(getattr(args, "store", None))
    connected = ensure_ray(getattr(args, "address", None))
    try:
        key, result = finetune_on_ray(video, cfg, cascade, store, settings, source_bytes,
                                      name=getattr(args, "run_name", None), storage=getattr(args, "storage", None))
        if result is not None and not getattr(args, "quiet", False):
            print_run_summary(read_state(result.checkpoint))
    finally:
        if connected:
            # Workers' log lines reach this process's stdout on Ray's log thread, late ones too; disconnecting
            # joins that thread, so none lands after the key the CLI prints alone on the last line.
            ray.shutdown()
    return key


def print_run_summary(state: dict) -> None:
    """Each stage's steps and last loss, and where the run resumed if a worker (or its node) was lost."""
    for stage, losses in state["losses"].items():
        print(f"{stage}: {len(losses)} steps, last loss {losses[-1]:.4f}")
    resumed = [f"{stage} at step {step}" for stage, step in state.get("starts", [])[1:]]
    if resumed:  # the worker group restarted from the newest checkpoint
        print(f"resumed from a checkpoint: {', '.join(resumed)}")
