"""Batch editing on Ray Data: the plain stages of plan.py as streaming actor pools, results to Parquet."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray
from ray.data import ActorPoolStrategy, DataContext

from ..errors import UserError
from ..manifest import read_manifest, results_dir, work_items, write_results
from ..request import EditRequest
from ..storage import S3Settings, join, write_bytes
from .pipeline import DEFAULT_CPUS, StepSpec, pipeline_steps, step_resource
from .steps import cascade_config, model_tag, to_rows

LOST = "lost by the pipeline: a worker failed on it repeatedly (see the Ray logs); rerun to retry"


class BatchError(UserError):
    """A batch job cannot start or was stopped; the message says why and what to do."""


@dataclass(frozen=True)
class BatchOptions:
    """One batch job; the CLI and jobs/edit_batch.py build it from flags."""

    manifest: str
    output_prefix: str
    model: str | None = None
    address: str | None = None
    s3: S3Settings = S3Settings()
    # Every row's defaults (its own columns override them); resolved per row by request.resolve.
    request: EditRequest = EditRequest(prompt="")
    store: str | None = None  # finetuned artifacts; default <output-prefix>/artifacts
    cpus: dict = field(default_factory=dict)  # stage name or kind -> CPUs per actor
    gpus: dict = field(default_factory=dict)
    actors: dict = field(default_factory=dict)  # stage name or kind -> (min, max) actors
    batch_size: int = 4  # rows per model call
    max_error_rate: float = 1.0  # stop once failures exceed this fraction of all outputs
    max_restarts: int = 3  # per actor, after a crash
    max_task_retries: int = 3  # per batch, on a restarted actor
    num_cpus: int | None = None  # size of the local cluster started without --address
    run_id: str | None = None
    progress: bool = True
    limits: dict | None = None  # VideoLimits fields
    flush_every: int = 64  # results rows per Parquet part
    object_store_mb: float | None = None  # Ray Data's budget for rows in flight: bounds how far reading runs ahead
    pin_stages: bool = False  # cascade stages ask for custom resource stage_<kind> (one worker group per stage)
    actor_start_timeout_s: float = 1800  # a stage with no actor by then fails the job instead of hanging


@dataclass
class BatchSummary:
    """What a run did: counts, speed, where the results are, and the first errors."""

    run_id: str
    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    results: str = ""
    stopped: str = ""
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    stats: str = ""  # ds.stats() after execution
    busy_seconds: dict[str, float] = field(default_factory=dict)  # per stage: summed remote wall time
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per stage: summed remote CPU time

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.ok / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [f"run {self.run_id}: {self.total} outputs: {self.ok} done, {self.failed} failed, "
                 f"{self.skipped} skipped in {self.seconds:.1f} s ({self.videos_per_minute:.2f} videos/min)",
                 f"results: {self.results}"]
        lines += [f"  failed {vid!r} {prompt!r}: {err}" for vid, prompt, err in self.errors[:10]]
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10} more (see the results)")
        return "\n".join(lines + ([f"stopped: {self.stopped}"] if self.stopped else []))


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _actors(opts: BatchOptions, spec: StepSpec) -> tuple[int, int]:
    lo, hi = step_resource(opts.actors, spec, (1, 4 if spec.model else 2))
    return int(lo), int(hi)


def min_resources(opts: BatchOptions, specs: list[StepSpec]) -> dict[str, float]:
    """CPUs and GPUs that one actor of every stage needs at once: less and the pipeline cannot stream."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for spec in specs:
        lo = _actors(opts, spec)[0]
        need["CPU"] += lo * step_resource(opts.cpus, spec, DEFAULT_CPUS.get(spec.kind, 0.5))
        need["GPU"] += lo * step_resource(opts.gpus, spec, 0.0)
    return need


def start_or_join(address: str | None, local: dict, **common) -> bool:
    """Join the cluster at `address`, else start a private local one (even when `ray start` left one running
    here: ray.init would join that, and refuse `num_cpus`); one line says which. True if it joined.

    `local` are ray.init arguments only a new cluster takes (num_cpus, include_dashboard, ...).
    """
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        print(f"ray: joined the cluster at {address}", file=sys.stderr, flush=True)
        return True
    try:  # only to name it in the line below
        running = ray._private.services.find_bootstrap_address(None)
    except Exception:
        running = None
    ray.init(address="local", **local, **common)
    line = f"ray: started a private local cluster ({local.get('num_cpus', os.cpu_count())} CPUs)"
    if running:
        line += f"; the one `ray start` runs at {running} is left alone (pass --address {running} to use it)"
    print(line, file=sys.stderr, flush=True)
    return False


