"""The batch pipeline's steps that run networks, as plain callables on column batches; they run without Ray
(batch.py wires them). The file steps, Decode and Encode, and the column helpers are in io_steps.py."""

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
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pyarrow import fs as pafs

from ..edit import StageRun, Timings, run_cascade, run_stage
from ..errors import UserError
from ..finetune import finetune_or_load, finetune_preset
from ..finetuned_cache import FinetunedCascades
from ..models.cascade import CASCADE_FILE, EMBEDDED_DIR, load_base_vae, load_cascade
from ..quiet import quiet_libraries
from ..request import EditPlan
from ..storage import ArtifactStore, S3Settings, filesystem, is_s3
from .io_steps import (Lru, cascade_config, describe, empty_frames, load_video, s3_settings,
                       to_batch, to_rows)

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


def _load_cascade(model: str | None, s3: S3Settings | None):
    """load_cascade without the libraries' per-load progress bars, which flood every actor's log."""
    quiet_libraries()
    return load_cascade(model_dir(model, s3))


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


class Degrade:
    """The degrade of a latent base (paper Sec. 4.1) as a step of its own: each row's downsampled input into the
    base's VAE latents, which the base step noises at the row's strength and samples from. It holds the base's
    VAE alone, so it can have a GPU of its own; a pixel base needs no encoding and the pipeline has no such step.
    Encoding is per row (the VAEs encode one clip at a time), so results stay the in-process edit's."""

    def __init__(self, model: str | None = None, s3: dict | None = None, threads: int = 1, gpus: float = 0):
        torch.set_num_threads(max(1, threads))
        quiet_libraries()
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.vae = load_base_vae(model_dir(model, s3_settings(s3)), device)
        self.cache = Lru(4)  # a row's prompts arrive together: encode its input once

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
        self.model, self.s3, self.limits = model, s3_settings(s3), limits
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
        s3_config = s3_settings(s3)
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        # what the results record per row: on a logical GPU (Ray's accounting, no CUDA) the stage runs on "cpu"
        self.where = dict(placement(), device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        # noise still comes from CPU generators: the same rows on any device
        self.models = FinetunedCascades(lambda: _load_cascade(model, s3_config).to(device),
                                        ArtifactStore(store, s3_config))
        self.config = cascade_config(model, s3_config)
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


