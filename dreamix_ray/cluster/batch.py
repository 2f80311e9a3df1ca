"""Batch editing on Ray Data: the plain stages of plan.py as streaming actor pools, results to Parquet."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray
from ray.data import ActorPoolStrategy, DataContext

from ..errors import UserError
from ..host_memory import worker_env
from ..manifest import read_manifest, results_dir, work_items, write_results
from ..request import EditRequest
from ..storage import S3Settings, join, write_bytes
from .pipeline import CASCADE_KINDS, DEFAULT_CPUS, LAYOUTS, StepSpec, pipeline_steps, step_resource
from .io_steps import cascade_config, to_rows
from .steps import model_tag, placement_columns

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
    # A lost node nobody replaced: how long a step whose actor fits on no live node waits (None: the above)
    node_wait_s: float | None = None
    layout: str = "auto"  # "fused" | "staged" (pipeline.py); auto: staged when stages are pinned or given resources


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
    stages: tuple[str, ...] = ()  # cascade stage names, in order
    layout: str = ""  # "fused" | "staged": how the stages ran (pipeline.py)
    # per stage: (node id, node IP, accelerator, Ray's GPU ids) -> outputs it ran there
    placement: dict[str, Counter] = field(default_factory=dict)

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.ok / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [f"run {self.run_id} ({self.layout}): {self.total} outputs: {self.ok} done, {self.failed} failed, "
                 f"{self.skipped} skipped in {self.seconds:.1f} s ({self.videos_per_minute:.2f} videos/min)",
                 f"results: {self.results}"]
        lines += [self.placement_line(stage) for stage in self.stages if self.placement.get(stage)]
        lines += [f"  failed {vid!r} {prompt!r}: {err}" for vid, prompt, err in self.errors[:10]]
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10} more (see the results)")
        return "\n".join(lines + ([f"stopped: {self.stopped}"] if self.stopped else []))


    def placement_line(self, stage: str) -> str:
        """One line per stage: on which nodes and accelerators its outputs ran."""
        where = [f"{n} on node {node[:8]} ({ip}, {device}" + (f", Ray GPU {gpus})" if gpus else ")")
                 for (node, ip, device, gpus), n in self.placement[stage].most_common()]
        return f"placement {stage}: " + "; ".join(where)


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def stage_keys(opts: BatchOptions, config) -> list[str]:
    """The --stage-cpus / --stage-gpus / --stage-actors keys that name a single cascade stage (by name or kind)."""
    names = {stage.name for stage in config.stages} | {stage.kind for stage in config.stages}
    return sorted({key for table in (opts.cpus, opts.gpus, opts.actors) for key in table if key in names})


def resolve_layout(opts: BatchOptions, config) -> str:
    """fused, unless the job gives single stages nodes (--pin-stages) or resources of their own: those need a step
    per stage. An explicit layout that contradicts the flags is an error, not a silent choice."""
    keys = stage_keys(opts, config)
    if opts.layout == "auto":
        return "staged" if opts.pin_stages or keys else "fused"
    if opts.layout not in LAYOUTS:
        raise BatchError(f"--layout must be auto, fused or staged, got {opts.layout!r}")
    if opts.layout == "fused" and (opts.pin_stages or keys):
        why = "--pin-stages" if opts.pin_stages else "resources for " + ", ".join(keys)
        raise BatchError(f"--layout fused runs every stage in one step, so {why} cannot apply; give the step's "
                         "resources as cascade=... (--stage-cpus cascade=1), or use --layout staged")
    if opts.layout == "staged" and any("cascade" in table for table in (opts.cpus, opts.gpus, opts.actors)):
        raise BatchError("resources for 'cascade' apply to --layout fused; name the stages (base=..., ssr=...) "
                         "with --layout staged")
    return opts.layout


def _actors(opts: BatchOptions, spec: StepSpec) -> tuple[int, int]:
    lo, hi = step_resource(opts.actors, spec, (1, 4 if spec.model else 2))
    return int(lo), int(hi)


def min_resources(opts: BatchOptions, specs: list[StepSpec]) -> dict[str, float]:
    """CPUs and GPUs that one actor of every stage needs at once: less and the pipeline cannot stream."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for spec in specs:
        shape = actor_shape(opts, spec)
        for key in need:
            need[key] += _actors(opts, spec)[0] * shape.get(key, 0.0)
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
    num_cpus = opts.num_cpus or local_cpus(opts, specs)
    start_or_join(opts.address or os.environ.get("RAY_ADDRESS"), {"num_cpus": num_cpus, "include_dashboard": False},
                  log_to_driver=True)
    return True