def init_ray(opts: BatchOptions, specs: list[StepSpec]) -> bool:
    """Join --address / $RAY_ADDRESS (which `ray job submit` sets), or start a private local cluster; True if
    this call started Ray (or connected to it)."""
    if ray.is_initialized():
        return False
    # Every stage needs one actor alive for rows to stream through; on a small machine that means more
    # logical CPUs than cores, which the OS time-slices (stages seldom all compute at once).
    num_cpus = opts.num_cpus or max(os.cpu_count() or 1, math.ceil(min_resources(opts, specs)["CPU"]))
    start_or_join(opts.address or os.environ.get("RAY_ADDRESS"), {"num_cpus": num_cpus, "include_dashboard": False},
                  log_to_driver=True)
    return True


def check_fits(opts: BatchOptions, specs: list[StepSpec]) -> None:
    """Say so up front when the cluster cannot hold one actor per stage (it would wait for an autoscaler)."""
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in min_resources(opts, specs).items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        text = ", ".join(f"{need:g} {k} (the cluster has {got:g})" for k, (need, got) in short.items())
        print(f"warning: one actor per stage needs {text}; the job waits up to {opts.actor_start_timeout_s:g} s "
              "for an autoscaler to add nodes. Lower --stage-cpus / --stage-gpus on a fixed cluster.",
              file=sys.stderr)


def build_dataset(items: list[dict], specs: list[StepSpec], opts: BatchOptions,
                  stage_classes: dict[str, type] | None = None) -> "ray.data.Dataset":
    """from_items -> map_batches(actor pool) per stage (lazy)."""
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 2000)))
    for spec in specs:
        cpus = step_resource(opts.cpus, spec, DEFAULT_CPUS.get(spec.kind, 0.5))
        gpus = step_resource(opts.gpus, spec, 0.0)
        kwargs = dict(spec.kwargs)
        if spec.model:
            kwargs["threads"] = max(1, int(cpus))
            if spec.name != "finetune":
                kwargs["gpus"] = gpus
        lo, hi = _actors(opts, spec)
        # A token amount: the resource only says which worker group may host the stage; GPUs do the counting.
        pinned = {f"stage_{spec.kind}": 0.001} if opts.pin_stages and spec.kind in ("base", "tsr", "ssr") else None
        fn = _named((stage_classes or {}).get(spec.name, spec.fn), spec.name)
        with warnings.catch_warnings():
            # Bounded restarts need ray_remote_args (deprecated in 2.60, no named parameter yet); Ray's
            # default of infinite retries would loop forever on a row that kills its worker.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(fn, fn_constructor_kwargs=kwargs,
                                compute=ActorPoolStrategy(min_size=lo, max_size=hi),
                                batch_size=opts.batch_size if spec.model else 1, num_cpus=cpus,
                                num_gpus=gpus or None, resources=pinned, max_restarts=opts.max_restarts,
                                max_task_retries=opts.max_task_retries)
    return ds


def _named(cls: type, name: str) -> type:
    """Ray Data names operators after the class: one subclass per stage keeps ds.stats() rows apart."""
    title = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part) + "Step"
    return cls if cls.__name__ == title else type(title, (cls,), {"__module__": cls.__module__})


@contextlib.contextmanager
def _data_context(opts: BatchOptions):
    """This job's Ray Data settings, restored afterwards (the context is global to the driver process)."""
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.execution_options.resource_limits,
             ctx.wait_for_min_actors_s)
    ctx.enable_progress_bars = opts.progress
    # Rows carry their own errors; a block is lost only if its worker died more than max_task_retries
    # times. Keep going then: the driver records its rows as lost, and --max-error-rate decides.
    ctx.max_errored_blocks = -1
    ctx.wait_for_min_actors_s = int(opts.actor_start_timeout_s)
    if opts.object_store_mb:
        ctx.execution_options.resource_limits = saved[2].copy(object_store_memory=opts.object_store_mb * 2**20)
    try:
        yield
    finally:
        (ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.execution_options.resource_limits,
         ctx.wait_for_min_actors_s) = saved


class _ResultsWriter:
    """Results Parquet parts under the output prefix, written as rows arrive (a crash keeps what is done)."""

    def __init__(self, opts: BatchOptions, run_id: str, model: str, s3: S3Settings):
        self.opts, self.run_id, self.model, self.s3 = opts, run_id, model, s3
        self.pending: list[dict] = []
        self.part = 0

    def add(self, row: dict) -> None:
        self.pending.append(dict(row, run=self.run_id, model=self.model))
        if len(self.pending) >= self.opts.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            write_results(self.opts.output_prefix, self.run_id, self.part, self.pending, self.s3)
            self.part, self.pending = self.part + 1, []


