"""Mixed video-image finetuning (paper Sec. 4.2): finetune once per video, edit with many prompts."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import PAPER_FINETUNE_LR, ConfigError, _Dict
from .degrade import frames_to_tensor
from .models.cascade import Cascade, Stage
from .objective import TrainBatch, draw_training_noise, is_frame_step, sr_condition
from .storage import ArtifactStore, StorageError
from .training.checkpoint import LocalCheckpoints, load_exports
from .training.loop import TrainSpec, train
from .video import resample

# Paper App. A.2 recipes: (alpha, steps); learning rate 6e-6 for all.
PRESETS = {"video": (1.0, 64), "mixed": (0.35, 250), "frames": (0.0, 100)}
# A single rare wordpiece in MiniLM's vocabulary (DreamBooth's "sks" splits into two pieces there).
DEFAULT_TOKEN = "naia"
ARTIFACT_FILE = "finetune.json"  # written last: its presence marks a complete artifact

ProgressCallback = Callable[[str, int, int, float], None]  # (stage, step, total, loss)


@dataclass(frozen=True)
class FinetuneConfig(_Dict):
    """One finetuning run; `finetune_preset` fills alpha and steps from the paper's recipes."""

    preset: str = "mixed"
    alpha: float = 0.35  # weight of L_vid; 1 - alpha weighs L_frame
    steps: int = 250  # per finetuned stage
    lr: float | None = None  # None = the cascade's finetune_lr, else the paper's 6e-6
    stages: tuple[str, ...] = ()  # empty = the stages the cascade marks `finetune`
    token: str = DEFAULT_TOKEN
    caption: str = ""  # optional words after the token in the training prompt
    seed: int = 0
    grad_clip: float = 1.0
    num_frames: int | None = None  # clip length for L_vid; None = each stage's trained length
    fit: str = "crop"
    checkpoint_every: int = 25
    batch_size: int = 1  # samples (clips, or frame packs in frame steps) per step, on any worker count

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or math.isnan(self.alpha):
            raise ConfigError(f"alpha must be in [0, 1] (1 = video only, 0 = frames only), got {self.alpha}")
        if self.steps < 1:
            raise ConfigError(f"finetuning needs at least 1 step, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"the learning rate must be > 0, got {self.lr}")
        if not self.token.strip() or " " in self.token.strip():
            raise ConfigError(f"the finetuning token must be one word, got {self.token!r}")
        if self.batch_size < 1:
            raise ConfigError(f"the finetuning batch size must be >= 1, got {self.batch_size}")

    @property
    def prompt(self) -> str:
        return f"{self.token} {self.caption}".strip()


def finetune_preset(name: str, **overrides) -> FinetuneConfig:
    """A paper recipe by name (video | mixed | frames), with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown finetune preset {name!r}: choose one of {sorted(PRESETS)}")
    alpha, steps = PRESETS[name]
    fields = {"preset": name, "alpha": alpha, "steps": steps}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return FinetuneConfig.from_dict(fields)


def finetuned_prompt(prompt: str, cfg: FinetuneConfig | str) -> str:
    """Edits of a finetuned video name its token; it is prepended when the prompt lacks it."""
    token = cfg if isinstance(cfg, str) else cfg.token
    return prompt if token in prompt.split() else f"{token} {prompt}"


def finetuned_stage_names(cascade: Cascade, cfg: FinetuneConfig) -> list[str]:
    names = list(cfg.stages) or [s.config.name for s in cascade.stages if s.config.finetune]
    known = [s.config.name for s in cascade.stages]
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad} to finetune; this cascade has {known}")
    return names


def artifact_key(source_bytes: bytes, cfg: FinetuneConfig, cascade: Cascade) -> str:
    """hash(input bytes, finetune config, base cascade id): same video + config -> same artifact."""
    h = hashlib.sha256(source_bytes)
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(cascade_id(cascade).encode())
    return "ft-" + h.hexdigest()[:20]


def cascade_id(cascade: Cascade) -> str:
    if not hasattr(cascade, "_id"):
        cascade._id = cascade.cascade_id()
    return cascade._id


def video_bytes(video) -> bytes:
    """Stand-in for file bytes when only decoded frames exist (in-memory videos)."""
    return np.ascontiguousarray(video.frames).tobytes() + repr(float(video.fps)).encode()


class _StageData:
    """The clip (for L_vid) and the pool of all frames (for L_frame) at one stage's resolution."""

    def __init__(self, video, stage: Stage, cfg: FinetuneConfig):
        sc = stage.config
        frames = cfg.num_frames or sc.frames
        clip = resample(video, fps=sc.fps, num_frames=frames, height=sc.height, width=sc.width, fit=cfg.fit)
        every = resample(video, fps=video.fps, num_frames=None, height=sc.height, width=sc.width, fit=cfg.fit)
        # Latent stages train on VAE latents, encoded once here rather than every step.
        self.clip_bcfhw = stage.encode(frames_to_tensor(clip.frames))
        self.frames_cfhw = stage.encode(frames_to_tensor(every.frames))[0]
        self.frames_per_step = sc.frames

    def frame_batch(self, rng: np.random.Generator) -> torch.Tensor:
        """Frames of the whole video in random order, laid out as one clip that frame mode keeps apart."""
        n = self.frames_cfhw.shape[1]
        idx = rng.choice(n, self.frames_per_step, replace=n < self.frames_per_step)
        return self.frames_cfhw[:, idx].unsqueeze(0)


def finetune_batch(stage: Stage, data: _StageData, text, cfg: FinetuneConfig, stage_index: int,
                   step: int) -> TrainBatch:
    """Step `step`'s global batch: cfg.batch_size samples with their own draws, a pure function of
    (seed, stage, step), so every engine and every rank sees the same batch."""
    rng = np.random.default_rng([cfg.seed, stage_index, step])
    frames_step = is_frame_step(cfg.seed, step, cfg.alpha)
    x0s, ts, noises = [], [], []
    for _ in range(cfg.batch_size):
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = data.frame_batch(rng) if frames_step else data.clip_bcfhw
        t, noise = draw_training_noise(stage, x0, gen)
        x0s.append(x0)
        ts.append(t)
        noises.append(noise)
    x0 = torch.cat(x0s)
    tokens, pooled = (e.expand(cfg.batch_size, *e.shape[1:]) for e in text)
    return TrainBatch(frames_step, x0, sr_condition(stage, x0, frames_as_images=frames_step), tokens, pooled,
                      torch.cat(ts), torch.cat(noises))


def finetune_lr(cfg: FinetuneConfig, cascade: Cascade) -> float:
    """The config's rate, else the cascade's `finetune_lr`, else the paper's 6e-6."""
    return cfg.lr or cascade.config.finetune_lr or PAPER_FINETUNE_LR


def finetune_specs(stages: list[tuple[int, Stage, _StageData]], text, cfg: FinetuneConfig, lr: float,
                   checkpoint_every: int | None = None) -> list[TrainSpec]:
    """The training loop's spec per (cascade index, stage, data): alpha * L_vid + (1 - alpha) * L_frame
    (paper Sec. 4.2) at a constant learning rate, the base and SSR stages each on its own data."""
    every = cfg.checkpoint_every if checkpoint_every is None else checkpoint_every
    return [TrainSpec(stage.config.name, stage, cfg.steps, lr, cfg.grad_clip,
                      functools.partial(finetune_batch, stage, data, text, cfg, index), seed=cfg.seed,
                      checkpoint_every=every)
            for index, stage, data in stages]


def copy_for_finetuning(cascade: Cascade, names: list[str]) -> Cascade:
    """A cascade sharing every untouched stage and the text encoder, with private copies of `names`."""
    stages = [Stage(s.config, copy.deepcopy(s.denoiser) if s.config.name in names else s.denoiser, s.scheduler,
                    s.vae) for s in cascade.stages]
    return Cascade(cascade.config, cascade.text_encoder, stages, cascade.source)


class _Progress:
    """The loop's step callback: a tqdm bar per stage, then the caller's on_step."""

    def __init__(self, show: bool, on_step: ProgressCallback | None):
        self.show, self.on_step, self.bars = show, on_step, {}

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        if name not in self.bars:
            self.bars[name] = tqdm(desc=f"finetune {name}", total=total, initial=step - 1, disable=not self.show,
                                   leave=False, unit="step")
        bar = self.bars[name]
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step == total:
            bar.close()
        if self.on_step:
            self.on_step(name, step, total, loss)


def finetune(video, cfg: FinetuneConfig, cascade: Cascade, work_dir: Path | None = None, progress: bool = False,
             on_step: ProgressCallback | None = None) -> Cascade:
    """Finetune the configured stages on `video` in one process; `work_dir` holds resumable checkpoints
    (a temporary folder without it)."""
    names = finetuned_stage_names(cascade, cfg)
    tuned = copy_for_finetuning(cascade, names)
    text = cascade.text_encoder([cfg.prompt])
    stages = [(i, s, _StageData(video, s, cfg)) for i, s in enumerate(tuned.stages) if s.config.name in names]
    with contextlib.ExitStack() as stack:
        root = work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dreamix-ft-"))
        checkpoints = LocalCheckpoints(root)
        # without a work_dir nothing could resume: only each stage's last checkpoint (its result) is written
        specs = finetune_specs(stages, text, cfg, finetune_lr(cfg, cascade), None if work_dir else 0)
        train(specs, checkpoints, on_step=_Progress(progress, on_step))
        with checkpoints.latest() as last:
            return load_exports(tuned, names, last)


def save_artifact(tuned: Cascade, cfg: FinetuneConfig, key: str, store: ArtifactStore, base: Cascade) -> str:
    """Write the finetuned stages' weights (exact, fp32) and finetune.json to the store."""
    names = finetuned_stage_names(base, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for stage in tuned.stages:
            if stage.config.name in names:
                stage.denoiser.save_pretrained(Path(tmp, stage.config.name))
        meta = {"id": key, "config": cfg.to_dict(), "cascade_id": cascade_id(base), "stages": names}
        Path(tmp, ARTIFACT_FILE).write_text(json.dumps(meta, indent=2))
        store.put_dir(key, tmp, marker=ARTIFACT_FILE)
    return key


def load_finetuned(cascade: Cascade, key: str, store: ArtifactStore) -> tuple[Cascade, FinetuneConfig]:
    """The cascade with the artifact's stages swapped in, and the config that made it."""
    if not store.has(key, ARTIFACT_FILE):
        raise StorageError(f"no finetuned artifact {key!r} in store {store.root}: run `dreamix finetune` first")
    meta = json.loads(store.get(key, ARTIFACT_FILE))
    if meta["cascade_id"] != cascade_id(cascade):
        raise ConfigError(f"artifact {key} was finetuned from another cascade ({meta['cascade_id']}); "
                          f"load it with the same --model")
    tmp = Path(tempfile.mkdtemp(prefix="dreamix-ft-"))
    try:
        store.get_dir(key, tmp)
        stages = []
        for s in cascade.stages:
            den = type(s.denoiser).from_pretrained(tmp / s.config.name).eval().to(cascade.device) \
                if s.config.name in meta["stages"] else s.denoiser
            stages.append(Stage(s.config, den, s.scheduler, s.vae))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Cascade(cascade.config, cascade.text_encoder, stages, cascade.source), FinetuneConfig.from_dict(
        meta["config"])


def finetune_or_load(video, cfg: FinetuneConfig, cascade: Cascade, store: ArtifactStore, progress: bool = False,
                     source_bytes: bytes | None = None, on_step: ProgressCallback | None = None
                     ) -> tuple[Cascade, str]:
    """Finetune once, edit many: reuse the stored artifact for the same input, config and cascade."""
    key = artifact_key(source_bytes if source_bytes is not None else video_bytes(video), cfg, cascade)
    if store.has(key, ARTIFACT_FILE):
        return load_finetuned(cascade, key, store)[0], key
    work_dir = Path(tempfile.gettempdir(), "dreamix-finetune", key)  # survives Ctrl-C for a resume
    tuned = finetune(video, cfg, cascade, work_dir, progress, on_step)
    save_artifact(tuned, cfg, key, store, cascade)
    shutil.rmtree(work_dir, ignore_errors=True)
    return tuned, key


def with_overrides(cfg: FinetuneConfig, **kwargs) -> FinetuneConfig:
    return dataclasses.replace(cfg, **{k: v for k, v in kwargs.items() if v is not None})
