"""The batch pipeline's file steps (Decode, Encode) and the column helpers every step uses.

Nothing here imports diffusers or the models: a Decode or Encode actor starts in the time PyAV and pyarrow take
(and torch, for Decode only), not the cascade's (several CPU-seconds less each at the start of every job, when
every actor of the job imports at once; steps.py holds the steps that run networks).
"""

from __future__ import annotations

import json
import math
import posixpath
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..config import CascadeConfig, EditConfig
from ..errors import UserError
from ..models.embedded import CASCADE_FILE, EMBEDDED_DIR, CascadeError, embedded_config
from ..storage import S3Settings, exists, is_s3, join, read_bytes, write_bytes
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


def s3_settings(settings: dict | None) -> S3Settings | None:
    return S3Settings(**settings) if settings else None


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


class Lru(OrderedDict):
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


class Decode:
    """Skip rows whose output exists, read each video, downsample it to the base stage (paper Sec. 4.1)."""

    def __init__(self, model: str | None = None, s3: dict | None = None, limits: dict | None = None):
        from ..degrade import downsample_to_stage  # torch: imported here, so an Encode actor starts without it

        self.downsample = downsample_to_stage
        self.s3, self.limits = s3_settings(s3), limits
        self.base = cascade_config(model, self.s3).stages[0]
        self.cache = Lru(4)  # a row's prompts arrive together: decode its video once

    def _x0(self, uri: str, cfg: EditConfig) -> np.ndarray:
        video = load_video(uri, self.s3, self.limits)[0]
        return self.downsample(video, self.base, cfg.num_frames, cfg.fit)[0].numpy()

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


class Encode:
    """Write each edit and its preview (original | edit) and upload them; the edit goes last, so it marks done."""

    def __init__(self, fps: float, s3: dict | None = None, limits: dict | None = None):
        self.fps, self.s3, self.limits = fps, s3_settings(s3), limits
        self.originals = Lru(2)

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