def local_cpus(opts: BatchOptions, specs: list[StepSpec]) -> int:
    """Logical CPUs of a private local cluster: every core for the model steps' actors, the light steps (decode,
    encode) on top, which the OS time-slices beside them; and at least one actor of every step, else rows cannot
    stream through (on a small machine, more logical CPUs than cores: stages seldom all compute at once)."""
    light = min_resources(opts, [spec for spec in specs if not spec.model])["CPU"]
    return max(math.ceil((os.cpu_count() or 1) + light), math.ceil(min_resources(opts, specs)["CPU"]))


def check_fits(opts: BatchOptions, specs: list[StepSpec]) -> None:
    """Say so up front when the cluster cannot hold one actor per stage (it would wait for an autoscaler)."""
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in min_resources(opts, specs).items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        text = ", ".join(f"{need:g} {k} (the cluster has {got:g})" for k, (need, got) in short.items())
        print(f"warning: one actor per stage needs {text}; the job waits up to {opts.actor_start_timeout_s:g} s "
              "for an autoscaler to add nodes. Lower --stage-cpus / --stage-gpus on a fixed cluster.",
              file=sys.stderr)


def _pinned(opts: BatchOptions, spec: StepSpec) -> dict[str, float]:
    # A token amount: the resource only says which worker group may host the stage; GPUs do the counting.
    return {f"stage_{spec.kind}": 0.001} if opts.pin_stages and spec.kind in ("base", "tsr", "ssr") else {}


def actor_shape(opts: BatchOptions, spec: StepSpec) -> dict[str, float]:
    """What one actor of a step asks of a node: CPUs, GPUs and, pinned, its stage_<kind> token."""
    shape = {"CPU": step_resource(opts.cpus, spec, DEFAULT_CPUS.get(spec.kind, 0.5)),
             "GPU": step_resource(opts.gpus, spec, 0.0), **_pinned(opts, spec)}
    return {k: v for k, v in shape.items() if v}


class NodeWatch:
    """Stops a job once no row has come out for `timeout_s` while some step's actor fits on no live node (a lost
    node nobody replaced): Ray would wait for one forever, restarting the step's actor when a node with room
    joins. A step whose node is gone after it finished its rows does not stop a job that still makes progress.

    It also stops a job one of whose steps has had no running actor for `start_timeout_s` (every node can hold
    one, but the cluster cannot hold one of every step at once). Ray Data's own guard for that,
    wait_for_min_actors_s, starts the steps' actor pools one after another, each waiting for the one before
    it to be up; without it they start side by side (build_dataset)."""

    def __init__(self, shapes: dict[str, dict[str, float]], timeout_s: float, start_timeout_s: float,
                 period_s: float = 2.0):
        self.shapes, self.timeout_s, self.start_timeout_s, self.period_s = shapes, timeout_s, start_timeout_s, period_s
        self.since: dict[str, float] = {}
        self.no_actor_since: dict[str, float] = {}
        self.last_row = time.monotonic()

    def progress(self) -> None:
        self.last_row = time.monotonic()

    def check(self) -> str:
        """'' while every step fits somewhere or rows still come out, else why the job stops."""
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        now = time.monotonic()
        stalled = now - self.last_row >= self.timeout_s
        fits = set()
        for name, shape in self.shapes.items():
            if any(all(res.get(k, 0.0) >= v - 1e-9 for k, v in shape.items()) for res in nodes):
                self.since.pop(name, None)
                fits.add(name)
            elif now - self.since.setdefault(name, now) >= self.timeout_s and stalled:
                return (f"no live node can hold a {name} actor ({_resources_text(shape)}) and none joined within "
                        f"{self.timeout_s:g} s (a node was lost?); add a node with these resources (an autoscaler "
                        f"does) and rerun with the same --output-prefix: finished outputs are kept and skipped")
        waiting = [step for step in _steps_without_a_running_actor(self.shapes) if step in fits]
        for step in set(self.no_actor_since) - set(waiting):
            self.no_actor_since.pop(step)
        for step in waiting:
            if now - self.no_actor_since.setdefault(step, now) >= self.start_timeout_s:
                return (f"the {step} step has had no running actor for {self.start_timeout_s:g} s: the cluster "
                        f"({_resources_text(ray.cluster_resources())}) cannot hold one actor of every step at "
                        f"once; lower --stage-cpus / --stage-gpus or add nodes, and rerun with the same "
                        f"--output-prefix: finished outputs are kept and skipped")
        return ""


