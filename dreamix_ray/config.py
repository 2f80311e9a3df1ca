"""Frozen configs and the paper's default numbers, in one place (Dreamix, arXiv 2302.01329)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

STAGE_KINDS = ("base", "tsr", "ssr")
# How a DDIM-family stage samples: "ddim" (stochastic DDIM, what every stage trained with) or "dpm++"
# (DPM-Solver++, second order: fewer steps for the same trajectory; sampling.py). Flow stages ignore it.
STAGE_SAMPLERS = ("ddim", "dpm++")

# Paper App. A.1: the last, largest SSR samples sub-chunks of 32 frames.
PAPER_SSR_CHUNK_FRAMES = 32
# Paper App. A.1: classifier-free guidance weight 1.0, i.e. off.
PAPER_GUIDANCE_SCALE = 1.0
# Paper Sec. 4.1 / App. A.3: good strengths without finetuning 0.4-0.85, after finetuning 0.95-1.0.
PAPER_STRENGTH_NO_FINETUNE = (0.4, 0.85)
PAPER_STRENGTH_FINETUNED = (0.95, 1.0)
EDIT_TYPES = ("motion", "style", "object", "background", "colour")  # the paper's Table 1 categories, and
# colour: a change of the object's colour only, which needs a strength of its own (issue 21)
STRENGTH_PRESETS = ("none", "video", "mixed")  # no finetuning, or the finetuning preset used
# Paper App. A.2: learning rate of every finetuning recipe.
PAPER_FINETUNE_LR = 6e-6
# Latent SSR refiners (models/latent.py): zeroscope_v2_XL's card recommends SDEdit strength 0.66-0.85.
DEFAULT_REFINE_STRENGTH = 0.7
# Classifier-free guidance: "batched" runs cond + uncond as one forward at batch 2B (faster), "sequential" as two
# forwards at batch B (half the activation memory). None: batched for flow stages (Wan), sequential for DDIM
# stages (what they always ran; their results stay bit-identical).
CFG_MODES = ("batched", "sequential")
# The stage networks' arithmetic: fp32, or autocast to bf16 / fp16 around each forward (weights, norms and the
# sampler stay fp32). bf16 is 1.8x faster per SSR step on an AVX512-BF16 CPU (BENCHMARKS.md, "Faster edits").
PRECISIONS = ("fp32", "bf16", "fp16")
# Frames per VAE call in latent stages: bounds VAE memory, which grows with frames x pixels.
DEFAULT_VAE_CHUNK_FRAMES = 8


class ConfigError(UserError):
    """A user-supplied setting is out of range; the message says which and what to do."""


class _Dict:
    """to_dict / from_dict for frozen dataclasses (unknown keys are an error, not ignored)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class StageConfig(_Dict):
    """One cascade stage: what it produces and how it samples (paper App. A.1)."""

    name: str
    kind: str  # base | tsr | ssr
    frames: int  # frames this stage was trained on (its default clip length)
    height: int
    width: int
    fps: float
    factor: int = 1  # tsr: frames multiplier; ssr: pixels multiplier; base: 1
    steps: int = 32
    eta: float = 0.5
    finetune: bool = False  # finetuned by default (paper: base + first two SSR)
    latent: dict | None = None  # a latent video stage's components (models/latent.py, docs/REAL_MODELS.md)
    sampler: str = "ddim"  # STAGE_SAMPLERS

    def __post_init__(self):
        if self.sampler not in STAGE_SAMPLERS:
            raise ConfigError(f"stage {self.name!r}: sampler must be one of {STAGE_SAMPLERS}, got {self.sampler!r}")
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"stage {self.name!r}: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.kind != "base" and self.factor < 1:
            raise ConfigError(f"stage {self.name!r}: factor must be >= 1")
        if self.latent is not None and not isinstance(self.latent, dict):
            raise ConfigError(f"stage {self.name!r}: 'latent' must be a JSON object, got {self.latent!r}")

    @property
    def latent_input(self) -> bool:
        """An SR stage that takes the previous stage's latents, not pixels (LTX: the stages share one VAE)."""
        return (self.latent or {}).get("input") == "latents"

    @property
    def temporal_compression(self) -> int:
        """Pixel frames per latent frame of a latent-input stage's causal VAE (F = t (L - 1) + 1), else 1."""
        return int((self.latent or {}).get("temporal_compression", 1))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["latent"] is None:  # pixel stages keep their old cascade.json (and cascade ids) unchanged
            del data["latent"]
        if data["sampler"] == "ddim":  # likewise stages that sample as every earlier release did
            del data["sampler"]
        return data


