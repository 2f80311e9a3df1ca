"""The one checkpoint format and where checkpoints live (a local folder here; Ray Train's storage in
cluster/train_worker.py).

A checkpoint is one folder that every rank writes its part into:

    state.json        TrainState: which spec, its step, engine layout, world, losses, grad norms, resumes
    optim/            the spec's engine state: torch / DDP `state.pt` (model + optimizer, rank 0),
                      DeepSpeed its shards (every rank)
    ema.pt            the spec's EMA (pretraining)
    exports/<name>/   each finished (or stopped) spec's result in diffusers format: the weights, or the EMA
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from ..errors import UserError

STATE_FILE = "state.json"


class ResumeError(UserError):
    """A run cannot resume from its checkpoint with these settings; the message says what to change."""


@dataclass
class TrainState:
    """What state.json records: specs before `spec` are done, spec `spec` has trained `step` steps."""

    spec: int = 0
    step: int = 0
    layout: str = "full"  # EngineConfig.layout: how the optimizer state is cut
    world: int = 1
    zero: int = 0  # DeepSpeed's ZeRO stage, 0 for torch / DDP
    losses: dict = field(default_factory=dict)
    grad_norms: dict = field(default_factory=dict)  # global gradient norm before clipping, per step
    memory: dict = field(default_factory=dict)  # spec -> per rank {params, optimizer} bytes
    seconds_per_step: dict = field(default_factory=dict)
    starts: list = field(default_factory=list)  # [spec, step] each time a spec (re)starts: shows resumes

    def write(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def checkpoint_name(state: TrainState, spec_name: str, stopped: bool = False) -> str:
    """Names sort in training order (Ray Train and LocalCheckpoints both keep the newest)."""
    return f"checkpoint-{state.spec:02d}-{state.step:07d}-{spec_name}{'-stop' if stopped else ''}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LocalCheckpoints:
    """Checkpoints as folders under `root`, the newest `keep` kept; ranks of one machine share them."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def describe(self) -> str:
        return f"the run in {self.root}"

    def _committed(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint-*")) if self.root.is_dir() else []

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = self._committed()
        yield found[-1] if found else None

    @contextlib.contextmanager
    def writer(self, name: str, metrics: dict) -> Iterator[Path]:
        """A folder every rank writes its part into; it appears under its name once complete."""
        partial = self.root / f".partial-{name}"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        yield partial
        _barrier()
        if _rank() == 0:
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)  # a resumed run that stops again at the same step
            os.replace(partial, final)  # atomic: a kill leaves the previous checkpoint the newest
            for old in self._committed()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
