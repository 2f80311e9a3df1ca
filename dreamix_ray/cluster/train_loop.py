"""The Ray Train worker loop: DeepSpeed ZeRO over a list of stage tasks (finetuning or pretraining).

A checkpoint is one folder that every rank writes into (Ray Train merges them): `state.json` (stage,
step, world size, loss history), `ds/` (this stage's DeepSpeed shards), `ema.pt` (pretraining) and
`exports/<stage>/` (finished stages in diffusers format, fp32: the weights the artifact is made of).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models.cascade import Stage
from ..models.frame_mode import temporal_parameter_names
from ..objective import TrainBatch
from .train_shard import rank_losses

STATE_FILE = "state.json"


class ResumeError(UserError):
    """A run cannot resume from its checkpoint with these settings; the message says what to change."""


@dataclass
class StageTask:
    """One stage to train: its weights, step budget and a pure function step -> global batch."""

    name: str
    stage: Stage
    steps: int
    lr: float
    grad_clip: float
    batch: Callable[[int], TrainBatch]
    checkpoint_every: int
    ema_decay: float | None = None  # pretraining exports the EMA; finetuning the weights themselves
    minutes: float | None = None  # wall-clock budget (pretraining); rank 0 decides, all ranks follow
    lr_at: Callable[[int], float] | None = None  # learning rate per step (pretraining's warmup + cosine)


@dataclass
class RunState:
    """What state.json records; `stage` counts finished tasks, `step` is within the current one."""

    stage: int = 0
    step: int = 0
    world: int = 0
    zero: int = 0
    losses: dict = field(default_factory=dict)
    grad_norms: dict = field(default_factory=dict)  # global gradient norm before clipping, per step
    memory: dict = field(default_factory=dict)  # stage -> per rank {params, optimizer} bytes
    seconds_per_step: dict = field(default_factory=dict)
    starts: list = field(default_factory=list)  # [stage, step] each time a stage (re)starts: shows resumes


class MaskedAdamW(torch.optim.AdamW):
    """AdamW that leaves groups marked `frame_masked` untouched while `masking` is on: ZeRO hands every
    flat partition a (zero) gradient, and without this Adam's momentum would move the temporal layers
    on frame steps, which the single-process loop (grad None -> skipped) never does. Groups are found
    by their mark, since ZeRO steps one group (or sub-group) at a time with the others swapped out."""

    masking: bool = False

    def step(self, closure=None):
        masked = [g for g in self.param_groups if self.masking and g.get("frame_masked")]
        stashed = [(p, p.grad) for g in masked for p in g["params"]]
        for p, _ in stashed:
            p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, g in stashed:
                p.grad = g


class _EngineDenoiser:
    """The DeepSpeed engine in the Stage's denoiser slot: inputs cast to the engine dtype, output fp32."""

    def __init__(self, engine, dtype: torch.dtype):
        self.engine, self.dtype = engine, dtype

    @property
    def device(self) -> torch.device:  # objective.v_loss moves the CPU-made batch here
        return torch.device(self.engine.device)

    def __call__(self, x, t, tokens, pooled, cond=None, frame_mode_on: bool = False):
        def cast(v):
            return None if v is None else v.to(self.dtype)

        return self.engine(cast(x), t, cast(tokens), cast(pooled), cast(cond), frame_mode_on=frame_mode_on).float()


def _param_groups(module: torch.nn.Module) -> list[dict]:
    """Spatial and temporal parameters apart; the temporal group (the names frame mode masks) is marked."""
    temporal = temporal_parameter_names(module)
    named = list(module.named_parameters())
    groups = [{"params": [p for n, p in named if n not in temporal]},
              {"params": [p for n, p in named if n in temporal], "frame_masked": True}]
    return [g for g in groups if g["params"]]


