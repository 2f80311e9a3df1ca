"""`dreamix convert SRC... -o CASCADE_DIR`: a cascade over diffusers text-to-video repositories.

Two layouts. ModelScope: the first SRC is the base (text-to-video-ms-1.7b, zeroscope_v2_576w), later ones are
SSR refiners (zeroscope_v2_XL), each with unet/, vae/, scheduler/, text_encoder/ and tokenizer/. Wan (WanPipeline:
Wan2.1-T2V-1.3B / 14B, Wan2.2-TI2V-5B): one SRC with transformer/ instead of unet/, a flow-matching base stage;
Wan2.2-T2V-A14B adds transformer_2/ and model_index.json's boundary_ratio: one base stage holding both experts.
cascade.json refers to their folders (absolute paths, or hf:// refs for hub ids); --copy puts them inside the
cascade directory, which then moves as one piece (to S3, to cluster workers). Weights are not read, only configs.
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
WAN_FILES = {"transformer" if k == "unet" else k: v for k, v in CONFIG_FILES.items()}
# Wan: (width, height, frames, fps) from the model cards; 4k + 1 frames.
KNOWN_WAN = {
    "wan2.1-t2v-1.3b-diffusers": (832, 480, 81, 16.0),
    "wan2.1-t2v-14b-diffusers": (1280, 720, 81, 16.0),
    "wan2.2-ti2v-5b-diffusers": (1280, 704, 121, 24.0),
    "wan2.2-t2v-a14b-diffusers": (1280, 720, 81, 16.0),
}
# What the two experts of a Wan2.2 A14B pair must share to take turns on one latent: its channels, patch and text.
EXPERT_KEYS = ("in_channels", "out_channels", "patch_size", "text_dim")
WAN_STEPS, WAN_TEXT_LENGTH = 50, 512  # WanPipeline's defaults
# (width, height, frames) each model was trained at, from its model card; matched on the repo name.
KNOWN_MODELS = {
    "text-to-video-ms-1.7b": (256, 256, 16),
    "zeroscope_v2_576w": (576, 320, 24),
    "zeroscope_v2_xl": (1024, 576, 24),
}
DEFAULT_STEPS = 40  # zeroscope's diffusers example; ModelScope's pipeline defaults to 50
DEFAULT_FPS = 8.0
DEFAULT_WAN = (832, 480, 81, 16.0)  # Wan2.1-T2V-1.3B's 480p
# Classifier-free guidance a converted cascade's edits use unless they say (CascadeConfig.guidance_scale):
# WanPipeline's default, and the ModelScope / zeroscope pipelines'.
WAN_GUIDANCE, MODELSCOPE_GUIDANCE = 5.0, 9.0


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
    layout: str = "modelscope"  # or "wan"
    boundary_ratio: float | None = None  # Wan2.2 A14B: where its low-noise expert (transformer_2/) takes over

    @property
    def denoiser(self) -> str:
        """The folder holding the denoising network."""
        return "transformer" if self.layout == "wan" else "unet"

    @property
    def name(self) -> str:
        return (self.repo_id or str(self.local)).rstrip("/").rsplit("/", 1)[-1]

    @property
    def vae_scale(self) -> int:
        if self.layout == "wan":  # pixels per latent x the transformer's spatial patch
            return int(self.configs["vae"].get("scale_factor_spatial") or 8) * int(
                self.configs["transformer"].get("patch_size", [1, 2, 2])[1])
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
        files = {f"{c}/{f}" for c, f in (*CONFIG_FILES.items(), *WAN_FILES.items(), ("transformer_2", "config.json"))}
        local = fetch_from_hub(repo_id, revision, ["model_index.json", *sorted(files), "tokenizer/*"])
    else:
        raise ConvertError(f"{src} is neither a directory nor a hub id (owner/name[@revision])")
    if not (local / "model_index.json").is_file():
        raise ConvertError(f"{src} has no model_index.json: give a diffusers repository with model_index.json, "
                           "unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    index = json.loads((local / "model_index.json").read_text())
    pipeline = str(index.get("_class_name", ""))
    layout = "wan" if pipeline.startswith("Wan") else "ltx" if pipeline.startswith("LTX") else "modelscope"
    configs = {}
    for component, filename in (CONFIG_FILES if layout == "modelscope" else WAN_FILES).items():
        file = local / component / filename
        if not file.is_file():
            raise ConvertError(f"{src} has no {component}/{filename}: not the "
                               f"{ {'wan': 'Wan', 'ltx': 'LTX-Video'}.get(layout, 'ModelScope / zeroscope')} layout")
        configs[component] = json.loads(file.read_text())
    if layout == "ltx":
        from .convert_ltx import check_ltx_source

        check_ltx_source(src, index, configs)
        return Source(src, local, repo_id, revision, configs, layout)
    if layout == "wan":
        if (local / "transformer_2" / "config.json").is_file():  # Wan2.2 A14B's low-noise expert
            configs["transformer_2"] = json.loads((local / "transformer_2" / "config.json").read_text())
        check_wan_source(src, index, configs)
        return Source(src, local, repo_id, revision, configs, layout, index.get("boundary_ratio"))
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


def check_wan_source(src: str, index: dict, configs: dict[str, dict]) -> None:
    """A Wan text-to-video repository: one WanTransformer3DModel over an AutoencoderKLWan's latents, UMT5 text."""
    if index.get("_class_name") != "WanPipeline":
        raise ConvertError(f"{src}: a {index.get('_class_name')} repository; only text-to-video Wan (WanPipeline) "
                           "converts")
    classes = {c: configs[c].get("_class_name") for c in ("transformer", "vae")}
    if classes != {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan"}:
        raise ConvertError(f"{src}: transformer/ and vae/ hold {classes['transformer']} and {classes['vae']}, not "
                           "WanTransformer3DModel and AutoencoderKLWan")
    t, vae = configs["transformer"], configs["vae"]
    if t.get("in_channels") != vae.get("z_dim", 16):
        raise ConvertError(f"{src}: the transformer takes {t.get('in_channels')} channels but the VAE makes "
                           f"{vae.get('z_dim', 16)}; image-to-video or mismatched transformer/ and vae/")
    if t.get("text_dim", 4096) != configs["text_encoder"].get("d_model"):
        raise ConvertError(f"{src}: the transformer reads {t.get('text_dim', 4096)}-dim text but text_encoder/ makes "
                           f"{configs['text_encoder'].get('d_model')}-dim tokens")
    check_wan_experts(src, index, configs)


def check_wan_experts(src: str, index: dict, configs: dict[str, dict]) -> None:
    """A Wan2.2 A14B pair, if any: transformer_2/ and boundary_ratio come together, and the experts share the latents
    and text they read (EXPERT_KEYS)."""
    boundary, listed = index.get("boundary_ratio"), (index.get("transformer_2") or [None])[0] is not None
    if boundary is None:
        if listed or "transformer_2" in configs:
            raise ConvertError(f"{src}: transformer_2/ but no boundary_ratio in model_index.json, so when each expert "
                               "runs is unknown; add the model's boundary_ratio (Wan2.2-T2V-A14B: 0.875)")
        return
    if "transformer_2" not in configs:
        raise ConvertError(f"{src}: boundary_ratio {boundary} in model_index.json but no transformer_2/config.json; "
                           "a two-expert Wan needs its low-noise transformer")
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary < 1:
        raise ConvertError(f"{src}: boundary_ratio {boundary!r} in model_index.json; it must be a number in (0, 1)")
    t, t2 = configs["transformer"], configs["transformer_2"]
    if t2.get("_class_name") != "WanTransformer3DModel":
        raise ConvertError(f"{src}: transformer_2/ holds a {t2.get('_class_name')}, not a WanTransformer3DModel")
    differ = [k for k in EXPERT_KEYS if t.get(k) != t2.get(k)]
    if differ:
        raise ConvertError(f"{src}: transformer/ and transformer_2/ differ in {', '.join(differ)} "
                           f"({', '.join(f'{t.get(k)} vs {t2.get(k)}' for k in differ)}); the two experts must read "
                           "and write the same latents and text")


def _wan_convert(src: Source, out: Path, size: str | None, frames: int | None, fps: float | None,
                 steps: int | None, eta: float, name: str | None, copy: bool) -> CascadeConfig:
    """The cascade of one Wan repository: a flow-matching latent base stage (models/wan.py)."""
    w, h, trained, known_fps = KNOWN_WAN.get(src.name.lower(), DEFAULT_WAN)
    if size:
        w, h, _ = _size(src, size)
    frames = frames or trained
    t_factor = int(src.configs["vae"].get("scale_factor_temporal") or 4)
    if w % src.vae_scale or h % src.vae_scale:
        raise ConvertError(f"{src.label}: {w}x{h} is not a multiple of {src.vae_scale} (VAE pixels per latent x patch)")
    if frames % t_factor != 1:
        raise ConvertError(f"--frames {frames}: Wan needs {t_factor}k + 1 frames (e.g. 49 or 81)")
    experts = src.boundary_ratio is not None  # Wan2.2 A14B: transformer_2/ runs below the boundary (models/wan.py)
    latent = {"layout": "wan"}
    if not copy:
        latent.update({c: src.ref(c) for c in ("transformer", "vae", "scheduler") + ("transformer_2",) * experts})
    if experts:
        latent["boundary_ratio"] = float(src.boundary_ratio)
    stage = StageConfig("base", "base", frames=frames, height=h, width=w, fps=fps or known_fps,
                        steps=steps or WAN_STEPS, eta=eta, finetune=True, latent=latent)
    text = {"kind": "umt5", "max_length": WAN_TEXT_LENGTH, "path": "text_encoder" if copy else src.ref("text_encoder"),
            "tokenizer": "tokenizer" if copy else src.ref("tokenizer")}
    return CascadeConfig((stage,), text, name=name or out.resolve().name, description=(
        f"Converted by `dreamix convert` from {src.label} (Wan, flow matching{', two experts' * experts}). The weights "
        "keep their own licence (Wan 2.1 / 2.2: Apache-2.0); see docs/REAL_MODELS.md."), guidance_scale=WAN_GUIDANCE)


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
            fps: float | None = None, steps: list[int] | None = None, eta: float = 0.0,
            strength: float | None = None, vae_chunk_frames: int = DEFAULT_VAE_CHUNK_FRAMES,
            name: str | None = None, copy: bool = False, force: bool = False, tsr: str | None = None,
            ssr: str | None = None) -> CascadeConfig:
    """Write `out`/cascade.json for base + SSR refiner repositories (or an LTX base + latent upsamplers `tsr`,
    `ssr`); returns the config written."""
    from .models.cascade import CASCADE_FILE

    out = Path(out)
    if (out / CASCADE_FILE).exists() and not force:
        raise ConvertError(f"{out} already holds a cascade; pass --force to overwrite it")
    srcs = [open_source(s) for s in sources]
    if (tsr or ssr) and not (len(srcs) == 1 and srcs[0].layout == "ltx"):
        raise ConvertError("--tsr / --ssr take LTX latent upsamplers and need one LTX-Video repository as SRC")
    if any(s.layout == "ltx" for s in srcs):
        from .convert_ltx import copy_folders, ltx_convert

        if len(srcs) != 1 or len(sizes or ()) > 1:
            raise ConvertError("an LTX repository converts alone, with its upsamplers as --tsr / --ssr, and one --size")
        config, copies = ltx_convert(srcs[0], out, tsr, ssr, (sizes or [None])[0], frames, fps, steps, eta, strength,
                                     name, copy)
        copy_folders(copies)
        return _write(config, [], out / CASCADE_FILE, copy=False)
    strength = DEFAULT_REFINE_STRENGTH if strength is None else strength
    if any(s.layout == "wan" for s in srcs):
        if len(srcs) != 1:
            raise ConvertError("a Wan repository converts alone (one base stage); give just its directory")
        if len(sizes or ()) > 1 or len(steps or ()) > 1:
            raise ConvertError("--size and --steps take one value for a Wan repository")
        config = _wan_convert(srcs[0], out, (sizes or [None])[0], frames, fps, (steps or [None])[0], eta, name, copy)
        return _write(config, srcs, out / CASCADE_FILE, copy)
    fps = DEFAULT_FPS if fps is None else fps
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
        "see docs/REAL_MODELS.md."), guidance_scale=MODELSCOPE_GUIDANCE)
    return _write(config, srcs, out / CASCADE_FILE, copy)


