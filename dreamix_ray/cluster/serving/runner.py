"""Runs jobs through the stage deployments, heartbeats them, and takes over jobs whose runner died.

Delivery is at-least-once: a job whose heartbeat stops is rerun by any ingress replica from its
last stored unit. That is safe because every unit is deterministic (per-request seeds) and
writes whole files, so a unit run twice writes the same bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

from ray.serve import metrics

from ...config import CascadeConfig
from ...request import EditPlan, resolve
from .jobs import CANCEL_FILE, FINAL, JobStore
from .params import edit_request
from .settings import ServeSettings

log = logging.getLogger("ray.serve")


class JobFailed(Exception):
    """The job cannot finish; the message is for the user."""


def job_plan(job: dict, cascade: CascadeConfig) -> EditPlan:
    """The plan resolved when the job was accepted (a job stored before plans were kept is resolved now, by
    the same rule)."""
    params = job["params"]
    if "edit" in params:
        return EditPlan.from_dict(params["edit"], cascade)
    return resolve(edit_request(job["kind"], params), cascade)


def plan_units(plan: EditPlan) -> list[dict]:
    """The job's work as store-to-store units: prepare, each stage (the last one per chunk), encode."""
    units = [dict(label="prepare", stage=0, method="prepare", output="x0.npy", weight=1)]
    source, last = "x0.npy", len(plan.stages) - 1
    for stage in plan.stages:
        base = dict(label=stage.name, stage=stage.index, method="denoise", source=source,
                    to_frames=stage.index == last, weight=max(1, stage.sampled_steps))
        if stage.index == last:
            for k in range(len(stage.chunks)):  # each chunk's input, with its halo of context frames
                units.append(dict(base, output=f"{stage.name}-c{k}.npy", frames=stage.chunk_input(k), chunk=k))
        else:
            units.append(dict(base, output=f"{stage.name}.npy"))
            source = units[-1]["output"]
    finals = [u["output"] for u in units if u.get("to_frames")]
    units.append(dict(label="encode", stage=last, method="finish", sources=finals, output="output.mp4", weight=1))
    return units