def _steps_without_a_running_actor(steps) -> list[str]:
    """Those of `steps` (names) with an actor waiting to start (or restart) and none running: this driver's
    actors as the GCS lists them (Ray Data names them MapWorker(MapBatches(<Title>Step))). ray._private.state,
    of the pinned ray 2.60: the public state API needs the dashboard, which clusters may run without."""
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    by_class = {f"MapWorker(MapBatches({_step_title(step)}))": step for step in steps}
    alive, waiting = set(), set()
    for actor in state.actors(job_id=ray.JobID.from_hex(job)).values():
        step, status = by_class.get(actor.get("ActorClassName")), actor.get("State")
        if step is not None and status != "DEAD":  # a pool's finished actors are DEAD: not waiting
            (alive if status == "ALIVE" else waiting).add(step)
    return sorted(waiting - alive)


def _resources_text(resources: dict) -> str:
    """The CPUs, GPUs and stage_<kind> tokens of an actor shape or a cluster: "CPU: 1, GPU: 1, stage_ssr: 0.001"."""
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") or
                     k.startswith("stage_"))


def build_dataset(items: list[dict], specs: list[StepSpec], opts: BatchOptions,
                  stage_classes: dict[str, type] | None = None) -> "ray.data.Dataset":
    """from_items -> map_batches(actor pool) per stage (lazy)."""
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 2000)))
    for spec in specs:
        shape = actor_shape(opts, spec)
        cpus, gpus = shape.get("CPU", 0.0), shape.get("GPU", 0.0)
        kwargs = dict(spec.kwargs)
        if spec.model:
            kwargs["threads"] = max(1, int(cpus))
            if spec.name != "finetune":
                kwargs["gpus"] = gpus
            if spec.kind in CASCADE_KINDS:  # cascade stages record where they ran
                kwargs["placement"] = ray_placement
        lo, hi = _actors(opts, spec)
        if spec.kind == "cascade" and "cascade" not in opts.actors:
            lo = hi = fused_actors(opts, spec, specs, math.ceil(len(items) / opts.batch_size))
        pinned = _pinned(opts, spec) or None
        # Ray Data spreads actors over every node ("SPREAD"): a decode actor on a stage's GPU node took the CPU
        # that stage's actor needed, and the pipeline waited forever (issue 23). Ray's default policy keeps
        # CPU-only work off GPU nodes while other nodes have room.
        scheduling = {} if gpus else {"scheduling_strategy": "DEFAULT"}
        env = worker_env() if spec.model else {}  # Ray Data calls a step on a pool thread (host_memory)
        if env:
            scheduling["runtime_env"] = {"env_vars": env}
        fn = _named((stage_classes or {}).get(spec.name, spec.fn), spec.name)
        with warnings.catch_warnings():
            # Bounded restarts need ray_remote_args (deprecated in 2.60, no named parameter yet); Ray's
            # default of infinite retries would loop forever on a row that kills its worker.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(fn, fn_constructor_kwargs=kwargs,
                                compute=ActorPoolStrategy(min_size=lo, max_size=hi),
                                batch_size=opts.batch_size if spec.model else 1, num_cpus=cpus,
                                num_gpus=gpus or None, resources=pinned, max_restarts=opts.max_restarts,
                                max_task_retries=opts.max_task_retries, **scheduling)
    return ds


