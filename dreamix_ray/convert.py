"""`dreamix convert SRC... -o CASCADE_DIR`: a cascade over diffusers text-to-video repositories.

The first SRC is the base (text-to-video-ms-1.7b, zeroscope_v2_576w); later ones are SSR refiners
(zeroscope_v2_XL). cascade.json refers to their unet/, vae/, scheduler/, text_encoder/ and tokenizer/
folders (absolute paths, or hf:// refs for hub ids); --copy puts them inside the cascade directory,
which then moves as one piece (to S3, to cluster workers). Weights are not read, only configs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# `dreamix convert` (dreamix_ray/cli): this module holds the command's add_arguments and run.
from .config import DEFAULT_REFINE_STRENGTH, DEFAULT_VAE_CHUNK_FRAMES, CascadeConfig, StageConfig
from .errors import UserError
from .models.refs import fetch_from_hub, hf_ref, is_hub_id

CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
                "text_encoder": "config.json", "tokenizer": "tokenizer_config.json"}
# (width, height, frames) each model was trained at, from its model card; matched on the repo name.
KNOWN_MODELS = {
    "text-to-video-ms-1.7b": (256, 256, 16),
    "zeroscope_v2_576w": (576, 320, 24),
    "zeroscope_v2_xl": (1024, 576, 24),
}
DEFAULT_STEPS = 40  # zeroscope's diffusers example; ModelScope's pipeline defaults to 50
DEFAULT_FPS = 8.0


class ConvertError(UserError):
    """A source is not a ModelScope-layout diffusers repository, or an option does not fit it."""


@dataclass
class Source:
    """One diffusers repository: where its configs are read now, and how cascade.json refers to it."""

    label: str
    local: Path
    repo_id: str | None
    revision: str | None
    configs: dict[str, dict]

    @property
    def name(self) -> str:
        return (self.repo_id or str(self.local)).rstrip("/").rsplit("/", 1)[-1]

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    def ref(self, component: str) -> str:
        return hf_ref(self.repo_id, component, self.revision) if self.repo_id else str(self.local / component)

    def component_dir(self, component: str) -> Path:
        """A local folder with all of the component's files (hub weights are downloaded here)."""
        if self.repo_id:
            return fetch_from_hub(self.repo_id, self.revision, [f"{component}/*"]) / component
        return self.local / component