def memory_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds for parameters (ZeRO-3: its partition) and optimizer (fp32 master + moments)."""
    def nbytes(t):
        return t.numel() * t.element_size()

    seen, params = set(), 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps only this rank's partition in ds_tensor
        params += nbytes(t)
        seen.add(t.data_ptr())
    base = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside a ZeRO wrapper
    # fp32 master partitions: ZeRO-3 swaps them out of the param groups between sub-group steps
    masters = (getattr(optimizer, "fp32_partitioned_groups_flat", None)
               or getattr(optimizer, "single_partition_of_fp32_groups", None)
               or [p for g in base.param_groups for p in g["params"]])
    opt = sum(nbytes(m) for m in masters if m.data_ptr() not in seen)  # plain DDP: the weights themselves
    opt += sum(nbytes(v) for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    return {"params": params, "optimizer": opt}


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from the ZeRO partitions (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.data if full is None else full).detach().float().cpu().clone()
    out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return out


def deepspeed_config(base: dict, world: int, micro_steps: int, grad_clip: float, bf16: bool) -> dict:
    """The job's DeepSpeed config with the fields this loop owns filled in (batch sizes are nominal:
    the loop feeds its own shards and DeepSpeed only counts micro-steps)."""
    cfg = json.loads(json.dumps(base))
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=micro_steps,
               train_batch_size=world * micro_steps, gradient_clipping=grad_clip,
               zero_allow_untested_optimizer=True)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bf16}
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _broadcast_stop(stop: bool, device) -> bool:
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _global_loss(part: float, device) -> float:
    total = torch.tensor([part], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def train_loop_per_worker(job: dict) -> None:
    """Ray Train entry: build the job's stage tasks, resume from the last checkpoint, train them in turn."""
    import ray.train

    from .train_tasks import build_tasks

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device("cpu")
    if job.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    tasks = build_tasks(job)
    exports = Path(tempfile.mkdtemp(prefix=f"dreamix-exports-r{rank}-"))
    with contextlib.ExitStack() as stack:
        state, restored = RunState(world=world, zero=job["zero"]), None
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            restored = Path(stack.enter_context(ckpt.as_directory()))
            state = RunState(**json.loads((restored / STATE_FILE).read_text()))
            if (state.world, state.zero) != (world, job["zero"]):
                raise ResumeError(f"run {ctx.get_experiment_name()!r} was checkpointed with {state.world} workers "
                                  f"and ZeRO-{state.zero}; rerun with --workers {state.world} --zero {state.zero}, "
                                  "or use a new run name")
            if rank == 0 and (restored / "exports").is_dir():
                shutil.copytree(restored / "exports", exports, dirs_exist_ok=True)
        for index, task in enumerate(tasks):
            if index < state.stage:
                continue
            resume_dir = restored if restored is not None and index == state.stage and state.step else None
            if not _train_task(task, index, job, state, resume_dir, exports, rank, world, device):
                break  # out of time: a rerun of this run resumes the same stage with a new budget
    shutil.rmtree(exports, ignore_errors=True)


