"""Subject-driven video generation (paper Sec. 5): frame-only finetune on a few images, then text-to-video."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .config import ConfigError
from .finetune import FinetuneConfig, finetune_or_load, finetune_preset
from .models.cascade import Cascade
from .storage import ArtifactStore
from .video import Video, read_image, resample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def subject_image_paths(folder: str | Path) -> list[Path]:
    """The images of one subject; at least two, as the paper learns from a collection."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: give a folder of 2 or more images of one subject")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ConfigError(f"{folder} holds {len(paths)} image(s); subject learning needs at least 2 "
                          "(varied views and backgrounds help); for one image use `dreamix animate`")
    return paths


def images_as_frames(images: list[np.ndarray], size: int) -> Video:
    """The collection as an unordered 'video' of square frames (frame-only finetuning ignores order)."""
    frames = [resample(Video(img[None], 1.0), fps=1.0, num_frames=1, height=size, width=size).frames[0]
              for img in images]
    return Video(np.stack(frames), 1.0)


def finetune_subject(folder: str | Path, token: str, cascade: Cascade, store: ArtifactStore,
                     cfg: FinetuneConfig | None = None, progress: bool = False) -> str:
    """Frame-only (alpha = 0) finetune on the images; returns the artifact id."""
    paths = subject_image_paths(folder)
    images = [read_image(p) for p in paths]
    cfg = cfg or finetune_preset("frames", token=token)
    if cfg.alpha != 0.0:
        raise ConfigError(f"subject learning is frame-only (alpha = 0); got alpha {cfg.alpha}")
    size = max(s.config.height for s in cascade.stages)
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    _, key = finetune_or_load(images_as_frames(images, size), cfg, cascade, store, progress,
                              source_bytes=digest.digest())
    return key
