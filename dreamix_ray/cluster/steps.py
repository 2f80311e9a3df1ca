"""The batch pipeline's steps as plain callables on column batches; they run without Ray (batch.py wires them)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import shutil
import socket
import tempfile
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pyarrow import fs as pafs

from ..config import CascadeConfig, EditConfig
from ..degrade import downsample_to_stage
from ..edit import StageRun, Timings, run_cascade, run_stage
from ..errors import UserError
from ..finetune import finetune_or_load, finetune_preset
from ..finetuned_cache import FinetunedCascades
from ..models.cascade import CASCADE_FILE, EMBEDDED_DIR, CascadeError, load_base_vae, load_cascade
from ..models.embedded import embedded_config
from ..quiet import quiet_libraries
from ..request import EditPlan
from ..storage import ArtifactStore, S3Settings, exists, filesystem, is_s3, join, read_bytes, write_bytes
from ..video import Video, VideoError, VideoLimits, read_video, write_preview, write_video

TENSOR_COLUMNS = ("x", "frames")
INT_COLUMNS = ("row", "prompt_index")


def empty_x() -> np.ndarray:
    """Placeholder for rows with no tensor (skipped, failed): same rank, zero frames, so Arrow keeps one type."""
    return np.zeros((3, 0, 0, 0), np.float32)


def empty_frames() -> np.ndarray:
    return np.zeros((0, 0, 0, 3), np.uint8)


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


def to_rows(batch: dict) -> list[dict]:
    """Column batch (dict of arrays) -> list of row dicts with plain Python scalars."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: _py(v[i]) for k, v in batch.items()} for i in range(n)]


def _column(name: str, values: list) -> np.ndarray:
    if name in TENSOR_COLUMNS:
        if values and all(v.shape == values[0].shape for v in values):
            return np.stack(values)
        out = np.empty(len(values), dtype=object)  # ragged: Ray Data stores it as a variable-shaped tensor
        for i, v in enumerate(values):
            out[i] = v
        return out
    if name in INT_COLUMNS:
        return np.asarray(values, dtype=np.int64)
    if name.startswith("t_") or name.endswith("_at"):
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values, dtype=object)


def to_batch(rows: list[dict], columns: list[str]) -> dict[str, np.ndarray]:
    return {c: _column(c, [r[c] for r in rows]) for c in columns}


def describe(exc: BaseException) -> str:
    """One line for a row's `error`: the message for user errors, the type too for anything else."""
    text = " ".join(str(exc).split())  # results hold one line per row
    return text if isinstance(exc, (UserError, VideoError)) else f"{type(exc).__name__}: {text}"


def _s3(settings: dict | None) -> S3Settings | None:
    return S3Settings(**settings) if settings else None


# ---------------------------------------------------------------- models and videos


def model_dir(model: str | None, s3: S3Settings | None = None) -> str | None:
    """A local cascade directory: s3:// models are downloaded once per machine into the temp dir."""
    if model is None or not is_s3(model):
        return model
    cache = Path(tempfile.gettempdir(), "dreamix-models", hashlib.sha256(model.encode()).hexdigest()[:16])
    if not (cache / "cascade.json").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        ArtifactStore(posixpath.dirname(model.rstrip("/")), s3).get_dir(posixpath.basename(model.rstrip("/")), tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another actor on this machine finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def cascade_config(model: str | None, s3: S3Settings | None = None) -> CascadeConfig:
    """The stage list, read from cascade.json alone (no weights): what the driver and decoders need."""
    if model is None:
        if not (EMBEDDED_DIR / CASCADE_FILE).is_file():
            return embedded_config({"kind": "minilm"})
        model = str(EMBEDDED_DIR)
    try:
        text = read_bytes(join(model, CASCADE_FILE), s3)
    except UserError:
        raise CascadeError(f"{model} is not a cascade directory (no {CASCADE_FILE}); give --model a directory "
                           "written by Cascade.save_pretrained") from None
    return CascadeConfig.from_dict(json.loads(text))


def model_tag(model: str | None, s3: S3Settings | None = None) -> str:
    """Fingerprint of the model (config, and every file's size and time) for output keys and results."""
    config = cascade_config(model, s3)
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    root = model or (str(EMBEDDED_DIR) if (EMBEDDED_DIR / CASCADE_FILE).is_file() else None)
    if root is None:
        return f"{config.name}-untrained"
    fs, path = filesystem(root, s3)
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path):
        h.update(f"{info.path[len(path):]}:{info.size}:{info.mtime_ns}".encode())
    return f"{config.name}-{h.hexdigest()[:12]}"