def fused_actors(opts: BatchOptions, spec: StepSpec, specs: list[StepSpec], batches: int) -> int:
    """Actors of the fused step, all started up front: as many as the cluster's free resources hold beside one actor
    of every other step, and no more than there are batches. (An autoscaling pool that starts at one actor scales up
    only on a long queue: 8 videos ran one batch after another on one actor, using 0.78 of 2 cores.)"""
    free = ray.available_resources()
    for other in specs:
        if other is not spec:
            for key, amount in actor_shape(opts, other).items():
                free[key] = free.get(key, 0.0) - _actors(opts, other)[0] * amount
    fit = min((math.floor(free.get(key, 0.0) / amount + 1e-9) for key, amount in actor_shape(opts, spec).items()),
              default=batches)  # an actor that asks for nothing fits any number of times
    return max(1, min(fit, batches))


def ray_placement() -> dict[str, str]:
    """The Ray node (id, IP) this actor runs on and the GPU ids Ray assigned it (logical GPUs included)."""
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
            "gpus": ",".join(map(str, ctx.get_accelerator_ids().get("GPU", [])))}


def _step_title(name: str) -> str:
    """A step's class name, which Ray Data names its operator after: "ssr" -> "SsrStep"."""
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part) + "Step"


def _named(cls: type, name: str) -> type:
    """Ray Data names operators after the class: one subclass per stage keeps ds.stats() rows apart."""
    title = _step_title(name)
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
    # Actor pools start side by side (Ray's default, -1): a positive wait started each pool only once the one
    # before it was up, and model loads, several seconds each here and minutes for a large model on GPUs, added
    # up. NodeWatch stops a job whose step cannot get an actor within actor_start_timeout_s instead.
    ctx.wait_for_min_actors_s = -1
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
    layout = resolve_layout(opts, config)
    specs = pipeline_steps(config, opts.model, worker_s3 or None, store, any(r.finetune for r in rows), opts.limits,
                           layout)
    run_id = opts.run_id or new_run_id()
    summary = BatchSummary(run_id, len(items), results=join(results_dir(opts.output_prefix), f"run={run_id}"),
                           stages=tuple(stage.name for stage in config.stages), layout=layout)
    started = init_ray(opts, specs)
    threads_before = set(threading.enumerate())
    try:
        check_fits(opts, specs)
        with _data_context(opts):
            watch = NodeWatch({spec.name: actor_shape(opts, spec) for spec in specs},
                              opts.node_wait_s or opts.actor_start_timeout_s, opts.actor_start_timeout_s)
            _execute(build_dataset(items, specs, opts, stage_classes), items, opts, summary,
                     _ResultsWriter(opts, run_id, tag, s3), watch)
        summary.seconds = time.perf_counter() - start
        _write_summary(opts, summary, s3)
    finally:
        if summary.stopped:
            _join_threads_since(threads_before)
        if started:
            ray.shutdown()
    return summary