class _Run:
    """One attempt at one job: in-memory state, throttled writes of job.json, the heartbeat."""

    def __init__(self, runner: "JobRunner", job: dict):
        self.runner, self.job = runner, job
        self.lock = asyncio.Lock()
        self.done: dict[str, float] = {}  # unit output -> finished weight
        self.weights: dict[str, float] = {}
        self.results: dict[str, dict] = {}
        self.last_write = 0.0

    def progress(self, unit: dict, done: int, total: int, running: bool = True) -> None:
        self.done[unit["output"]] = unit["weight"] * min(1.0, done / max(total, 1))
        if running:
            self.job["stage"] = unit["label"]
        # Monotonic: a unit retried on a fresh replica restarts its steps, the bar should not jump back.
        share = sum(self.done.values()) / max(sum(self.weights.values()), 1)
        self.job["progress"] = round(max(self.job["progress"], min(0.99, share)), 4)

    async def write(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_write < 1.0:
            return
        async with self.lock:
            self.last_write = time.monotonic()
            self.job["heartbeat"] = time.time()
            saving = asyncio.ensure_future(asyncio.to_thread(self.runner.jobs.save, self.job))
            try:
                await asyncio.shield(saving)
            except asyncio.CancelledError:
                await saving  # hold the lock until the thread has written: a later final write must land last
                raise

    async def heartbeat(self, task: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(self.runner.settings.heartbeat_s)
            try:
                stored = await asyncio.to_thread(self.runner.jobs.load, self.job["id"])
                if stored and (stored["runner"], stored["attempts"]) != (self.job["runner"], self.job["attempts"]):
                    log.warning("job %s was taken over by %s; stopping here", self.job["id"], stored["runner"])
                    task.cancel(msg="superseded")
                    return
                if await asyncio.to_thread(self.runner.jobs.cancelled, self.job["id"]):  # by a call to any replica
                    self.runner.cancelling.add(self.job["id"])
                    task.cancel(msg="cancelled")
                    return
                await self.write(force=True)
            except Exception as exc:  # a store hiccup must not end the heartbeat (another replica would take over)
                log.warning("job %s: heartbeat write failed (%s); retrying", self.job["id"], exc)


class JobRunner:
    """The ingress replica's job engine: runs what it accepts, and orphans it finds in the store."""

    def __init__(self, jobs: JobStore, settings: ServeSettings, cascade: CascadeConfig, handles: list,
                 finetuner, replica: str):
        self.jobs, self.settings, self.cascade = jobs, settings, cascade
        self.handles, self.finetuner, self.replica = handles, finetuner, replica
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, dict] = {}  # job id -> the record its running task updates
        self.cancelling: set[str] = set()  # jobs whose task is stopped because their owner cancelled them
        self.finished = metrics.Counter("dreamix_jobs_finished", "Jobs that reached done or failed.",
                                        tag_keys=("kind", "status"))
        self.seconds = metrics.Histogram("dreamix_job_seconds", "Wall seconds from accepted to finished.",
                                         boundaries=[1, 5, 15, 60, 300, 900, 3600], tag_keys=("kind",))

    def start(self, job: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job))
        self.tasks[job["id"]] = task
        self.live[job["id"]] = job
        task.add_done_callback(lambda _t, job_id=job["id"]: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        self.live.pop(job_id, None)
        self.cancelling.discard(job_id)

    async def cancel(self, job_id: str) -> dict | None:
        """Stop a job this replica runs, once its record says cancelled; None if it does not run here."""
        task = self.tasks.get(job_id)
        if task is None:
            return None
        job = self.live[job_id]
        await asyncio.to_thread(self.jobs.put, job_id, CANCEL_FILE, b"")  # as JobStore.cancel: any runner sees it
        self.cancelling.add(job_id)
        task.cancel(msg="cancelled")
        await asyncio.wait({task})
        return job

    def running(self, job_id: str) -> dict | None:
        """The freshest state of a job this replica runs (other replicas read it from the store)."""
        job = self.live.get(job_id)
        return dict(job, timings=dict(job["timings"]), result=dict(job["result"])) if job else None

    async def _run(self, job: dict) -> None:
        now = time.time()
        job.update(status="running", stage="starting", runner=self.replica, attempts=job["attempts"] + 1, error=None,
                   started_at=job["started_at"] or now)
        run, beat = _Run(self, job), None
        try:
            await run.write(force=True)
            beat = asyncio.create_task(run.heartbeat(asyncio.current_task()))
            await self._execute(run)
            await self._finish(run, "done")
        except JobFailed as exc:
            await self._finish(run, "failed", str(exc))
        except asyncio.CancelledError:
            if job["id"] in self.cancelling:
                await self._finish(run, "cancelled", "cancelled by the caller")
            else:  # superseded, or this replica is going away: the job stays active for another replica
                log.warning("job %s stopped on %s; it stays in the store for another replica", job["id"], self.replica)
        except Exception:
            log.exception("job %s failed", job["id"])
            await self._finish(run, "failed", f"internal error while running job {job['id']}; the operator's "
                                              "logs have the details; resubmit it")
        finally:
            if beat is not None:
                beat.cancel()

    async def _finish(self, run: _Run, status: str, error: str | None = None) -> None:
        job = run.job
        job.update(status=status, error=error, finished_at=time.time())
        if status == "done":
            job.update(stage="done", progress=1.0)
        elif status == "cancelled":
            job["stage"] = "cancelled"
        job["timings"]["total_s"] = round(job["finished_at"] - job["created_at"], 3)
        await run.write(force=True)
        await asyncio.to_thread(self.jobs.deactivate, job["owner"], job["id"])
        self.finished.inc(tags={"kind": job["kind"], "status": status})
        self.seconds.observe(job["timings"]["total_s"], tags={"kind": job["kind"]})

    async def _execute(self, run: _Run) -> None:
        job, params = run.job, run.job["params"]
        if job["kind"] in ("finetune", "subject"):
            unit = dict(label="finetune", output="finetune", weight=1)
            run.weights["finetune"] = 1
            spec = dict(job_id=job["id"], inputs=job["inputs"], params=params, edit={}, preset=params.get("preset"),
                        steps=params.get("steps"), token=params.get("token"))
            job["result"].update(await self._call(run, self.finetuner, job["kind"], spec, unit))
            return
        if params.get("finetune_preset") and not job["result"].get("finetune_id"):
            unit = dict(label="finetune", output="finetune", weight=params.get("finetune_weight") or 1)
            run.weights["finetune"] = unit["weight"]
            spec = dict(job_id=job["id"], inputs=job["inputs"], params=params, edit={},
                        preset=params["finetune_preset"])
            job["result"].update(await self._call(run, self.finetuner, "finetune", spec, unit))
            await run.write(force=True)  # the artifact id is durable before the edit starts
        # The stage deployment names the artifact's token in the prompt (FinetunedCascades), as batch does.
        finetune_id = params.get("finetune_id") or job["result"].get("finetune_id")
        plan = job_plan(job, self.cascade)
        spec = dict(job_id=job["id"], inputs=job["inputs"], params=params, prompt=params["prompt"],
                    finetune_id=finetune_id, edit=plan.to_dict())
        units = plan_units(plan)
        run.weights.update({u["output"]: u["weight"] for u in units})
        # Units of one label are the last SSR's chunks: independent, so they spread over its replicas.
        for _label, group in itertools.groupby(units, key=lambda u: u["label"]):
            await asyncio.gather(*(self._unit(run, spec, u) for u in group))
        job["result"].update(run.results["output.mp4"])

    async def _unit(self, run: _Run, spec: dict, unit: dict) -> None:
        exists = await asyncio.to_thread(self.jobs.has, run.job["id"], unit["output"])
        if exists and unit["method"] != "finish":  # stored by an earlier attempt: resume after it
            run.progress(unit, 1, 1, running=False)
            return
        keys = ("source", "output", "frames", "chunk", "to_frames", "sources")
        call = dict(spec, **{k: unit[k] for k in keys if k in unit})
        run.results[unit["output"]] = await self._call(run, self.handles[unit["stage"]], unit["method"], call, unit)

    async def _call(self, run: _Run, handle, method: str, spec: dict, unit: dict) -> dict:
        """One streaming call, retried on another replica if the one serving it dies."""
        retries = self.settings.unit_retries
        for attempt in range(retries + 1):
            try:
                result, events = None, getattr(handle.options(stream=True), method).remote(spec)
                try:
                    async for event in events:
                        if "error" in event:
                            raise JobFailed(event["error"])
                        if "result" in event:
                            result = event["result"]
                        else:
                            run.progress(unit, event["done"], event["total"])
                            await run.write()
                except asyncio.CancelledError:
                    events.cancel()  # the stage replica stops this call too (a cancelled job frees its worker)
                    raise
                if result is None:
                    raise RuntimeError(f"{method} returned no result")
                timings = run.job["timings"]
                timings[unit["label"]] = round(timings.get(unit["label"], 0.0) + result.pop("seconds", 0.0), 3)
                node = result.pop("node", None)
                nodes = run.job.setdefault("placement", {}).setdefault(unit["label"], [])
                if node and node not in nodes:  # the last SSR's chunks may spread over replicas
                    nodes.append(node)
                run.progress(unit, 1, 1)
                await run.write()
                return result
            except (JobFailed, asyncio.CancelledError):
                raise
            except Exception as exc:  # a replica died or a bug: retried, then reported without a traceback
                log.warning("job %s: %s attempt %d failed: %r", run.job["id"], unit["label"], attempt + 1, exc)
                if attempt == retries:
                    raise JobFailed(f"the {unit['label']} stage failed {retries + 1} times "
                                    f"({type(exc).__name__}); resubmit the job") from None
                await asyncio.sleep(1.0 + attempt + random.random())
        raise AssertionError("unreachable")

    async def recover_forever(self) -> None:
        """Take over jobs whose heartbeat stopped (their replica died), forever."""
        await asyncio.sleep(random.random() * self.settings.recover_every_s)  # replicas should not scan in step
        while True:
            try:
                await self.recover_once()
            except Exception:
                log.warning("recovery pass failed; retrying later", exc_info=True)
            await asyncio.sleep(self.settings.recover_every_s)

    async def recover_once(self) -> list[str]:
        taken, lease = [], self.settings.lease_s
        for owner, job_id, mtime in await asyncio.to_thread(self.jobs.active):
            if job_id in self.tasks:
                continue
            try:
                job, now = await asyncio.to_thread(self.jobs.load, job_id), time.time()
            except OSError as exc:  # one unreadable record must not stop the pass over the others
                log.warning("recovery: cannot read job %s (%s)", job_id, exc)
                continue
            if job is None:
                if now - mtime > lease:  # marker of a submit that died before its job.json was written
                    await asyncio.to_thread(self.jobs.deactivate, owner, job_id)
                continue
            if job["status"] in FINAL:
                await asyncio.to_thread(self.jobs.deactivate, owner, job_id)
                continue
            if now - job["heartbeat"] < lease:
                continue
            if job["attempts"] >= self.settings.max_attempts:
                job.update(status="failed", finished_at=now,
                           error=f"the job was interrupted {job['attempts']} times (replicas lost); resubmit it")
                await asyncio.to_thread(self.jobs.save, job)
                await asyncio.to_thread(self.jobs.deactivate, owner, job_id)
                self.finished.inc(tags={"kind": job["kind"], "status": "failed"})
                continue
            log.warning("taking over job %s (last heartbeat %.0f s ago)", job_id, now - job["heartbeat"])
            self.start(job)
            taken.append(job_id)
        return taken
