"""What a user asks for (EditRequest) and what the cascade runs (EditPlan): the one place an edit is resolved.

Every entry point (`dreamix edit`, animate, generate, the demo, a batch manifest row, a Serve JSON or form
body, an eval case) only translates its own format into an EditRequest; `resolve` applies the one rule
below against the cascade's config. The result is a frozen EditPlan: the resolved EditConfig (what
travels between processes, as JSON) and, per stage, its steps, timestep cut, start strength and chunks.

The rule (quoted in the README and the API docs):
- strength: the request's own; else, with an edit type, the cascade's tuned strength for that type and
  finetuning (`edit_strengths`: table "none" without finetuning, the preset's table after finetuning
  with a preset that has one, else "mixed", the paper's recipe); else 0.95 after finetuning (paper
  Sec. 4.1); else 0.7 for an edit and 0.8 for an animation. Text-to-video is always strength 1.
- motion from the input: as asked (on or off); unsaid, implied by edit type "motion" (never for
  text-to-video).
- steps: none = each stage's own; one value = every stage; a list = one per stage in cascade order
  (stages past its end keep their own).
- guidance: the request's own; else the cascade's (`guidance_scale` in cascade.json, which `dreamix
  convert` sets for text-to-video models); else 1, off (the paper).
- precision: the request's own; else DEFAULT_PRECISION.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import (DEFAULT_REFINE_STRENGTH, EDIT_TYPES, PAPER_SSR_CHUNK_FRAMES, PAPER_STRENGTH_FINETUNED,
                     STRENGTH_PRESETS, CascadeConfig, ConfigError, EditConfig, StageConfig, validate_strength)
from .sampling import kept_steps

TASKS = ("edit", "animate", "generate")
# Strength without finetuning when the cascade has no tuned strength for the request: the middle of the
# paper's 0.4-0.85 for edits; animations start from a still image and need more noise to move.
DEFAULT_STRENGTH = {"edit": 0.7, "animate": 0.8}
# The stage networks' arithmetic when a request names none (config.PRECISIONS).
DEFAULT_PRECISION = "fp32"


def strength_table(finetune: str | None) -> str:
    """Which `edit_strengths` table applies: none, the preset's own, else mixed (the paper's recipe)."""
    if not finetune:
        return "none"
    return finetune if finetune in STRENGTH_PRESETS and finetune != "none" else "mixed"


@dataclass(frozen=True)
class EditRequest:
    """What a user asks for, before the cascade's defaults are applied; invalid values fail here, before
    any model loads."""

    prompt: str
    task: str = "edit"  # edit | animate | generate
    strength: float | None = None  # None: the rule in this module's docstring
    edit_type: str | None = None  # one of config.EDIT_TYPES
    # The finetuning the cascade had (or will have) for this edit: a preset name, "custom" for an artifact
    # of unknown recipe, None for none.
    finetune: str | None = None
    seed: int = 0
    steps: tuple[int, ...] = ()
    eta: float | None = None
    guidance_scale: float | None = None  # None: the cascade's, else 1 (off)
    num_frames: int | None = None
    fit: str = "crop"
    motion_guidance: float = 1.0
    motion_from_input: bool | None = None  # None: the rule (on for motion edits)
    sr_strength: float | None = None
    sr_consistency: bool = True
    ssr_chunk_frames: int = PAPER_SSR_CHUNK_FRAMES
    negative_prompt: str = ""  # classifier-free guidance's unconditional text
    cfg_mode: str | None = None  # batched | sequential | None = the stage family's (config.CFG_MODES)
    precision: str | None = None  # fp32 | bf16 | fp16 | None = DEFAULT_PRECISION

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.edit_type is not None and self.edit_type not in EDIT_TYPES:
            raise ConfigError(f"unknown edit type {self.edit_type!r}; use one of {', '.join(EDIT_TYPES)}")
        if self.strength is not None:
            validate_strength(self.strength)
        object.__setattr__(self, "steps", tuple(int(n) for n in self.steps))
        self._config(0.7, False, 1.0 if self.guidance_scale is None else self.guidance_scale)  # the range checks

    def _config(self, strength: float, motion_from_input: bool, guidance_scale: float) -> EditConfig:
        return EditConfig(strength=strength, seed=self.seed, steps=self.steps, eta=self.eta,
                          guidance_scale=guidance_scale, num_frames=self.num_frames,
                          ssr_chunk_frames=self.ssr_chunk_frames, fit=self.fit, motion_guidance=self.motion_guidance,
                          motion_from_input=motion_from_input, sr_strength=self.sr_strength,
                          sr_consistency=self.sr_consistency, negative_prompt=self.negative_prompt,
                          cfg_mode=self.cfg_mode, precision=self.precision or DEFAULT_PRECISION)


def resolve_strength(request: EditRequest, cascade: CascadeConfig) -> float:
    """The request's strength under the module's rule."""
    if request.task == "generate":
        return 1.0
    if request.strength is not None:
        return float(request.strength)
    if request.edit_type:
        tuned = cascade.strength_for(request.edit_type, strength_table(request.finetune))
        if tuned is not None:
            return float(tuned)
    if request.finetune:
        return PAPER_STRENGTH_FINETUNED[0]
    return DEFAULT_STRENGTH[request.task]


def resolve(request: EditRequest, cascade: CascadeConfig) -> "EditPlan":
    """The one resolver: a request and a cascade config -> the frozen plan every runner executes."""
    if len(request.steps) > len(cascade.stages):
        raise ConfigError(f"steps: {len(request.steps)} values for a cascade of {len(cascade.stages)} stages "
                          f"({', '.join(s.name for s in cascade.stages)}); give one value, or one per stage")
    asked = request.motion_from_input
    from_input = request.task != "generate" and (request.edit_type == "motion" if asked is None else asked)
    guidance = request.guidance_scale if request.guidance_scale is not None else (cascade.guidance_scale or 1.0)
    return EditPlan.of(request._config(resolve_strength(request, cascade), from_input, float(guidance)), cascade)


def chunk_bounds(num_frames: int, chunk_frames: int) -> tuple[tuple[int, int], ...]:
    """Frame ranges of the last SSR's input chunks (paper App. A.1: 32 frames each)."""
    return tuple((s, min(s + chunk_frames, num_frames)) for s in range(0, num_frames, chunk_frames))


