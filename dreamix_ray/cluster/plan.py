"""The batch pipeline as a list of plain stages: Ray Data runs it (batch.py), and so can one process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import CascadeConfig
from .stages import CascadeStage, Decode, Encode, Finetune, to_batch, to_rows

# Per-stage CPUs when --stage-cpus names none: model stages get a core, I/O stages a share of one.
DEFAULT_CPUS = {"decode": 0.5, "finetune": 1.0, "base": 1.0, "tsr": 1.0, "ssr": 1.0, "encode": 0.5}


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: `fn` is a callable class on column batches; `name` keys its resources."""

    name: str
    kind: str  # "base" | "tsr" | "ssr" for cascade stages, else the name
    fn: type | Callable
    kwargs: dict = field(default_factory=dict)
    model: bool = False  # loads cascade weights: gets threads / gpus from its resources


def pipeline_stages(config: CascadeConfig, model: str | None, s3: dict | None, store: str | None,
                    finetune: bool, limits: dict | None = None) -> list[StageSpec]:
    """decode -> [finetune] -> base -> SR stages (the last one chunk by chunk, inside its step) -> encode.

    The last stage runs a row's chunks itself (edit.run_cascade, paper App. A.1) rather than as rows of their
    own: no reassembly step holds the chunks of every video in flight (a memory ceiling and a single point
    of failure at scale), and a retried step recomputes whole rows, never half of one.
    """
    common = dict(model=model, s3=s3)
    specs = [StageSpec("decode", "decode", Decode, dict(common, limits=limits))]
    if finetune:
        specs.append(StageSpec("finetune", "finetune", Finetune, dict(common, store=store, limits=limits),
                               model=True))
    for index, stage in enumerate(config.stages):
        specs.append(StageSpec(stage.name, stage.kind, CascadeStage,
                               dict(common, index=index, store=store, to_frames=index == len(config.stages) - 1),
                               model=True))
    specs.append(StageSpec("encode", "encode", Encode, dict(fps=config.stages[-1].fps, s3=s3, limits=limits)))
    return specs


def stage_resource(table: dict[str, float], spec: StageSpec, default: float) -> float:
    """A stage's value from a name=value table: its own name first, then its kind."""
    return table.get(spec.name, table.get(spec.kind, default))


def run_in_process(items: list[dict], specs: list[StageSpec], batch_size: int = 4, threads: int = 1,
                   on_stage: Callable[[str, float], None] | None = None) -> list[dict]:
    """Every stage over all items, one stage after another, in this process (no Ray): the baseline."""
    rows = items
    for spec in specs:
        start = time.perf_counter()
        kwargs = dict(spec.kwargs, threads=threads) if spec.model else spec.kwargs
        stage = spec.fn(**kwargs)
        size = 1 if spec.name in ("decode", "encode") else batch_size
        done = []
        for i in range(0, len(rows), size):
            part = rows[i:i + size]
            done += to_rows(stage(to_batch(part, list(part[0]))))
        rows = done
        if on_stage:
            on_stage(spec.name, time.perf_counter() - start)
    return rows
