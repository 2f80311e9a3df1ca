"""The one training loop: pretraining, finetuning, subject learning and the Ray Train worker task.

`train(specs, checkpoints, engine)` trains each spec (one cascade stage) in turn. The engine is an
option (engines.py: plain torch, DDP or DeepSpeed ZeRO); ranks and world size come from
torch.distributed when it is initialized (Ray Train or torchrun), else the run is one process. Every
step's global batch is a pure function of (seed, step) (`TrainSpec.batch`), and so are its dropout
draws, so a run is the same on any worker count and a resumed run continues as if never stopped.

Resume rule: the newest checkpoint (checkpoint.py) says which spec ran and how many steps it took.
Specs before it are done; it reloads its engine state and EMA and trains on up to its `steps` (so a
rerun with more steps continues it); specs after it start from their own weights (`init`). The
optimizer layout must match (DeepSpeed cuts it by world size and ZeRO stage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..models import adapters
from ..models.cascade import Stage
from ..objective import TrainBatch
from .checkpoint import ResumeError, TrainState, checkpoint_name
from .ema import EMA
from .engines import EngineConfig, open_engine
from .shard import rank_parts

OnStep = Callable[[str, int, int, float], None]  # (spec name, steps done, total, loss)


@dataclass
class TrainSpec:
    """One cascade stage to train: its weights, budget, schedule and a pure function step -> global batch."""

    name: str
    stage: Stage
    steps: int
    lr: float
    grad_clip: float
    batch: Callable[[int], TrainBatch]
    seed: int = 0  # step s draws its dropout masks from (seed, s), as the batch draws its data
    checkpoint_every: int = 0  # steps; 0 = not by step count
    checkpoint_every_s: float = 0.0  # seconds on rank 0's clock; 0 = not by time
    minutes: float | None = None  # wall-clock budget; rank 0 decides, every rank stops at the same step
    ema_decay: float | None = None  # pretraining exports the EMA; finetuning the weights themselves
    lr_at: Callable[[int], float] | None = None  # learning rate per step (pretraining's warmup + cosine)
    init: Callable[[torch.nn.Module], None] | None = None  # prepares fresh weights; skipped on resume


def train(specs: list[TrainSpec], checkpoints, engine: EngineConfig | None = None, on_step: OnStep | None = None,
          log: Callable[[str], None] | None = None, device: torch.device | None = None) -> TrainState:
    """Train `specs` in turn from the newest checkpoint in `checkpoints` (LocalCheckpoints, or Ray Train's);
    each spec's result is exports/<name> of the last checkpoint (finetune.attach reads it). `engine`
    defaults to plain torch in this process. Returns the run's state."""
    run = _Run(engine or EngineConfig(), checkpoints, on_step, log or (lambda _: None), device)
    try:
        with checkpoints.latest() as restored:
            state = run.restore(restored)
            for index, spec in enumerate(specs):
                resume = restored if restored is not None and index == state.spec and state.step else None
                if index < state.spec or (resume is not None and state.step >= spec.steps):
                    continue  # done
                if not run.train_spec(spec, index, state, resume):
                    break  # out of time: a rerun resumes this spec with a new budget
    finally:
        shutil.rmtree(run.exports, ignore_errors=True)
    return state


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dropout:{seed}:{step}".encode()).digest()[:8], "little")


class _Run:
    """One call of `train`: the engine settings, this rank, and the exports gathered so far."""

    def __init__(self, engine: EngineConfig, checkpoints, on_step, log, device):
        self.cfg, self.checkpoints, self.on_step, self.log, self.device = engine, checkpoints, on_step, log, device
        self.rank, self.world = _rank_world()
        if engine.kind == "torch" and self.world > 1:
            raise ValueError(f"the torch engine trains in one process, but {self.world} ranks are running: "
                             "use engine ddp or deepspeed")
        self.exports = Path(tempfile.mkdtemp(prefix=f"dreamix-exports-r{self.rank}-"))

    def restore(self, restored: Path | None) -> TrainState:
        layout = self.cfg.layout(self.world)
        zero = self.cfg.zero if self.cfg.kind == "deepspeed" else 0
        if restored is None:
            return TrainState(layout=layout, world=self.world, zero=zero)
        state = TrainState.read(restored)
        if state.layout != layout:
            if state.layout.startswith("zero"):
                raise ResumeError(f"{self.checkpoints.describe()} was checkpointed with {state.world} workers and "
                                  f"ZeRO-{state.zero}; rerun with --workers {state.world} --zero {state.zero}, "
                                  "or use a new run name")
            raise ResumeError(f"{self.checkpoints.describe()} was checkpointed by the torch or DDP engine; resume "
                              "it with one of those, or use a new run name")
        state.world = self.world  # a full optimizer state resumes on any number of ranks
        if self.rank == 0 and (restored / "exports").is_dir():
            shutil.copytree(restored / "exports", self.exports, dirs_exist_ok=True)
        return state

    def train_spec(self, spec: TrainSpec, index: int, state: TrainState, resume: Path | None) -> bool:
        """Train (or resume) one spec to its step budget or deadline; True when it is complete."""
        module = spec.stage.denoiser.train()
        adapters.mark_trainable(module)  # a LoRA spec trains only its adapter, the base stays frozen
        device = torch.device(self.device or module.device)
        if resume is None and spec.init is not None:
            spec.init(module)
        ema = EMA(module, spec.ema_decay) if spec.ema_decay is not None else None  # before ZeRO-3 partitions it
        engine = open_engine(self.cfg, module, spec.lr, spec.grad_clip, device)
        if resume is not None:
            engine.load(resume / "optim")
            if ema is not None:
                ema.shadow.load_state_dict(torch.load(resume / "ema.pt", map_location="cpu", weights_only=True))
            self.log(f"[{spec.name}] resumed at step {state.step}")
        step = first = state.step if resume is not None else 0
        state.spec, state.step = index, step
        stage = dataclasses.replace(spec.stage, denoiser=engine.denoiser)
        losses = state.losses[spec.name] = state.losses.get(spec.name, [])[:step]
        norms = state.grad_norms[spec.name] = state.grad_norms.get(spec.name, [])[:step]
        state.starts.append([spec.name, step])
        clock = _Clock(spec, device, self.world)
        started, stop = None, clock.poll()[0]
        try:
            while step < spec.steps and not stop:
                if step == first + 1:
                    started = time.perf_counter()  # the first step pays for warm-up; time the rest
                loss, norm = self._step(spec, engine, stage, step, device)
                losses.append(loss)
                norms.append(norm)
                step += 1
                if ema is not None:
                    with engine.gathered():
                        ema.update(module, step - 1)
                stop, due = clock.poll()
                due = due or bool(spec.checkpoint_every and step % spec.checkpoint_every == 0)
                if due and not stop and step < spec.steps:
                    state.step = step
                    self._save(engine, state, spec, ema)
                if self.on_step:
                    self.on_step(spec.name, step, spec.steps, loss)
        except KeyboardInterrupt:
            if self.world == 1:  # Ctrl-C keeps the last finished step; a rerun resumes from it
                state.step = step
                self._save(engine, state, spec, ema, stopped=True)
            raise
        # after the loop: a masked (temporal) group has no Adam state until its first video step
        state.memory[spec.name] = self._gather(engine.memory())
        if started is not None and step > first + 1:
            state.seconds_per_step[spec.name] = (time.perf_counter() - started) / (step - first - 1)
        if ema is not None:
            if self.rank == 0:
                ema.shadow.save_pretrained(self.exports / spec.name)
        else:
            engine.export(self.exports / spec.name, self.rank)
        state.step = step
        finished = step >= spec.steps
        self._save(engine, state, spec, ema, stopped=not finished)
        engine.close()
        module.eval().requires_grad_(False)
        return finished

    def _step(self, spec: TrainSpec, engine, stage: Stage, step: int, device) -> tuple[float, float]:
        """One optimizer step on the global batch of `step`: (its mean loss, the gradient norm)."""
        if spec.lr_at is not None:
            engine.set_lr(spec.lr_at(step))
        micro = self.cfg.micro_steps
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_step_seed(spec.seed, step))
            batch = spec.batch(step)
            engine.begin(batch.frames_step)
            part = 0.0
            for k, (sub, scale) in enumerate(rank_parts(batch, self.rank, self.world, micro, device)):
                with engine.accumulate(last=k == micro - 1):
                    sse = sub.loss(stage, reduction="sum")
                    engine.backward(sse * scale)
                part += sse.item() * scale / self.world
            norm = engine.step()
        return self._sum(part, device), norm

    def _save(self, engine, state: TrainState, spec: TrainSpec, ema, stopped: bool = False) -> None:
        """Every rank writes its part of one checkpoint (checkpoint.py)."""
        losses = state.losses.get(spec.name) or [float("nan")]
        metrics = {"stage": spec.name, "spec": state.spec, "step": state.step, "loss": losses[-1]}
        with self.checkpoints.writer(checkpoint_name(state, spec.name, stopped), metrics) as folder:
            engine.save(folder / "optim", self.rank)
            if self.rank == 0:
                state.write(folder)
                if ema is not None:
                    torch.save(ema.shadow.state_dict(), folder / "ema.pt")
                if any(self.exports.iterdir()):
                    shutil.copytree(self.exports, folder / "exports")

    def _sum(self, part: float, device) -> float:
        if self.world == 1:
            return part
        total = torch.tensor([part], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total.item())

    def _gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class _Clock:
    """Rank 0's clock decides when a spec is out of time or due a checkpoint; every rank follows it."""

    def __init__(self, spec: TrainSpec, device, world: int):
        self.last = time.time()
        self.deadline = self.last + spec.minutes * 60 if spec.minutes is not None else None
        self.every_s, self.device, self.world = spec.checkpoint_every_s, device, world

    def poll(self) -> tuple[bool, bool]:
        """(out of time, a checkpoint is due by time)."""
        if self.deadline is None and not self.every_s:
            return False, False
        now = time.time()
        flags = [self.deadline is not None and now > self.deadline,
                 bool(self.every_s) and now - self.last > self.every_s]
        if self.world > 1:  # one broadcast, so all ranks stop and save at the same step
            sent = torch.tensor([float(f) for f in flags], device=self.device)
            dist.broadcast(sent, src=0)
            flags = [bool(f) for f in sent.tolist()]
        if flags[1]:
            self.last = now
        return flags[0], flags[1]
