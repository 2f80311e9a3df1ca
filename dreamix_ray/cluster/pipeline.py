"""The batch pipeline as a list of plain steps: Ray Data runs it (batch.py), and so can one process.

Words by layer: a *stage* is a cascade stage; a *step* is one Ray Data map over the rows (decode, finetune,
the cascade's stages, encode).

Two layouts of the cascade's stages (BatchOptions.layout):
- *fused*: one step runs every stage of a row (data parallel: each actor holds the whole cascade). Nothing
  between stages crosses the object store and no stage waits on a slower one: on one machine, or GPUs that
  each hold the cascade, it is the faster one (BENCHMARKS.md, "Batch pipeline").
- *staged*: one step per stage, each with its own actors and resources (pipeline parallel): stages on GPUs
  or nodes of their own (--pin-stages), for cascades one device cannot hold.
Both run the same CascadeStep and give the same bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import CascadeConfig
from .io_steps import Decode, Encode, to_batch, to_rows
from .steps import CascadeStep, Degrade, Finetune

# Per-step CPUs when --stage-cpus names none: model steps get a core, I/O steps a share of one.
DEFAULT_CPUS = {"decode": 0.5, "degrade": 1.0, "finetune": 1.0, "base": 1.0, "tsr": 1.0, "ssr": 1.0, "cascade": 1.0,
                "encode": 0.5}
CASCADE_KINDS = ("base", "tsr", "ssr", "cascade")  # steps that run cascade stages (the last: all of them, fused)
LAYOUTS = ("fused", "staged")


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step: `fn` is a callable class on column batches; `name` keys its resources."""

    name: str
    kind: str  # "base" | "tsr" | "ssr" for the steps of single cascade stages, "cascade" for all of them fused
    fn: type | Callable
    kwargs: dict = field(default_factory=dict)
    model: bool = False  # loads cascade weights: gets threads / gpus from its resources


def pipeline_steps(config: CascadeConfig, model: str | None, s3: dict | None, store: str | None,
                    finetune: bool, limits: dict | None = None, layout: str = "staged") -> list[StepSpec]:
    """decode -> [degrade] -> [finetune] -> base -> SR stages (the last one chunk by chunk, inside its step) -> encode;
    fused, the stages are one step ("cascade").

    A latent base gets a degrade step (its VAE encoder, steps.Degrade) with its own actors and resources; a pixel
    base samples the decoded input as it is.

    The last stage runs a row's chunks itself (edit.run_cascade, paper App. A.1) rather than as rows of their
    own: no reassembly step holds the chunks of every video in flight (a memory ceiling and a single point
    of failure at scale), and a retried step recomputes whole rows, never half of one.
    """
    common = dict(model=model, s3=s3)
    specs = [StepSpec("decode", "decode", Decode, dict(common, limits=limits))]
    encoded = config.stages[0].latent is not None
    if encoded:
        specs.append(StepSpec("degrade", "degrade", Degrade, dict(common), model=True))
    if finetune:
        specs.append(StepSpec("finetune", "finetune", Finetune, dict(common, store=store, limits=limits),
                               model=True))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "fused":  # stage 0 to frames: run_cascade through every stage
        specs.append(StepSpec("cascade", "cascade", CascadeStep,
                              dict(common, index=0, store=store, to_frames=True, encoded=encoded), model=True))
    else:
        for index, stage in enumerate(config.stages):
            specs.append(StepSpec(stage.name, stage.kind, CascadeStep,
                                  dict(common, index=index, store=store, to_frames=index == len(config.stages) - 1,
                                       encoded=encoded and index == 0),
                                  model=True))
    specs.append(StepSpec("encode", "encode", Encode, dict(fps=config.stages[-1].fps, s3=s3, limits=limits)))
    return specs


def step_resource(table: dict[str, float], spec: StepSpec, default: float) -> float:
    """A step's value from a name=value table: its own name first, then its kind."""
    return table.get(spec.name, table.get(spec.kind, default))


def run_in_process(items: list[dict], specs: list[StepSpec], batch_size: int = 4, threads: int = 1,
                   on_stage: Callable[[str, float], None] | None = None) -> list[dict]:
    """Every step over all items, one step after another, in this process (no Ray): the baseline."""
    rows = items
    for spec in specs:
        start = time.perf_counter()
        kwargs = dict(spec.kwargs, threads=threads) if spec.model else spec.kwargs
        step = spec.fn(**kwargs)
        size = 1 if spec.name in ("decode", "encode") else batch_size
        done = []
        for i in range(0, len(rows), size):
            part = rows[i:i + size]
            done += to_rows(step(to_batch(part, list(part[0]))))
        rows = done
        if on_stage:
            on_stage(spec.name, time.perf_counter() - start)
    return rows