def _join_threads_since(before: set[threading.Thread], timeout_s: float = 10.0) -> None:
    """After a stop, let the dataset's prefetch threads see their stopped executor before we leave Ray: left
    running, they call into a shut-down Ray at interpreter exit and print tracebacks over our clear message."""
    deadline = time.monotonic() + timeout_s
    for thread in set(threading.enumerate()) - before:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _stream(ds, watch: NodeWatch | None, stop: threading.Event):
    """The dataset's batches; with a watch, they come through a thread so the driver can check the cluster while
    the stream waits (a step whose node was lost delivers nothing, and Ray waits for a node forever)."""
    if watch is None:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
        return
    out: queue.Queue = queue.Queue(maxsize=4)
    executors = _capture_executor(ds)

    def put(item) -> bool:
        while not stop.is_set():  # the driver may have stopped reading: never block on a full queue
            with contextlib.suppress(queue.Full):
                out.put(item, timeout=0.5)
                return True
        return False

    def produce():
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    break
            put(("end", None))
        except BaseException as exc:  # handed to the driver's thread, which raises it
            put(("error", exc))
        finally:
            getattr(batches, "close", lambda: None)()  # stops the streaming executor when we leave early

    thread = threading.Thread(target=produce, name="dreamix-batch-stream", daemon=True)
    thread.start()
    while True:
        try:
            kind, value = out.get(timeout=watch.period_s)
        except queue.Empty:
            if why := watch.check():
                stop.set()  # the stream's thread then drops what it still gets instead of queueing it
                _stop_executor(executors, thread)
                raise _Unplaceable(why) from None
            continue
        if kind == "batch":
            watch.progress()
            yield value
        elif kind == "error":
            raise value
        else:
            return


class _Unplaceable(Exception):
    pass


def _capture_executor(ds) -> list:
    """The streaming executors `ds` runs on, in the returned list as they are created. Ray Data sets
    ds._current_executor (the same object) only after the first output, so a job stopped before any row came
    out (a step that got no actor, a node lost early) had no executor to shut down: its actors stayed on a
    shared cluster."""
    created: list = []
    create = ds._create_executor

    def create_and_keep():
        created.append(create())
        return created[-1]

    ds._create_executor = create_and_keep
    return created


def _stop_executor(executors: list, thread: threading.Thread, timeout_s: float = 30.0) -> None:
    """Shut the dataset's streaming executor down while Ray is still up, and wait for the stream's thread to see
    it: a batch that cannot come then ends the stream instead of leaving prefetch threads that call into a
    shut-down Ray at exit and print tracebacks over our message. Ray Data's own blocking calls shut their
    `_current_executor` down the same way (Dataset._synchronize_progress_bar); it has no public stop."""
    for executor in executors:
        executor.shutdown(force=True)
    thread.join(timeout_s)


def _execute(ds, items: list[dict], opts: BatchOptions, summary: BatchSummary, writer: _ResultsWriter,
             watch: NodeWatch | None = None) -> None:
    """Consume the stream: count, write results as they come, stop on the error rate or when a step has no node
    to run on (finished rows stay recorded), record lost rows."""
    seen: set[str] = set()
    stop = threading.Event()
    batches = _stream(ds, watch, stop)
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
    except _Unplaceable as exc:
        summary.stopped = str(exc)
    finally:
        stop.set()
        batches.close()
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
    for stage in summary.stages:
        if row.get(f"{stage}_node"):
            where = tuple(row[c] for c in placement_columns(stage)[:4])
            summary.placement.setdefault(stage, Counter())[where] += 1
    if row["status"] == "ok":
        summary.ok += 1
    elif row["status"] == "skipped":
        summary.skipped += 1
    else:
        summary.failed += 1
        summary.errors.append((row["id"], row["prompt"], row["error"]))


def _write_summary(opts: BatchOptions, summary: BatchSummary, s3: S3Settings) -> None:
    data = dict(run=summary.run_id, total=summary.total, ok=summary.ok, failed=summary.failed,
                skipped=summary.skipped, seconds=round(summary.seconds, 3), layout=summary.layout,
                videos_per_minute=round(summary.videos_per_minute, 3), stopped=summary.stopped,
                manifest=opts.manifest, model=opts.model or "embedded")
    write_bytes(join(summary.results, "summary.json"), json.dumps(data, indent=2).encode(), s3)