def load_video(uri: str, s3: S3Settings | None, limits: dict | None = None, with_bytes: bool = False):
    """(Video, file bytes or None) for a local path or an s3:// object; the bytes key finetuned artifacts."""
    lim = VideoLimits.from_dict(limits or {})
    if not is_s3(uri):
        video = read_video(uri, lim)
        return video, (Path(uri).read_bytes() if with_bytes and Path(uri).is_file() else None)
    data = read_bytes(uri, s3)
    if len(data) > lim.max_bytes:
        raise UserError(f"{uri} is {len(data) / 1e6:.1f} MB, over the {lim.max_bytes / 1e6:.0f} MB limit")
    suffix = posixpath.splitext(uri)[1][:8]
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        return read_video(f.name, lim), data


def _load_cascade(model: str | None, s3: S3Settings | None):
    """load_cascade without the libraries' per-load progress bars, which flood every actor's log."""
    quiet_libraries()
    return load_cascade(model_dir(model, s3))


class _Lru(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def finetune_config(spec: str):
    """A manifest's finetune value: a preset name or a JSON object of fields ("preset" picks the recipe)."""
    if not spec.startswith("{"):
        return finetune_preset(spec)
    fields = json.loads(spec)
    if not isinstance(fields, dict):
        raise UserError(f"finetune must be a preset name or a JSON object, got {spec!r:.60}")
    try:
        return finetune_preset(str(fields.pop("preset", "mixed")), **fields)
    except TypeError as exc:
        raise UserError(f"finetune {spec!r:.80}: {exc}") from None


def local_placement() -> dict[str, str]:
    """Where this process runs, without Ray (run_in_process); batch.py passes Ray's node id and IP instead."""
    return {"node": socket.gethostname(), "ip": "", "gpus": ""}


def placement_columns(stage: str) -> tuple[str, ...]:
    """A cascade stage's placement columns in the results: node id, node IP, accelerator, Ray's GPU ids, times."""
    return tuple(f"{stage}_{c}" for c in ("node", "ip", "device", "gpus", "started_at", "ended_at"))


# ---------------------------------------------------------------- steps


class Decode:
    """Skip rows whose output exists, read each video, downsample it to the base stage (paper Sec. 4.1)."""

    def __init__(self, model: str | None = None, s3: dict | None = None, limits: dict | None = None):
        self.s3, self.limits = _s3(s3), limits
        self.base = cascade_config(model, self.s3).stages[0]
        self.cache = _Lru(4)  # a row's prompts arrive together: decode its video once

    def _x0(self, uri: str, cfg: EditConfig) -> np.ndarray:
        video = load_video(uri, self.s3, self.limits)[0]
        return downsample_to_stage(video, self.base, cfg.num_frames, cfg.fit)[0].numpy()

    def __call__(self, batch: dict) -> dict:
        rows = to_rows(batch)
        for r in rows:
            r.update(x=empty_x(), t_decode=0.0, decoded_at=math.nan)
            if r["status"] != "pending":
                continue
            start = time.perf_counter()
            try:
                if exists(r["output"], self.s3):
                    r["status"] = "skipped"
                    continue
                cfg = EditConfig.from_dict(json.loads(r["cfg"]))
                r["x"] = self.cache.get_or((r["video"], cfg.num_frames, cfg.fit), lambda: self._x0(r["video"], cfg))
            except Exception as exc:  # one bad row must not stop the job: record it and go on
                r["status"], r["error"] = "error", describe(exc)
            r["t_decode"], r["decoded_at"] = time.perf_counter() - start, time.time()
        return to_batch(rows, list(rows[0]) if rows else list(batch) + ["x", "t_decode", "decoded_at"])


class Degrade:
    """The degrade of a latent base (paper Sec. 4.1) as a step of its own: each row's downsampled input into the
    base's VAE latents, which the base step noises at the row's strength and samples from. It holds the base's
    VAE alone, so it can have a GPU of its own; a pixel base needs no encoding and the pipeline has no such step.
    Encoding is per row (the VAEs encode one clip at a time), so results stay the in-process edit's."""

    def __init__(self, model: str | None = None, s3: dict | None = None, threads: int = 1, gpus: float = 0):
        torch.set_num_threads(max(1, threads))
        quiet_libraries()
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.vae = load_base_vae(model_dir(model, _s3(s3)), device)
        self.cache = _Lru(4)  # a row's prompts arrive together: encode its input once

    def _encode(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.vae.encode(torch.from_numpy(x)[None])[0].float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        rows = to_rows(batch)
        for r in rows:
            r["t_degrade"] = 0.0
            if r["status"] != "pending":
                continue
            start = time.perf_counter()
            try:
                cfg = json.loads(r["cfg"])
                key = (r["video"], cfg.get("num_frames"), cfg.get("fit"))
                r["x"] = self.cache.get_or(key, lambda: self._encode(r["x"]))
            except Exception as exc:
                r["status"], r["error"] = "error", describe(exc)
            r["t_degrade"] = time.perf_counter() - start
        return to_batch(rows, list(rows[0]) if rows else list(batch) + ["t_degrade"])


class Finetune:
    """Finetune on each row's video (or load the stored artifact) once per (video, preset) (paper Sec. 4.2)."""

    def __init__(self, model: str | None = None, s3: dict | None = None, store: str | None = None,
                 threads: int = 1, limits: dict | None = None):
        torch.set_num_threads(max(1, threads))
        self.model, self.s3, self.limits = model, _s3(s3), limits
        self.store = ArtifactStore(store, self.s3)
        self.cascade = None
        self.done: dict[tuple[str, str], tuple[str, str]] = {}

    def _artifact(self, video_uri: str, spec: str) -> str:
        cfg = finetune_config(spec)
        if self.cascade is None:
            self.cascade = _load_cascade(self.model, self.s3)
        video, data = load_video(video_uri, self.s3, self.limits, with_bytes=True)
        return finetune_or_load(video, cfg, self.cascade, self.store, source_bytes=data)[1]

    def __call__(self, batch: dict) -> dict:
        rows = to_rows(batch)
        for r in rows:
            r["t_finetune"] = 0.0
            if r["status"] != "pending" or not r["finetune"]:
                continue
            key, start = (r["video"], r["finetune"]), time.perf_counter()
            if key not in self.done:
                try:
                    self.done[key] = ("ok", self._artifact(*key))
                except Exception as exc:
                    self.done[key] = ("error", describe(exc))
            kind, value = self.done[key]
            if kind == "ok":
                r["artifact"] = value
            else:
                r["status"], r["error"] = "error", f"finetuning failed: {value}"
            r["t_finetune"] = time.perf_counter() - start
        return to_batch(rows, list(rows[0]) if rows else list(batch) + ["t_finetune"])


class CascadeStep:
    """The step of cascade stage `index` on a batch; rows sharing model, settings, chunk and shape run as one tensor batch.

    Seeds stay per row (generators from (seed, stage, chunk)), so results do not depend on the batching.
    """

    def __init__(self, index: int, model: str | None = None, s3: dict | None = None, store: str | None = None,
                 threads: int = 1, gpus: float = 0, to_frames: bool = False, encoded: bool = False,
                 placement: Callable[[], dict[str, str]] = local_placement):
        torch.set_num_threads(max(1, threads))
        self.index, self.to_frames = index, to_frames
        self.encoded = encoded  # the base's rows come from the degrade step, already in its latents
        s3_settings = _s3(s3)
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        # what the results record per row: on a logical GPU (Ray's accounting, no CUDA) the stage runs on "cpu"
        self.where = dict(placement(), device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        # noise still comes from CPU generators: the same rows on any device
        self.models = FinetunedCascades(lambda: _load_cascade(model, s3_settings).to(device),
                                        ArtifactStore(store, s3_settings))
        self.config = cascade_config(model, s3_settings)
        # the stages this step runs: its own, and to frames every later one too (all of them, fused)
        self.names = [stage.name for stage in self.config.stages[index:]] if to_frames else \
            [self.config.stages[index].name]

    def _run(self, rows: list[dict], artifact: str, cfg_json: str, timings: Timings):
        cascade, prompt_of = self.models.get(artifact)
        plan = EditPlan.from_dict(json.loads(cfg_json), self.config)
        run = StageRun.of(cascade, plan, [prompt_of(r["prompt"]) for r in rows],
                          [json.loads(r["cfg"])["seed"] for r in rows], timings=timings)
        x = torch.from_numpy(np.stack([r["x"] for r in rows]))
        with torch.inference_mode():
            if self.to_frames:  # the last stage: chunk by chunk into the uint8 output, as edit() (App. A.1)
                return list(run_cascade(run, x, first=self.index, encoded=self.encoded))
            return list(run_stage(run, self.index, x, encoded=self.encoded).float().cpu().numpy())

    def __call__(self, batch: dict) -> dict:
        rows = to_rows(batch)
        groups = defaultdict(list)
        for r in rows:
            for name in self.names:
                r.setdefault(f"t_{name}", 0.0)
                r.update(dict.fromkeys(placement_columns(name)[:4], ""))
                r.update(dict.fromkeys(placement_columns(name)[4:], math.nan))
            if r["status"] == "pending":
                setting = json.dumps({**json.loads(r["cfg"]), "seed": 0}, sort_keys=True)
                groups[(r["artifact"], setting, r["x"].shape)].append(r)
        for (artifact, setting, _), group in groups.items():
            start, began, timings = time.perf_counter(), time.time(), Timings()
            try:
                for r, out in zip(group, self._run(group, artifact, setting, timings)):
                    r["frames" if self.to_frames else "x"] = out
            except Exception as exc:
                for r in group:
                    r["status"], r["error"] = "error", describe(exc)
            self._record(group, began, time.perf_counter() - start, timings)
        if self.to_frames:
            for r in rows:
                r.setdefault("frames", empty_frames())
                r.pop("x", None)
        columns = list(rows[0]) if rows else [c for c in batch if c != "x" or not self.to_frames] + [
            c for name in self.names for c in (f"t_{name}", *placement_columns(name))]
        return to_batch(rows, columns)

    def _record(self, group: list[dict], began: float, wall_s: float, timings: Timings) -> None:
        """Each stage's share of a batched call's wall time per row, where it ran and when. Fused, a stage's time
        is its own (edit.Timings); the last stage also takes what lies between stages (chunk assembly)."""
        seconds = [timings.stage_s.get(name, 0.0) for name in self.names[:-1]]
        seconds.append(max(0.0, wall_s - sum(seconds)))
        at = began
        for name, secs in zip(self.names, seconds):
            node, ip, device, gpus, started, ended = placement_columns(name)
            for r in group:
                r[f"t_{name}"] += secs / len(group)
                r.update({node: self.where["node"], ip: self.where["ip"], device: self.where["device"],
                          gpus: self.where["gpus"], started: at, ended: at + secs})
            at += secs


class Encode:
    """Write each edit and its preview (original | edit) and upload them; the edit goes last, so it marks done."""

    def __init__(self, fps: float, s3: dict | None = None, limits: dict | None = None):
        self.fps, self.s3, self.limits = fps, _s3(s3), limits
        self.originals = _Lru(2)

    def _write(self, r: dict) -> None:
        edited = Video(r["frames"], self.fps)
        original = self.originals.get_or(r["video"], lambda: load_video(r["video"], self.s3, self.limits)[0])
        with tempfile.TemporaryDirectory(prefix="dreamix-encode-") as tmp:
            video = write_video(Path(tmp, "edit.mp4"), edited)
            mp4, png = write_preview(original, edited, Path(tmp, "preview.mp4"), prompt=r["prompt"])
            write_bytes(r["preview"], mp4.read_bytes(), self.s3)
            write_bytes(r["preview"][:-4] + ".png", png.read_bytes(), self.s3)
            write_bytes(r["output"], video.read_bytes(), self.s3)

    def __call__(self, batch: dict) -> dict:
        rows = to_rows(batch)
        for r in rows:
            start = time.perf_counter()
            if r["status"] == "pending":
                try:
                    self._write(r)
                    r["status"] = "ok"
                except Exception as exc:
                    r["status"], r["error"] = "error", describe(exc)
            r["t_encode"], r["finished_at"] = time.perf_counter() - start, time.time()
        columns = [c for c in batch if c not in TENSOR_COLUMNS] + ["t_encode", "finished_at"]
        return to_batch(rows, columns)