@dataclass(frozen=True)
class CascadeConfig(_Dict):
    """The cascade: a text encoder and an ordered list of stages."""

    stages: tuple[StageConfig, ...]
    text_encoder: dict = field(default_factory=dict)  # {"kind": "minilm"|"t5"|"clip", "path": ...}
    name: str = "cascade"
    description: str = ""
    finetune_lr: float | None = None  # what works for this cascade; None = the paper's 6e-6
    # Strength per edit type, found on tuning videos: {"none" | "video" | "mixed": {edit type: s}}
    # ("none" = no finetuning). Motion edits need more noise than style edits (paper Sec. 6).
    edit_strengths: dict | None = None
    # Direction of travel per prompt, imposed at high noise (motion_guidance.py); None = no guidance.
    motion_prior: dict | None = None
    # Noise the pixel SR stages start from when an edit does not say (EditConfig.sr_strength); None = 1.
    sr_strength: float | None = None
    # Classifier-free guidance when an edit does not say: converted text-to-video models want 5-9 (their
    # pipelines' defaults); None = 1, off, as the paper's cascade (App. A.1).
    guidance_scale: float | None = None

    def __post_init__(self):
        check_structure(self.name, self.stages)
        if self.guidance_scale is not None and not self.guidance_scale >= 1.0:
            raise ConfigError(f"guidance_scale must be >= 1 (1 = off), got {self.guidance_scale!r}")
        if self.sr_strength is not None and not 0.0 < self.sr_strength <= 1.0:
            raise ConfigError(f"sr_strength must be in (0, 1] (1 = from pure noise), got {self.sr_strength!r}")
        if self.motion_prior is not None:
            # Imported here, not at the top: motion_guidance needs torch, and config must stay light for
            # `dreamix convert` and the batch driver, which read cascade.json without loading any model.
            from .motion_guidance import MotionPrior

            MotionPrior.from_dict(self.motion_prior)  # a malformed entry fails at load, naming the fix
        for preset, by_type in (self.edit_strengths or {}).items():
            if preset not in STRENGTH_PRESETS or not isinstance(by_type, dict):
                raise ConfigError(f"edit_strengths: keys must be among {STRENGTH_PRESETS}, each mapping edit types "
                                  f"to strengths; got {preset!r}: {by_type!r}")
            for edit_type, s in by_type.items():
                if edit_type not in EDIT_TYPES:
                    raise ConfigError(f"edit_strengths[{preset!r}]: unknown edit type {edit_type!r}; "
                                      f"use one of {EDIT_TYPES}")
                validate_strength(s)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "description": self.description,
            "finetune_lr": self.finetune_lr,
            "text_encoder": dict(self.text_encoder),
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.edit_strengths:  # cascades without presets keep their cascade.json (and ids) unchanged
            data["edit_strengths"] = {k: dict(v) for k, v in self.edit_strengths.items()}
        if self.motion_prior:
            data["motion_prior"] = dict(self.motion_prior)
        if self.sr_strength is not None:
            data["sr_strength"] = self.sr_strength
        if self.guidance_scale is not None:
            data["guidance_scale"] = self.guidance_scale
        return data

    def strength_for(self, edit_type: str, preset: str = "none") -> float | None:
        """The tuned strength for an edit type ("none" = no finetuning), or None if this cascade has none."""
        if edit_type not in EDIT_TYPES:
            raise ConfigError(f"unknown edit type {edit_type!r}; use one of {', '.join(EDIT_TYPES)}")
        return (self.edit_strengths or {}).get(preset, {}).get(edit_type)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CascadeConfig":
        stages = tuple(StageConfig.from_dict(s) for s in data["stages"])
        return cls(stages=stages, text_encoder=dict(data.get("text_encoder", {})),
                   name=data.get("name", "cascade"), description=data.get("description", ""),
                   finetune_lr=data.get("finetune_lr"), edit_strengths=data.get("edit_strengths"),
                   motion_prior=data.get("motion_prior"), sr_strength=data.get("sr_strength"),
                   guidance_scale=data.get("guidance_scale"))


def check_structure(name: str, stages: tuple[StageConfig, ...]) -> None:
    """The cascade's shape, checked once at load: one base first, then SR stages; nothing after the last SSR,
    which is the stage that runs in chunks (paper App. A.1)."""
    kinds = [s.kind for s in stages]
    if not kinds or kinds[0] != "base" or "base" in kinds[1:]:
        raise ConfigError(f"cascade {name!r}: the first stage, and only it, must be of kind 'base'; got {kinds}")
    if "ssr" in kinds and kinds[-1] != "ssr":
        raise ConfigError(f"cascade {name!r}: no stage may follow the last SSR (it runs in frame chunks); got "
                          f"{kinds}; move the {kinds[-1]} stage before it")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"cascade {name!r}: stage names must be unique; got {names}")