def run_batch(opts: BatchOptions, stage_classes: dict[str, type] | None = None) -> BatchSummary:
    """Read the manifest, stream it through the stages, write results; `stopped` says why if it ended early."""
    if not 0.0 <= opts.max_error_rate <= 1.0:
        raise BatchError(f"--max-error-rate must be in [0, 1], got {opts.max_error_rate}")
    start = time.perf_counter()
    s3 = opts.s3.resolved()
    # Workers get the endpoint and region; credentials come from their own environment (env, profile, IAM).
    worker_s3 = {k: v for k, v in (("endpoint_url", s3.endpoint_url), ("region", s3.region)) if v}
    rows = read_manifest(opts.manifest, s3, on_error="keep")
    config, tag = cascade_config(opts.model, s3), model_tag(opts.model, s3)
    items = work_items(rows, opts.output_prefix, opts.request, tag, config)
    store = opts.store or join(opts.output_prefix, "artifacts")
    specs = pipeline_steps(config, opts.model, worker_s3 or None, store, any(r.finetune for r in rows), opts.limits)
    run_id = opts.run_id or new_run_id()
    summary = BatchSummary(run_id, len(items), results=join(results_dir(opts.output_prefix), f"run={run_id}"))
    started = init_ray(opts, specs)
    try:
        check_fits(opts, specs)
        with _data_context(opts):
            _execute(build_dataset(items, specs, opts, stage_classes), items, opts, summary,
                     _ResultsWriter(opts, run_id, tag, s3))
        summary.seconds = time.perf_counter() - start
        _write_summary(opts, summary, s3)
    finally:
        if started:
            ray.shutdown()
    return summary


def _execute(ds, items: list[dict], opts: BatchOptions, summary: BatchSummary, writer: _ResultsWriter) -> None:
    """Consume the stream: count, write results as they come, stop on the error rate, record lost rows."""
    seen: set[str] = set()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in batches:
            for row in to_rows(batch):
                if row["key"] not in seen:  # a retried block may deliver a row twice
                    seen.add(row["key"])
                    _count(summary, row)
                    writer.add(row)
            if summary.failed > opts.max_error_rate * summary.total:
                summary.stopped = (f"{summary.failed} of {summary.total} outputs failed, over --max-error-rate "
                                   f"{opts.max_error_rate:g}; first error: {summary.errors[0][2]}")
                break
    finally:
        getattr(batches, "close", lambda: None)()  # stops the streaming executor when we leave early
    if not summary.stopped:
        for item in items:
            if item["key"] not in seen:
                row = dict(item, status="error", error=LOST)
                _count(summary, row)
                writer.add(row)
    writer.flush()
    summary.stats, summary.busy_seconds, summary.cpu_seconds = ds.stats(), busy_seconds(ds), busy_seconds(
        ds, "cpu_time")


def busy_seconds(ds, kind: str = "wall_time") -> dict[str, float]:
    """Per operator, the summed wall (or cpu_time) seconds of its tasks, as ds.stats() prints them."""
    def walk(summary, out):
        for parent in summary.parents:
            walk(parent, out)
        for op in summary.operators_stats:
            if getattr(op, kind, None) is not None:
                out[op.operator_name] = float(getattr(op, kind).sum)
        return out

    try:  # ds.stats() is text only; its structured form is not public API, so tolerate it changing
        return walk(ds._get_stats_summary(), {})
    except (AttributeError, TypeError):
        return {}


def _count(summary: BatchSummary, row: dict) -> None:
    if row["status"] == "ok":
        summary.ok += 1
    elif row["status"] == "skipped":
        summary.skipped += 1
    else:
        summary.failed += 1
        summary.errors.append((row["id"], row["prompt"], row["error"]))


def _write_summary(opts: BatchOptions, summary: BatchSummary, s3: S3Settings) -> None:
    data = dict(run=summary.run_id, total=summary.total, ok=summary.ok, failed=summary.failed,
                skipped=summary.skipped, seconds=round(summary.seconds, 3),
                videos_per_minute=round(summary.videos_per_minute, 3), stopped=summary.stopped,
                manifest=opts.manifest, model=opts.model or "embedded")
    write_bytes(join(summary.results, "summary.json"), json.dumps(data, indent=2).encode(), s3)