def open_source(src: str) -> Source:
    """Read and check a repository's configs: ModelScope layout (UNet3D + AutoencoderKL + CLIP)."""
    path = Path(src).expanduser()
    repo_id = revision = None
    if path.is_dir():
        local = path.resolve()
    elif is_hub_id(src):
        repo_id, _, revision = src.partition("@")
        revision = revision or None
        local = fetch_from_hub(repo_id, revision, ["model_index.json", *(f"{c}/{f}" for c, f in CONFIG_FILES.items()),
                                                   "tokenizer/*"])
    else:
        raise ConvertError(f"{src} is neither a directory nor a hub id (owner/name[@revision])")
    if not (local / "model_index.json").is_file():
        raise ConvertError(f"{src} has no model_index.json: give a diffusers repository with model_index.json, "
                           "unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    configs = {}
    for component, filename in CONFIG_FILES.items():
        file = local / component / filename
        if not file.is_file():
            raise ConvertError(f"{src} has no {component}/{filename}: not the ModelScope / zeroscope layout")
        configs[component] = json.loads(file.read_text())
    unet_class = configs["unet"].get("_class_name")
    if unet_class not in ("UNet3DConditionModel", "LatentVideoDenoiser"):
        raise ConvertError(f"{src}: unet/ holds a {unet_class}, not a UNet3DConditionModel; only the ModelScope "
                           "layout converts")
    if configs["vae"].get("_class_name") != "AutoencoderKL":
        raise ConvertError(f"{src}: vae/ holds a {configs['vae'].get('_class_name')}, not an AutoencoderKL")
    if configs["unet"].get("in_channels") != configs["vae"].get("latent_channels"):
        raise ConvertError(f"{src}: the UNet takes {configs['unet'].get('in_channels')} channels but the VAE makes "
                           f"{configs['vae'].get('latent_channels')}")
    return Source(src, local, repo_id, revision, configs)


def _size(src: Source, given: str | None) -> tuple[int, int, int | None]:
    """(width, height, trained frames or None) from --size, the known models, or the UNet's sample size."""
    if given:
        try:
            w, h = (int(v) for v in given.lower().split("x"))
        except ValueError:
            raise ConvertError(f"--size {given!r}: write WIDTHxHEIGHT, e.g. 576x320") from None
        return w, h, None
    if src.name.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[src.name.lower()]
    sample = src.configs["unet"].get("sample_size") or 32
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return w * src.vae_scale, h * src.vae_scale, None


def convert(sources: list[str], out: str | Path, sizes: list[str] | None = None, frames: int | None = None,
            fps: float = DEFAULT_FPS, steps: list[int] | None = None, eta: float = 0.0,
            strength: float = DEFAULT_REFINE_STRENGTH, vae_chunk_frames: int = DEFAULT_VAE_CHUNK_FRAMES,
            name: str | None = None, copy: bool = False, force: bool = False) -> CascadeConfig:
    """Write `out`/cascade.json for base + SSR refiner repositories; returns the config written."""
    from .models.cascade import CASCADE_FILE

    out = Path(out)
    if (out / CASCADE_FILE).exists() and not force:
        raise ConvertError(f"{out} already holds a cascade; pass --force to overwrite it")
    srcs = [open_source(s) for s in sources]
    if sizes and len(sizes) != len(srcs):
        raise ConvertError(f"--size takes one WIDTHxHEIGHT per source ({len(srcs)}), got {len(sizes)}")
    steps = list(steps or [DEFAULT_STEPS])
    if len(steps) not in (1, len(srcs)):
        raise ConvertError(f"--steps takes one value or one per source ({len(srcs)}), got {len(steps)}")
    text_dim = srcs[0].configs["text_encoder"].get("hidden_size")
    stages, prev = [], None
    for i, src in enumerate(srcs):
        if src.configs["unet"].get("cross_attention_dim") != text_dim:
            raise ConvertError(f"{src.label}: its UNet reads {src.configs['unet'].get('cross_attention_dim')}-dim "
                               f"text but the base's text encoder makes {text_dim}-dim tokens")
        w, h, trained = _size(src, sizes[i] if sizes else None)
        if w % src.vae_scale or h % src.vae_scale:
            raise ConvertError(f"{src.label}: {w}x{h} is not a multiple of its VAE's {src.vae_scale} pixels per latent")
        frames = frames or trained or 16
        kind = "base" if i == 0 else "ssr"
        latent = {"layout": "modelscope", "vae_chunk_frames": vae_chunk_frames}
        if kind == "ssr":
            latent["strength"] = strength
        if not copy:
            latent.update({c: src.ref(c) for c in ("unet", "vae", "scheduler")})
        factor = 1 if prev is None else max(1, round(max(w / prev[0], h / prev[1])))
        stage_name = "base" if i == 0 else ("ssr" if len(srcs) == 2 else f"ssr{i}")
        stages.append(StageConfig(stage_name, kind, frames=frames, height=h, width=w, fps=fps, factor=factor,
                                  steps=steps[min(i, len(steps) - 1)], eta=eta, finetune=i == 0, latent=latent))
        prev = (w, h)
    tok = srcs[0].configs["tokenizer"]
    max_length = min(int(tok.get("model_max_length") or 77),
                     int(srcs[0].configs["text_encoder"].get("max_position_embeddings") or 77))
    text = {"kind": "clip", "max_length": max_length,
            "attention_mask": bool(srcs[0].configs["text_encoder"].get("use_attention_mask", False)),
            "path": "text_encoder" if copy else srcs[0].ref("text_encoder"),
            "tokenizer": "tokenizer" if copy else srcs[0].ref("tokenizer")}
    config = CascadeConfig(tuple(stages), text, name=name or out.resolve().name, description=(
        f"Converted by `dreamix convert` from {', '.join(s.label for s in srcs)}. The weights keep their "
        "own licence (ModelScope text-to-video-ms-1.7b and zeroscope_v2: CC-BY-NC-4.0, non-commercial); "
        "see docs/REAL_MODELS.md."))
    out.mkdir(parents=True, exist_ok=True)
    if copy:
        _copy_components(srcs, stages, out)
    (out / CASCADE_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return config


def _copy_components(srcs: list[Source], stages: list[StageConfig], out: Path) -> None:
    """The layout the loader prefers: <stage>/ holds the UNet and scheduler, <stage>/vae/ the VAE."""
    for src, sc in zip(srcs, stages):
        for component, dest in (("unet", out / sc.name), ("scheduler", out / sc.name), ("vae", out / sc.name / "vae")):
            shutil.copytree(src.component_dir(component), dest, dirs_exist_ok=True)
    for component in ("text_encoder", "tokenizer"):
        shutil.copytree(srcs[0].component_dir(component), out / component, dirs_exist_ok=True)


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="diffusers text-to-video repositories (dirs, or hub ids owner/name[@revision]): the "
                        "first is the base, later ones are SSR refiners (e.g. zeroscope_v2_576w zeroscope_v2_XL)")
    p.add_argument("-o", "--output", required=True, metavar="CASCADE_DIR")
    p.add_argument("--size", nargs="+", default=None, metavar="WxH",
                   help="one size per source (default: the size the known models were trained at)")
    p.add_argument("--frames", type=int, default=None, help="clip length (default: the base's trained length)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS)
    p.add_argument("--steps", type=int, nargs="+", default=None, help=f"DDIM steps, one or per source "
                                                                      f"(default {DEFAULT_STEPS})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0, as these models' pipelines)")
    p.add_argument("--strength", type=float, default=DEFAULT_REFINE_STRENGTH,
                   help="SDEdit strength of the SSR refiners (zeroscope_v2_XL's card: 0.66-0.85)")
    p.add_argument("--vae-chunk-frames", type=int, default=DEFAULT_VAE_CHUNK_FRAMES,
                   help="frames per VAE call (lower it if decoding runs out of memory)")
    p.add_argument("--name", default=None)
    p.add_argument("--copy", action="store_true", help="copy the components into CASCADE_DIR (self-contained)")
    p.add_argument("--force", action="store_true", help="overwrite an existing cascade.json")


def run(args) -> int:
    config = convert(args.sources, args.output, args.size, args.frames, args.fps, args.steps, args.eta,
                     args.strength, args.vae_chunk_frames, args.name, args.copy, args.force)
    for s in config.stages:
        print(f"{s.name}: {s.kind}, {s.frames} frames of {s.width}x{s.height} @ {s.fps:g} fps, {s.steps} steps")
    print(f"wrote {Path(args.output) / 'cascade.json'}; these models want guidance, e.g. "
          f"`dreamix edit IN.mp4 -p PROMPT --model {args.output} --guidance 9`")
    return 0