def validate_strength(strength: float) -> float:
    """Strength s is the base model's diffusion time in [0, 1] (paper Sec. 4.1)."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ConfigError(f"strength must be a number in [0, 1], got {strength!r}") from None
    if math.isnan(s) or not 0.0 <= s <= 1.0:
        raise ConfigError(
            f"strength must be in [0, 1] (0 keeps the degraded video, 1 is pure noise), got {strength!r}; "
            f"the paper uses {PAPER_STRENGTH_NO_FINETUNE[0]}-{PAPER_STRENGTH_NO_FINETUNE[1]} without finetuning"
        )
    return s


@dataclass(frozen=True)
class EditConfig(_Dict):
    """How one edit runs (paper Sec. 4.1, App. A.1)."""

    strength: float = 0.7
    seed: int = 0
    steps: tuple[int, ...] = ()  # per-stage step counts; empty = each stage's default
    eta: float | None = None  # None = each stage's default
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    num_frames: int | None = None  # base-stage frames; None = the base stage's trained length
    ssr_chunk_frames: int = PAPER_SSR_CHUNK_FRAMES
    fit: str = "crop"  # how the input is fitted to the stage size: crop | pad
    # Weight of the cascade's motion guidance at high noise (motion_guidance.py); 0 = off. A cascade
    # without a fitted motion prior ignores it.
    motion_guidance: float = 1.0
    # A motion edit: the guided layout is the input's middle frame moving the prompt's way, so the
    # object keeps its look and place (motion_guidance.py); False = the base's own estimate.
    motion_from_input: bool = False
    # Noise the pixel SR stages start from: 1 = pure noise (the paper); lower starts from the upsampled
    # previous output (SDEdit), so the SR stage keeps the base's look instead of re-inventing textures.
    # None = the cascade's tuned value (CascadeConfig.sr_strength), else 1.
    sr_strength: float | None = None
    # The TSR keeps its input frames as its output's keyframes at every step (sr_consistency.py), so it
    # adds frames but does not redraw what the base drew; False = the TSR samples freely (the paper).
    sr_consistency: bool = True
    # The unconditional branch of classifier-free guidance ("" = the empty prompt, as before).
    negative_prompt: str = ""
    cfg_mode: str | None = None  # batched | sequential | None = the stage family's default (CFG_MODES above)
    # fp32 here (what every earlier EditConfig JSON meant); a request resolves to request.DEFAULT_PRECISION.
    precision: str = "fp32"

    def __post_init__(self):
        validate_strength(self.strength)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.cfg_mode is not None and self.cfg_mode not in CFG_MODES:
            raise ConfigError(f"guidance mode must be one of {', '.join(CFG_MODES)}, got {self.cfg_mode!r}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"the negative prompt must be text, got {self.negative_prompt!r}")
        if self.sr_strength is not None and not 0.0 < self.sr_strength <= 1.0:
            raise ConfigError(f"SR strength must be in (0, 1] (1 = from pure noise), got {self.sr_strength}")
        if any(int(n) < 1 for n in self.steps):
            raise ConfigError(f"steps must all be >= 1, got {list(self.steps)}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must be in [0, 1], got {self.eta}")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance scale must be >= 1 (1 = off), got {self.guidance_scale}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.ssr_chunk_frames < 1:
            raise ConfigError(f"the SSR chunk must hold >= 1 frame, got {self.ssr_chunk_frames}")
        if not 0.0 <= self.motion_guidance <= 1.0:
            raise ConfigError(f"motion guidance must be in [0, 1] (0 = off), got {self.motion_guidance}")
        if self.fit not in ("crop", "pad"):
            raise ConfigError(f"fit must be 'crop' or 'pad', got {self.fit!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Left out at their defaults: earlier EditConfig JSON, and the rerun keys hashed from it, stay unchanged.
        for key, default in (("negative_prompt", ""), ("cfg_mode", None), ("precision", "fp32")):
            if data[key] == default:
                del data[key]
        return data

    def stage_cfg_mode(self, family: str) -> str:
        if self.cfg_mode is not None:
            return self.cfg_mode
        return "batched" if family == "flow" else "sequential"

    def stage_steps(self, index: int, stage: StageConfig) -> int:
        """One value is every stage's; a list gives one per stage, and stages past its end keep their own."""
        if len(self.steps) == 1:
            return int(self.steps[0])
        return int(self.steps[index]) if index < len(self.steps) else stage.steps

    def stage_sr_strength(self, cascade: CascadeConfig) -> float:
        if self.sr_strength is not None:
            return self.sr_strength
        return 1.0 if cascade.sr_strength is None else cascade.sr_strength

    def stage_eta(self, stage: StageConfig) -> float:
        return stage.eta if self.eta is None else self.eta
