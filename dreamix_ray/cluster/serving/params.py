"""Request fields of every route, validated the same way from a multipart form or a JSON body."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...config import EDIT_TYPES, PAPER_STRENGTH_FINETUNED, PAPER_STRENGTH_NO_FINETUNE, validate_strength
from ...finetune import PRESETS
from ...request import EditRequest
from .jobs import JOB_ID, shown

# Paper Sec. 4.1 / App. A.3: 0.4-0.85 without finetuning, 0.95-1.0 after it.
EDIT_PRESETS = {
    "subtle": {"strength": 0.5},
    "balanced": {"strength": 0.7},
    "strong": {"strength": PAPER_STRENGTH_NO_FINETUNE[1]},
    "finetuned": {"strength": PAPER_STRENGTH_FINETUNED[0], "finetune": "mixed"},
}
NO, YES = {"", "0", "false", "no", "none", "off"}, {"1", "true", "yes", "on"}
TOKEN = re.compile(r"[a-z][a-z0-9]{1,31}")  # fullmatch: `$` would accept a trailing newline
SEED = Field(0, ge=0, le=2**31 - 1, description="random seed; the same seed and inputs give the same output")
STEPS = Field(None, ge=1, description="sampling steps of every stage (default: each stage's own)")
GUIDANCE = Field(None, ge=1, le=50, description="classifier-free guidance scale (1 = off; default: the model's)")
NEGATIVE = Field(None, max_length=500, description="what guidance steers away from (default: the empty prompt)")


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _EditCommon(_Fields):
    """What edits and animations share."""

    prompt: str = Field(min_length=1, max_length=500, description="what the edited video shows")
    preset: Optional[str] = Field(None, description=f"one of {sorted(EDIT_PRESETS)}; explicit fields override it")
    strength: Optional[float] = Field(None, description="noise strength s in [0, 1] (paper Sec. 4.1); default: "
                                      "the model's tuned strength for edit_type, else 0.95 after finetuning, else "
                                      "0.7 (animations 0.8)")
    seed: int = SEED
    steps: Optional[int] = STEPS
    guidance: Optional[float] = GUIDANCE
    negative_prompt: Optional[str] = NEGATIVE
    finetune: Optional[str] = Field(None, description="false, true, a finetune preset (video, mixed, frames) or "
                                                      "the id of a finished /v1/finetunes job")
    edit_type: Optional[str] = Field(None, description=f"what the prompt changes, one of {list(EDIT_TYPES)}: picks the "
                                                       "model's tuned strength for it (unless strength is given); "
                                                       "motion also moves the input's own frame the prompt's way")

    @field_validator("edit_type")
    @classmethod
    def _edit_type(cls, v):
        if v in (None, ""):
            return None
        if v not in EDIT_TYPES:
            raise ValueError(f"edit_type must be one of {', '.join(EDIT_TYPES)}")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v):
        return None if v is None else validate_strength(v)


class EditFields(_EditCommon):
    """POST /v1/edits: a video (file field `video`, or `video_uri`) edited toward `prompt`."""

    video_uri: Optional[str] = Field(None, description="s3://BUCKET/KEY in a configured bucket (JSON bodies)")


class AnimationFields(_EditCommon):
    """POST /v1/animations: an image (file field `image`, or `image_uri`) animated toward `prompt`."""

    image_uri: Optional[str] = Field(None, description="s3://BUCKET/KEY of a png / jpg / webp")
    camera: str = Field("static", description="static, pan-left, pan-right, pan-up, pan-down, zoom-in, zoom-out")


class GenerationFields(_Fields):
    """POST /v1/generations: text-to-video, optionally of a learned subject."""

    prompt: str = Field(min_length=1, max_length=500)
    seed: int = SEED
    steps: Optional[int] = STEPS
    guidance: Optional[float] = GUIDANCE
    negative_prompt: Optional[str] = NEGATIVE
    subject: Optional[str] = Field(None, description="the id of a finished /v1/subjects (or /v1/finetunes) job")


class FinetuneFields(_Fields):
    """POST /v1/finetunes: finetune once on a video (file `video` or `video_uri`), then edit by its id."""

    preset: str = Field("mixed", description="video, mixed or frames (paper App. A.2)")
    steps: Optional[int] = Field(None, ge=1, description="optimizer steps per finetuned stage")
    token: Optional[str] = Field(None, description="the rare word that will name this video in prompts")
    video_uri: Optional[str] = None

    @field_validator("token")
    @classmethod
    def _token(cls, v):
        if v is not None and not TOKEN.fullmatch(v):
            raise ValueError("token must be one lowercase word of 2-32 letters or digits, starting with a letter")
        return v


class SubjectFields(_Fields):
    """POST /v1/subjects: learn a subject from 2 or more images (file field `images`, or `image_uris`)."""

    token: str = Field("naia", description="the rare word that will name the subject in prompts")
    steps: Optional[int] = Field(None, ge=1)
    image_uris: Optional[list[str]] = None

    _token = field_validator("token")(FinetuneFields._token.__func__)


# route kind -> (fields model, file field, media, min files, max files or None for settings.max_images)
ROUTES = {
    "edit": (EditFields, "video", "video", 1, 1),
    "animation": (AnimationFields, "image", "image", 1, 1),
    "generation": (GenerationFields, None, None, 0, 0),
    "finetune": (FinetuneFields, "video", "video", 1, 1),
    "subject": (SubjectFields, "images", "image", 2, None),
}


def uris_of(kind: str, fields: BaseModel) -> list[str]:
    if kind == "subject":
        return list(fields.image_uris or [])
    uri = getattr(fields, "image_uri" if kind == "animation" else "video_uri", None)
    return [uri] if uri else []


def finetune_choice(value: str | None) -> tuple[str, str | None]:
    """('none' | 'preset' | 'job', preset or job id) from the `finetune` field."""
    text = (value or "").strip().lower()
    if text in NO:
        return "none", None
    if text in YES:
        return "preset", "mixed"  # the paper's default recipe
    if text in PRESETS:
        return "preset", text
    if JOB_ID.fullmatch(text) and text[:2] in ("fn", "sj"):
        return "job", text
    raise ValueError(f"finetune must be true, false, a preset ({', '.join(sorted(PRESETS))}) or the id of a "
                     f"finished finetune job, got {shown(value)}")


TASKS = {"edit": "edit", "animation": "animate", "generation": "generate"}  # route kind -> EditRequest task


def edit_request(kind: str, params: dict) -> EditRequest:
    """A job's params (the route's fields, with its finetuning looked up) as the core's EditRequest; the API's
    quality `preset` gives the strength only when neither strength nor edit_type is given."""
    strength = params.get("strength")
    if strength is None and params.get("preset") and not params.get("edit_type"):
        strength = EDIT_PRESETS[params["preset"]].get("strength")
    finetune = params.get("finetune_preset") or params.get("finetuned_with") or (
        "custom" if params.get("finetune_id") else None)
    return EditRequest(prompt=params["prompt"], task=TASKS[kind], strength=strength,
                       edit_type=params.get("edit_type"), finetune=finetune, seed=int(params.get("seed", 0)),
                       steps=(int(params["steps"]),) if params.get("steps") else (),
                       guidance_scale=params.get("guidance"), negative_prompt=params.get("negative_prompt") or "")


def openapi_body(kind: str) -> dict:
    """The request body as OpenAPI: the fields as JSON, or as a multipart form with the file(s)."""
    model, file_field, _, _, max_files = ROUTES[kind]
    schema = model.model_json_schema()
    content = {"application/json": {"schema": schema}}
    if file_field:
        props = {k: v for k, v in schema["properties"].items() if not k.endswith("_uri") and not k.endswith("_uris")}
        binary = {"type": "string", "format": "binary"}
        props[file_field] = {"type": "array", "items": binary} if max_files != 1 else binary
        form = {"type": "object", "properties": props, "required": schema.get("required", []) + [file_field]}
        content = {"multipart/form-data": {"schema": form}, **content}
    return {"requestBody": {"required": True, "content": content}}