def _write(config: CascadeConfig, srcs: list[Source], target: Path, copy: bool) -> CascadeConfig:
    """Write cascade.json (`target`), after copying the components next to it with --copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        _copy_components(srcs, config.stages, target.parent)
    target.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return config


def _copy_components(srcs: list[Source], stages: tuple[StageConfig, ...], out: Path) -> None:
    """The layout the loader prefers: <stage>/ holds the denoiser and scheduler, <stage>/vae/ the VAE."""
    for src, sc in zip(srcs, stages):
        parts = [(src.denoiser, out / sc.name), ("scheduler", out / sc.name), ("vae", out / sc.name / "vae")]
        if "transformer_2" in src.configs:  # Wan2.2 A14B's low-noise expert, where models/wan.py looks first
            parts.append(("transformer_2", out / sc.name / "transformer_2"))
        for component, dest in parts:
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
    p.add_argument("--fps", type=float, default=None, help=f"output fps (default: Wan's card, else {DEFAULT_FPS:g})")
    p.add_argument("--steps", type=int, nargs="+", default=None, help=f"sampling steps, one or per source "
                                                                      f"(default {DEFAULT_STEPS}; Wan {WAN_STEPS})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM / flow eta (default 0, as these models' pipelines)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"SDEdit strength of the SSR refiners (default {DEFAULT_REFINE_STRENGTH}; zeroscope_v2_XL's card: "
                        "0.66-0.85) or of LTX's refine passes (default 0.4; 1 = from pure noise)")
    p.add_argument("--tsr", default=None, metavar="UPSAMPLER_REPO",
                   help="LTX: a temporal latent upsampler (e.g. Lightricks/ltxv-temporal-upscaler-0.9.7) as the TSR")
    p.add_argument("--ssr", default=None, metavar="UPSAMPLER_REPO",
                   help="LTX: a spatial latent upsampler (e.g. Lightricks/ltxv-spatial-upscaler-0.9.7) as the SSR")
    p.add_argument("--vae-chunk-frames", type=int, default=DEFAULT_VAE_CHUNK_FRAMES,
                   help="frames per VAE call (lower it if decoding runs out of memory)")
    p.add_argument("--name", default=None)
    p.add_argument("--copy", action="store_true", help="copy the components into CASCADE_DIR (self-contained)")
    p.add_argument("--force", action="store_true", help="overwrite an existing cascade.json")


def run(args) -> int:
    config = convert(args.sources, args.output, args.size, args.frames, args.fps, args.steps, args.eta,
                     args.strength, args.vae_chunk_frames, args.name, args.copy, args.force, args.tsr, args.ssr)
    for s in config.stages:
        print(f"{s.name}: {s.kind}, {s.frames} frames of {s.width}x{s.height} @ {s.fps:g} fps, {s.steps} steps")
    print(f"wrote {Path(args.output) / 'cascade.json'}; edits use guidance {config.guidance_scale:g} unless they "
          f"say (`dreamix edit IN.mp4 -p PROMPT --model {args.output} [--guidance G]`)")
    return 0