def _train_task(task: StageTask, index: int, job: dict, state: RunState, resume_dir: Path | None,
                exports: Path, rank: int, world: int, device: torch.device) -> bool:
    """Train (or resume) one stage to its step budget or deadline; True when the stage is complete."""
    import deepspeed

    from ..pretrain import EMA

    module = task.stage.denoiser.train().requires_grad_(True)
    ema = EMA(module, task.ema_decay) if task.ema_decay is not None else None  # before ZeRO-3 partitions it
    optimizer = MaskedAdamW(_param_groups(module), lr=task.lr, weight_decay=0.0)
    bf16 = _bf16(job["precision"], device)
    ds_cfg = deepspeed_config(job["deepspeed"], world, job["micro_steps"], task.grad_clip, bf16)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    if resume_dir is not None:
        engine.load_checkpoint(str(resume_dir / "ds"), tag="ds")
        if ema is not None:
            ema.shadow.load_state_dict(torch.load(resume_dir / "ema.pt", weights_only=True))
    step = first = state.step if resume_dir is not None else 0
    stage = Stage(task.stage.config, _EngineDenoiser(engine, torch.bfloat16 if bf16 else torch.float32),
                  task.stage.scheduler)
    losses = state.losses.setdefault(task.name, [])[:step]
    state.losses[task.name] = losses
    norms = state.grad_norms[task.name] = state.grad_norms.get(task.name, [])[:step]
    state.starts.append([task.name, step])
    deadline = time.time() + task.minutes * 60 if task.minutes else None
    started = None
    while step < task.steps and not (deadline and _broadcast_stop(time.time() > deadline, device)):
        if step == first + 1:
            started = time.perf_counter()  # the first step pays for warm-up; time the rest
        batch = task.batch(step)
        if task.lr_at is not None:
            for group in ds_optimizer.param_groups:
                group["lr"] = task.lr_at(step)
        optimizer.masking = batch.frames_step
        part = 0.0
        for loss, share in rank_losses(batch, stage, rank, world, job["micro_steps"], device):
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            part += share
        losses.append(_global_loss(part, device))
        norms.append(float(engine.get_global_grad_norm() or 0.0))
        step += 1
        if ema is not None:
            _update_ema(ema, module, step, job["zero"])
        if step % task.checkpoint_every == 0 and step < task.steps:
            state.step = step
            _report(engine, state, exports, task, index, rank, ema, ds=True)
        if job.get("fail_after_step") == step:
            _crash()
    # after the loop: a masked (temporal) group has no Adam state until its first video step
    state.memory[task.name] = _gather(memory_bytes(module, ds_optimizer))
    if started is not None and step > first + 1:
        state.seconds_per_step[task.name] = (time.perf_counter() - started) / (step - first - 1)
    _export(engine, module, ema, task, exports, rank)
    finished = step >= task.steps
    state.stage, state.step = (index + 1, 0) if finished else (index, step)
    _report(engine, state, exports, task, index, rank, ema, ds=not finished, suffix="" if finished else "-stop")
    engine.destroy()
    return finished


def _update_ema(ema, module, step: int, zero: int) -> None:
    if zero == 3:  # parameters live in partitions: gather them (a collective) for the average
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            ema.update(module, step - 1)
    else:
        ema.update(module, step - 1)


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _export(engine, module, ema, task: StageTask, exports: Path, rank: int) -> None:
    """exports/<stage>: the EMA (pretraining) or the fp32 weights gathered from every rank (finetuning)."""
    weights = None if ema is not None else full_state_dict(module)
    if rank != 0:
        return
    if ema is not None:
        model = ema.shadow
    else:
        model = type(module).from_config(module.config)
        model.load_state_dict({k: weights[k] for k in model.state_dict()})  # persistent buffers only
    model.save_pretrained(exports / task.name)


def _report(engine, state: RunState, exports: Path, task: StageTask, index: int, rank: int, ema, ds: bool,
            suffix: str = "") -> None:
    """Every rank writes its part of the checkpoint into one folder; Ray Train merges them in storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"dreamix-ckpt-r{rank}-") as tmp:
        if ds:
            engine.save_checkpoint(str(Path(tmp, "ds")), tag="ds")
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state)))
            if ema is not None and ds:
                torch.save(ema.shadow.state_dict(), Path(tmp, "ema.pt"))
            if any(exports.iterdir()):
                shutil.copytree(exports, Path(tmp, "exports"))
        losses = state.losses.get(task.name) or [float("nan")]
        metrics = {"stage": task.name, "stage_index": index, "step": state.step, "loss": losses[-1]}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-s{state.stage}-{task.name}-{state.step:07d}{suffix}")


def _crash() -> None:
    """Test hook (job["fail_after_step"]): every worker process dies hard, as on losing the nodes, once
    Ray Train has registered the checkpoints reported so far."""
    import ray.train

    ray.train.get_all_reported_checkpoints()
    os._exit(1)
