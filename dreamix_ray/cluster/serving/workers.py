"""Stage and finetune deployments: each loads the cascade once and moves data through the store.

A call names its job and the store files it reads and writes, so only small dicts travel
through DeploymentHandles and every finished unit survives any replica's death. Calls are
async generators: progress events first, then one `result` (or `error` for a user's mistake).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np
import ray
import torch
from ray import serve

from ...animate import clip_shape, image_to_video
from ...degrade import downsample_to_stage, tensor_to_frames
from ...devices import resolve_device
from ...edit import StageRun, blank_input, run_stage
from ...errors import UserError
from ...finetune import finetune_or_load, finetune_preset, finetuned_stage_names
from ...finetuned_cache import FinetunedCascades
from ...models.cascade import Cascade
from ...request import EditPlan
from ...storage import ArtifactStore
from ...subject import finetune_subject
from ...video import Video, VideoError, probe_video, read_image, read_video, write_preview, write_video
from .jobs import JobStore
from .proxy import bind_replica_grpc_to_loopback
from .settings import ServeSettings

log = logging.getLogger("ray.serve")
Report = Callable[[int, int], None]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class Stopped(Exception):
    """The caller went away (a cancelled job): the work thread ends at its next progress report."""


async def stream_work(fn: Callable[[Report], dict], min_interval_s: float = 0.25) -> AsyncIterator[dict]:
    """Run blocking `fn(report)` in a thread; yield its throttled progress, then its result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    last, stop = [0.0], threading.Event()

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise Stopped()
        now = time.monotonic()
        if done >= total or now - last[0] >= min_interval_s:
            last[0] = now
            loop.call_soon_threadsafe(queue.put_nowait, {"done": int(done), "total": int(total)})

    start = time.perf_counter()
    future = loop.run_in_executor(None, fn, report)
    try:
        while not future.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({future, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
    finally:
        if not future.done():  # cancelled or closed early: free this replica's device for the next call
            stop.set()
            future.add_done_callback(lambda f: f.exception())
    try:
        result = future.result()
    except (UserError, VideoError) as exc:
        # The user's mistake (bad video, unknown preset): reported, not retried on another replica.
        yield {"error": str(exc)}
        return
    yield {"result": {**result, "seconds": time.perf_counter() - start}}


def on_node(replica: "_Replica", work: Callable[[Report], dict]) -> Callable[[Report], dict]:
    """`work` whose result names the Ray node it ran on (the job's placement)."""
    return lambda report: {**work(report), "node": replica.node}


class _Replica:
    """What every worker shares: settings, the cascade, the store, torch threads."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_args(settings)
        bind_replica_grpc_to_loopback()
        self.node = ray.get_runtime_context().get_node_id()  # a job records where each of its units ran
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        threads = self.settings.torch_threads or max(1, int(cpus))
        torch.set_num_threads(threads)  # several replicas share a node: never oversubscribe its cores
        # a replica with num_gpus sees its GPU (Ray sets CUDA_VISIBLE_DEVICES); otherwise the CPU
        self.cascade = Cascade.from_pretrained(self.settings.model_dir).to(resolve_device("auto"))
        self.store = ArtifactStore(self.settings.store_root)
        self.jobs = JobStore(self.store)
        self.models = FinetunedCascades(lambda: self.cascade, self.store)  # the batch steps' cache, too

    def input_file(self, job_id: str, name: str, folder: str) -> Path:
        path = Path(folder, name)
        path.write_bytes(self.jobs.get(job_id, name))
        return path

    def source_video(self, spec: dict) -> Video | None:
        """The job's input as the video Dreamix edits: the clip covering the base stage, or an image's path."""
        if not spec.get("inputs"):
            return None  # generation: no input video
        limits, base = self.settings.limits, self.cascade.base.config
        with tempfile.TemporaryDirectory(prefix="dreamix-in-") as tmp:
            entry = spec["inputs"][0]
            path = self.input_file(spec["job_id"], entry["name"], tmp)
            if entry["media"] == "image":
                frames, fps = self.output_clip()
                return image_to_video(read_image(path), spec["params"].get("camera", "static"), frames, fps)
            fps = probe_video(path, limits)["fps"] or base.fps
            frames = spec["edit"].get("num_frames") or base.frames
            # Decode only what the base clip covers: a 60 s upload costs 2 s of decoding, not 60.
            return read_video(path, limits, max_frames=math.ceil(fps * frames / base.fps) + 1)

    def output_clip(self) -> tuple[int, float]:
        return clip_shape(self.cascade)


@serve.deployment(max_ongoing_requests=1)
class StageDeployment(_Replica):
    """One cascade stage (base, TSR or SSR); also decodes inputs (prepare) and encodes outputs (finish)."""

    def __init__(self, settings: dict, index: int):
        super().__init__(settings)
        self.index = index

    async def prepare(self, spec: dict) -> AsyncIterator[dict]:
        """Decode the input and downsample it to the base stage: x0 [1, 3, F, H, W]."""

        def work(report: Report) -> dict:
            plan = EditPlan.from_dict(spec["edit"], self.cascade.config)
            video = self.source_video(spec)
            if video is None:
                x0 = blank_input(plan, self.cascade)
            else:
                x0 = downsample_to_stage(video, self.cascade.base.config, plan.config.num_frames, plan.config.fit)
            self.jobs.put(spec["job_id"], spec["output"], npy_bytes(x0.numpy()))
            report(1, 1)
            return {"output": spec["output"]}

        async for event in stream_work(on_node(self, work)):
            yield event

    async def denoise(self, spec: dict) -> AsyncIterator[dict]:
        """This stage on the previous output (or one frame chunk of it), from the store to the store."""

        def work(report: Report) -> dict:
            cascade, prompt_of = self.models.get(spec.get("finetune_id"))
            plan = EditPlan.from_dict(spec["edit"], self.cascade.config)
            x = torch.from_numpy(npy_load(self.jobs.get(spec["job_id"], spec["source"])))
            run = StageRun.of(cascade, plan, [prompt_of(spec["prompt"])], [plan.config.seed],
                              on_step=lambda _stage, done, total: report(done, total))
            lo, hi = spec.get("frames") or (0, x.shape[2])
            out = run_stage(run, self.index, x[:, :, lo:hi], spec.get("chunk", 0))
            # The final stage's output is stored as uint8 frames: 4x smaller than float and what finish needs.
            array = tensor_to_frames(out) if spec.get("to_frames") else out.numpy()
            self.jobs.put(spec["job_id"], spec["output"], npy_bytes(array))
            return {"output": spec["output"], "shape": list(array.shape)}

        async for event in stream_work(on_node(self, work)):
            yield event

    async def finish(self, spec: dict) -> AsyncIterator[dict]:
        """Join the final chunks, write the mp4 and (with an input) the side-by-side preview."""

        def work(report: Report) -> dict:
            parts = [npy_load(self.jobs.get(spec["job_id"], name)) for name in spec["sources"]]
            edited = Video(np.concatenate(parts, axis=1)[0], self.cascade.stages[-1].config.fps)
            result = {"video": "output.mp4", "frames": edited.num_frames, "width": edited.width,
                      "height": edited.height, "fps": edited.fps}
            with tempfile.TemporaryDirectory(prefix="dreamix-out-") as tmp:
                write_video(Path(tmp, "output.mp4"), edited)
                self.jobs.put(spec["job_id"], "output.mp4", Path(tmp, "output.mp4").read_bytes())
                original = self.source_video(spec)
                if original is not None:
                    mp4, png = write_preview(original, edited, Path(tmp, "preview.mp4"),
                                             prompt=spec.get("prompt"))
                    self.jobs.put(spec["job_id"], "preview.mp4", mp4.read_bytes())
                    self.jobs.put(spec["job_id"], "preview.png", png.read_bytes())
                    result.update(preview="preview.mp4", preview_png="preview.png")
            report(1, 1)
            return result

        async for event in stream_work(on_node(self, work)):
            yield event


@serve.deployment(max_ongoing_requests=1)
class FinetuneDeployment(_Replica):
    """Mixed video-image finetuning (paper Sec. 4.2) and subject learning, stored as artifacts."""

    async def finetune(self, spec: dict) -> AsyncIterator[dict]:
        """Finetune on the job's video (or reuse the artifact for the same bytes and config)."""

        def work(report: Report) -> dict:
            cfg = finetune_preset(spec["preset"], steps=spec.get("steps"), token=spec.get("token"))
            names = finetuned_stage_names(self.cascade, cfg)
            total = cfg.steps * len(names)
            on_step = lambda stage, step, _n, _loss: report(names.index(stage) * cfg.steps + step, total)  # noqa
            source = self.source_video(spec)
            data = self.jobs.get(spec["job_id"], spec["inputs"][0]["name"])
            _, key = finetune_or_load(source, cfg, self.cascade, self.store, source_bytes=data, on_step=on_step)
            report(total, total)
            return {"finetune_id": key, "token": cfg.token}

        async for event in stream_work(on_node(self, work)):
            yield event

    async def subject(self, spec: dict) -> AsyncIterator[dict]:
        """Frame-only finetuning on a few images of one subject (paper Sec. 5)."""

        def work(report: Report) -> dict:
            cfg = finetune_preset("frames", steps=spec.get("steps"), token=spec["token"])
            with tempfile.TemporaryDirectory(prefix="dreamix-subject-") as tmp:
                for entry in spec["inputs"]:
                    self.input_file(spec["job_id"], entry["name"], tmp)
                key = finetune_subject(tmp, cfg.token, self.cascade, self.store, cfg=cfg)
            report(1, 1)
            return {"finetune_id": key, "token": cfg.token}

        async for event in stream_work(on_node(self, work)):
            yield event