@dataclass(frozen=True)
class StagePlan:
    """What one cascade stage runs in an edit."""

    index: int
    name: str
    kind: str
    steps: int  # the schedule's length
    start_strength: float  # base: the edit's s; pixel SR: sr_strength; latent SSR: its refine strength
    sampled_steps: int  # the timestep cut: the last `sampled_steps` of `steps` run
    eta: float
    frames: int  # frames of the stage's input (latent frames for a stage that takes latents: LTX's SR stages)
    chunks: tuple[tuple[int, int], ...]  # input frame ranges sampled one at a time (the last SSR's), else one
    from_noise: bool  # an SR stage that starts from pure noise (no SDEdit start)
    halo: int = 0  # input frames of context sampled on each side of a chunk and dropped after decoding

    def chunk_input(self, chunk: int) -> tuple[int, int]:
        """The input frames chunk `chunk` samples: its own range plus the halo on each side, within the clip."""
        lo, hi = self.chunks[chunk]
        return max(0, lo - self.halo), min(self.frames, hi + self.halo)

    def chunk_halo(self, chunk: int) -> tuple[int, int]:
        """(left, right) frames of `chunk_input(chunk)` that are context, not the chunk's own output."""
        (lo, hi), (a, b) = self.chunks[chunk], self.chunk_input(chunk)
        return lo - a, b - hi


def _start_strength(index: int, stage: StageConfig, cfg: EditConfig, cascade: CascadeConfig) -> float:
    if index == 0:
        return cfg.strength
    if stage.latent is not None:  # a latent SSR (zeroscope_v2_XL) refines the upscaled output by SDEdit
        return float(stage.latent.get("strength", DEFAULT_REFINE_STRENGTH))
    return cfg.stage_sr_strength(cascade)


def _halo(stage: StageConfig) -> int:
    """Context frames each side of a last-stage chunk: cascade.json's `chunk_halo`; at least 1 for latent chunks,
    since a causal VAE decodes a chunk's first latent frame as one pixel frame unless the frame before it is there."""
    halo = int((stage.latent or {}).get("chunk_halo", 0))
    return max(1, halo) if stage.latent_input else halo


@dataclass(frozen=True)
class EditPlan:
    """A resolved edit: the EditConfig every process receives, and each stage's part of it."""

    config: EditConfig
    stages: tuple[StagePlan, ...]

    @classmethod
    def of(cls, cfg: EditConfig, cascade: CascadeConfig) -> "EditPlan":
        """The stage plans of a resolved EditConfig (a pure function: any process rebuilds the same plan)."""
        frames, plans, last = cfg.num_frames or cascade.stages[0].frames, [], len(cascade.stages) - 1
        for index, stage in enumerate(cascade.stages):
            steps, start = cfg.stage_steps(index, stage), _start_strength(index, stage, cfg, cascade)
            chunked = index == last and stage.kind == "ssr"  # the paper chunks only the final SSR
            # A stage taking latents counts (and chunks) its input in latent frames: 32 pixel frames are 4 of LTX's.
            t = stage.temporal_compression if stage.latent_input else 1
            units = (frames - 1) // t + 1 if t > 1 else frames
            chunks = chunk_bounds(units, max(1, cfg.ssr_chunk_frames // t)) if chunked else ((0, units),)
            plans.append(StagePlan(index, stage.name, stage.kind, steps, start, kept_steps(steps, start),
                                   cfg.stage_eta(stage), units, chunks,
                                   from_noise=index > 0 and stage.latent is None and start >= 1.0,
                                   halo=_halo(stage) if chunked else 0))
            if stage.kind == "tsr":  # a causal (latent) TSR keeps its first frame: F -> factor (F - 1) + 1
                frames = stage.factor * (frames - 1) + 1 if stage.latent_input else frames * stage.factor
        return cls(cfg, tuple(plans))

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any], cascade: CascadeConfig) -> "EditPlan":
        return cls.of(EditConfig.from_dict(data), cascade)

    def replace(self, cascade: CascadeConfig, **changes) -> "EditPlan":
        return EditPlan.of(dataclasses.replace(self.config, **changes), cascade)
