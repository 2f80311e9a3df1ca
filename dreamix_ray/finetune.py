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
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import PAPER_FINETUNE_LR, ConfigError, _Dict
from .degrade import frames_to_tensor
from .models import adapters
from .models.cascade import Cascade, Stage
from .models.weights import load_denoiser
from .objective import TrainBatch, draw_training_noise, is_frame_step, sr_condition
from .storage import ArtifactStore, StorageError
from .training.checkpoint import LocalCheckpoints
from .training.loop import TrainSpec, train
from .video import resample

# Paper App. A.2 recipes: (alpha, steps); learning rate 6e-6 for all.
PRESETS = {"video": (1.0, 64), "mixed": (0.35, 250), "frames": (0.0, 100)}
# A single rare wordpiece in MiniLM's vocabulary (DreamBooth's "sks" splits into two pieces there).
DEFAULT_TOKEN = "naia"
ARTIFACT_FILE = "finetune.json"  # written last: its presence marks a complete artifact
ADAPTERS = ("lora", "full")
# LoRA's B starts at 0 and its update is rank-limited: it needs a far larger step than the paper's
# full-weight 6e-6 (diffusers' LoRA training scripts default to 1e-4).
LORA_LR = 1e-4

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
    # lora: a peft LoRA adapter on each finetuned stage, and the artifact holds only it; full: every weight
    adapter: str = "lora"
    lora_rank: int = 4
    lora_alpha: float | None = None  # None = the rank: the adapter's update at scale 1
    lora_targets: str = "attention"  # attention | spatial | temporal (models/adapters.LORA_TARGETS)

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
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"unknown finetuning adapter {self.adapter!r}: choose one of {list(ADAPTERS)}")
        if self.lora_rank < 1:
            raise ConfigError(f"the LoRA rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"the LoRA alpha must be > 0, got {self.lora_alpha}")
        if self.lora_targets not in adapters.LORA_TARGETS:
            raise ConfigError(f"unknown LoRA targets {self.lora_targets!r}: "
                              f"choose one of {list(adapters.LORA_TARGETS)}")
        if self.adapter == "lora" and self.lora_targets == "temporal" and self.alpha < 1:
            # frame steps mask the temporal layers: such a step would train nothing (and DDP would hang on it)
            raise ConfigError(f"a temporal-only LoRA learns nothing on frame steps: use alpha 1 (preset video), "
                              f"not {self.alpha}, or lora_targets 'attention'")

    def key_fields(self) -> dict:
        """What identifies the artifact: a full run ignores the LoRA settings, and keeps the key it had before
        LoRA existed (so stores written then still hit)."""
        fields = self.to_dict()
        if self.adapter == "full":
            for name in ("adapter", "lora_rank", "lora_alpha", "lora_targets"):
                fields.pop(name)
        elif self.lr is None:
            fields["lr"] = LORA_LR  # the rate it trains at, so a new default gives new keys
        return fields

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
    h.update(json.dumps(cfg.key_fields(), sort_keys=True).encode())
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
        # L_frame trains on images: each frame is encoded alone, as a one-frame clip, the way Wan trains on
        # images through its causal VAE (per-frame VAEs and pixel stages give the same latents either way)
        images_b3hw = frames_to_tensor(every.frames)[0].transpose(0, 1)
        self.frames_cfhw = stage.encode(images_b3hw.unsqueeze(2))[:, :, 0].transpose(0, 1)
        # a frame step packs as many frames as the clip has latent frames (Wan's VAE makes 4k + 1 -> k + 1)
        self.frames_per_step = sc.frames if stage.vae is None else \
            stage.vae.latent_shape(sc.frames, sc.height, sc.width)[1]

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
    """The config's rate, else LORA_LR for an adapter, else the cascade's `finetune_lr`, else the paper's 6e-6."""
    if cfg.lr:
        return cfg.lr
    return LORA_LR if cfg.adapter == "lora" else cascade.config.finetune_lr or PAPER_FINETUNE_LR


def finetune_specs(stages: list[tuple[int, Stage, _StageData]], text, cfg: FinetuneConfig, lr: float,
                   checkpoint_every: int | None = None) -> list[TrainSpec]:
    """The training loop's spec per (cascade index, stage, data): alpha * L_vid + (1 - alpha) * L_frame
    (paper Sec. 4.2) at a constant learning rate, the base and SSR stages each on its own data. The stages'
    denoisers are private copies (copy_for_finetuning, or a Ray Train worker's own); with cfg.adapter lora
    each gets its adapter here, drawn from (seed, stage), so every rank and every resume builds the same one."""
    every = cfg.checkpoint_every if checkpoint_every is None else checkpoint_every
    if cfg.adapter == "lora":
        for index, stage, _ in stages:
            if adapters.has_adapter(stage.denoiser):
                raise ValueError(f"stage {stage.config.name!r} already carries an adapter: pass a fresh copy")
            config = adapters.lora_config(stage.denoiser, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank,
                                          cfg.lora_targets, stage.config.name)
            adapters.add_adapter(stage.denoiser, config, seed=f"{cfg.seed}:{index}")
    return [TrainSpec(stage.config.name, stage, cfg.steps, lr, cfg.grad_clip,
                      functools.partial(finetune_batch, stage, data, text, cfg, index), seed=cfg.seed,
                      checkpoint_every=every)
            for index, stage, data in stages]


def copy_for_finetuning(cascade: Cascade, names: list[str]) -> Cascade:
    """A cascade sharing every untouched stage and the text encoder, with private copies of `names`."""
    stages = [dataclasses.replace(s, denoiser=copy.deepcopy(s.denoiser)) if s.config.name in names else s
              for s in cascade.stages]
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


@contextlib.contextmanager
def _trained(video, cfg: FinetuneConfig, cascade: Cascade, work_dir: Path | None, progress: bool,
             on_step: ProgressCallback | None) -> Iterator[Path]:
    """Finetune in this process, then yield the folder holding each finetuned stage's result (exports/ of the
    run's last checkpoint); `work_dir` holds resumable checkpoints (a temporary folder without it)."""
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
            yield last / "exports"


def finetune(video, cfg: FinetuneConfig, cascade: Cascade, work_dir: Path | None = None, progress: bool = False,
             on_step: ProgressCallback | None = None) -> Cascade:
    """Finetune the configured stages on `video` in one process; the result is the cascade a load of its
    artifact gives (`attach`), bit for bit."""
    with _trained(video, cfg, cascade, work_dir, progress, on_step) as results:
        return attach(cascade, finetuned_stage_names(cascade, cfg), results)


def attach(cascade: Cascade, names: list[str], results: Path) -> Cascade:
    """`cascade` with each stage in `names` taken from results/<name>: a LoRA adapter merged onto the stage's
    denoiser in memory (every other tensor shared, the base unchanged), or a whole denoiser (full)."""
    stages = []
    for s in cascade.stages:
        denoiser, folder = s.denoiser, results / s.config.name
        if s.config.name in names:
            if adapters.is_adapter_dir(folder):
                denoiser = adapters.merged_copy(s.denoiser, folder)
            elif any(folder.glob("*.safetensors")):
                denoiser = load_denoiser(s.denoiser, folder).eval().to(cascade.device)
            else:
                raise StorageError(f"no finetuned weights for stage {s.config.name!r} in {results}: rerun the "
                                   "finetuning (the same run name resumes it)")
        stages.append(dataclasses.replace(s, denoiser=denoiser))  # the rest (VAE, an LTX upsampler) shared
    return Cascade(cascade.config, cascade.text_encoder, stages, cascade.source)


def save_artifact(results: Path, cfg: FinetuneConfig, key: str, store: ArtifactStore, base: Cascade) -> str:
    """Write each finetuned stage's result (a LoRA adapter, or the whole denoiser; fp32, exact) from
    results/<stage> and finetune.json to the store."""
    names = finetuned_stage_names(base, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if not any((results / name).glob("*.safetensors")):
                raise StorageError(f"no finetuned weights for stage {name!r} in {results}: rerun the finetuning "
                                   "(the same run name resumes it)")
            shutil.copytree(results / name, Path(tmp, name))
        meta = {"id": key, "config": cfg.to_dict(), "cascade_id": cascade_id(base), "stages": names}
        Path(tmp, ARTIFACT_FILE).write_text(json.dumps(meta, indent=2))
        store.put_dir(key, tmp, marker=ARTIFACT_FILE)
    return key


def load_finetuned(cascade: Cascade, key: str, store: ArtifactStore) -> tuple[Cascade, FinetuneConfig]:
    """The cascade with the artifact's stages put in (`attach`: base weights are not reloaded), and the
    config that made it."""
    if not store.has(key, ARTIFACT_FILE):
        raise StorageError(f"no finetuned artifact {key!r} in store {store.root}: run `dreamix finetune` first")
    meta = json.loads(store.get(key, ARTIFACT_FILE))
    if meta["cascade_id"] != cascade_id(cascade):
        raise ConfigError(f"artifact {key} was finetuned from another cascade ({meta['cascade_id']}); "
                          f"load it with the same --model")
    # artifacts written before LoRA existed hold whole denoisers and name no adapter
    cfg = FinetuneConfig.from_dict({"adapter": "full", **meta["config"]})
    with tempfile.TemporaryDirectory(prefix="dreamix-ft-") as tmp:
        store.get_dir(key, tmp)
        return attach(cascade, meta["stages"], Path(tmp)), cfg


def finetune_or_load(video, cfg: FinetuneConfig, cascade: Cascade, store: ArtifactStore, progress: bool = False,
                     source_bytes: bytes | None = None, on_step: ProgressCallback | None = None
                     ) -> tuple[Cascade, str]:
    """Finetune once, edit many: reuse the stored artifact for the same input, config and cascade."""
    key = artifact_key(source_bytes if source_bytes is not None else video_bytes(video), cfg, cascade)
    if store.has(key, ARTIFACT_FILE):
        return load_finetuned(cascade, key, store)[0], key
    work_dir = Path(tempfile.gettempdir(), "dreamix-finetune", key)  # survives Ctrl-C for a resume
    with _trained(video, cfg, cascade, work_dir, progress, on_step) as results:
        save_artifact(results, cfg, key, store, cascade)
        tuned = attach(cascade, finetuned_stage_names(cascade, cfg), results)
    shutil.rmtree(work_dir, ignore_errors=True)
    return tuned, key


def with_overrides(cfg: FinetuneConfig, **kwargs) -> FinetuneConfig:
    return dataclasses.replace(cfg, **{k: v for k, v in kwargs.items() if v is not None})
