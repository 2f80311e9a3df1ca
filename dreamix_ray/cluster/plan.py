"""The batch pipeline as a list of plain stages: Ray Data runs it (batch.py), and so can one process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import CascadeConfig
from .stages import CascadeStage, Decode, Encode, Finetune, Reassemble, split_chunks, to_batch, to_rows

# Per-stage CPUs when --stage-cpus names none: model stages get a core, I/O stages a share of one.
DEFAULT_CPUS = {"decode": 0.5, "finetune": 1.0, "base": 1.0, "tsr": 1.0, "ssr": 1.0, "reassemble": 0.1,
                "encode": 0.5}


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: `fn` is a callable class (map) or a row function (flat); `name` keys its resources."""

    name: str
    kind: str  # "base" | "tsr" | "ssr" for cascade stages, else the name
    fn: type | Callable
    kwargs: dict = field(default_factory=dict)
    flat: bool = False  # a row -> rows function (Ray Data flat_map), else a batch class (map_batches)
    model: bool = False  # loads cascade weights: gets threads / gpus from its resources
    single: bool = False  # keeps state across rows, so exactly one instance may run


def pipeline_stages(config: CascadeConfig, model: str | None, s3: dict | None, store: str | None,
                    finetune: bool, limits: dict | None = None) -> list[StageSpec]:
    """decode -> [finetune] -> base -> SR stages -> last SSR in chunks -> reassemble -> encode + upload."""
    common = dict(model=model, s3=s3)
    specs = [StageSpec("decode", "decode", Decode, dict(common, limits=limits))]
    if finetune:
        specs.append(StageSpec("finetune", "finetune", Finetune, dict(common, store=store, limits=limits),
                               model=True))
    stages = config.stages
    # The last stage is the chunked one when it is an SSR (CascadeConfig checks that nothing follows an SSR).
    chunked = len(stages) - 1 if stages[-1].kind == "ssr" else None
    for index, stage in enumerate(stages):
        if index == chunked:
            specs.append(StageSpec("split", "split", split_chunks, dict(cascade=config), flat=True))
        to_frames = index == len(stages) - 1
        specs.append(StageSpec(stage.name, stage.kind, CascadeStage,
                               dict(common, index=index, store=store, to_frames=to_frames), model=True))
        if index == chunked:
            specs.append(StageSpec("reassemble", "reassemble", Reassemble, dict(timing_column=f"t_{stage.name}"),
                                   single=True))
    specs.append(StageSpec("encode", "encode", Encode, dict(fps=stages[-1].fps, s3=s3, limits=limits)))
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
        if spec.flat:
            rows = [out for row in rows for out in spec.fn(row, **spec.kwargs)]
        else:
            kwargs = dict(spec.kwargs, threads=threads) if spec.model else spec.kwargs
            stage = spec.fn(**kwargs)
            size = 1 if spec.name in ("decode", "encode", "reassemble") else batch_size
            done = []
            for i in range(0, len(rows), size):
                part = rows[i:i + size]
                done += to_rows(stage(to_batch(part, list(part[0]))))
            rows = done
        if on_stage:
            on_stage(spec.name, time.perf_counter() - start)
    return rows
