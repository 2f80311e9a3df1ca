"""`dreamix convert LTX_REPO [--tsr UPSAMPLER] [--ssr UPSAMPLER]`: an LTX-Video cascade (models/ltx.py).

base (LTXVideoTransformer3DModel + AutoencoderKLLTXVideo + T5), then an optional latent TSR (a temporal
LTXLatentUpsamplerModel), then an optional latent SSR (a spatial one). Each SR stage is its upsampler followed by
a refine pass of the base's transformer from the stage's start strength (`latent.strength`, default
LTX_REFINE_STRENGTH, diffusers' multi-scale LTX example; 1 = from pure noise). Configs only, like convert.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import CascadeConfig, StageConfig
from .convert import ConvertError, Source
from .models.refs import fetch_from_hub, hf_ref, is_hub_id

LTX_PIPELINES = ("LTXPipeline", "LTXConditionPipeline")  # text-to-video over the same transformer
LTX_SIZE, LTX_FRAMES, LTX_FPS = (704, 480), 161, 25.0  # LTXPipeline's defaults
LTX_STEPS, LTX_REFINE_STEPS, LTX_REFINE_STRENGTH = 50, 10, 0.4  # the refine pass: diffusers' LTX 0.9.7 example
LTX_GUIDANCE, LTX_TEXT_LENGTH, LTX_CHUNK_HALO = 3.0, 128, 1  # LTXPipeline's guidance and max_sequence_length


def vae_ratios(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of an AutoencoderKLLTXVideo config, as the model computes them."""
    scaling = sum(bool(v) for v in vae.get("spatio_temporal_scaling", (True, True, True, False)))
    spatial = vae.get("spatial_compression_ratio") or int(vae.get("patch_size", 4)) * 2 ** scaling
    temporal = vae.get("temporal_compression_ratio") or int(vae.get("patch_size_t", 1)) * 2 ** scaling
    return int(spatial), int(temporal)


def check_ltx_source(src: str, index: dict, configs: dict[str, dict]) -> None:
    if index.get("_class_name") not in LTX_PIPELINES:
        raise ConvertError(f"{src}: a {index.get('_class_name')} repository; only text-to-video LTX "
                           f"({' or '.join(LTX_PIPELINES)}) converts")
    t, vae = configs["transformer"], configs["vae"]
    if (t.get("_class_name"), vae.get("_class_name")) != ("LTXVideoTransformer3DModel", "AutoencoderKLLTXVideo"):
        raise ConvertError(f"{src}: transformer/ and vae/ hold {t.get('_class_name')} and {vae.get('_class_name')}, "
                           "not LTXVideoTransformer3DModel and AutoencoderKLLTXVideo")
    if t.get("in_channels") != vae.get("latent_channels", 128):
        raise ConvertError(f"{src}: the transformer takes {t.get('in_channels')} channels but the VAE makes "
                           f"{vae.get('latent_channels', 128)}")
    if t.get("caption_channels", 4096) != configs["text_encoder"].get("d_model"):
        raise ConvertError(f"{src}: the transformer reads {t.get('caption_channels', 4096)}-dim text but "
                           f"text_encoder/ makes {configs['text_encoder'].get('d_model')}-dim tokens")


def _upsampler(given: str, role: str, base: Source) -> tuple[Path, str]:
    """(local folder holding latent_upsampler/, how cascade.json refers to latent_upsampler/), checked against the
    base's VAE and the role (--tsr temporal, --ssr spatial)."""
    path = Path(given).expanduser()
    repo_id = None
    if path.is_dir():
        local = path.resolve()
    elif is_hub_id(given):
        repo_id = given.partition("@")[0]
        local = fetch_from_hub(repo_id, given.partition("@")[2] or None,
                               ["model_index.json", "latent_upsampler/*", "vae/config.json"])
    else:
        raise ConvertError(f"--{role} {given}: neither a directory nor a hub id (owner/name[@revision])")
    folder = local / "latent_upsampler"
    file = folder / "config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    if config.get("_class_name") != "LTXLatentUpsamplerModel":
        raise ConvertError(f"--{role} {given}: no latent_upsampler/config.json of an LTXLatentUpsamplerModel; give an "
                           "LTX upsampler repository (e.g. Lightricks/ltxv-spatial-upscaler-0.9.7)")
    spatial, temporal = bool(config.get("spatial_upsample", True)), bool(config.get("temporal_upsample", False))
    if spatial and temporal:
        raise ConvertError(f"--{role} {given}: upsamples space and time at once; give a spatial upsampler as --ssr "
                           "and a temporal one as --tsr")
    if role == "ssr" and temporal:
        raise ConvertError(f"--ssr {given} is a temporal upsampler (temporal_upsample); give it as --tsr")
    if role == "tsr" and spatial:
        raise ConvertError(f"--tsr {given} is a spatial upsampler (spatial_upsample); give it as --ssr")
    latent = base.configs["vae"].get("latent_channels", 128)
    if config.get("in_channels", 128) != latent:
        raise ConvertError(f"--{role} {given}: reads {config.get('in_channels', 128)}-channel latents but the base's "
                           f"VAE makes {latent}; use the upsampler released with this LTX model")
    own_vae = local / "vae" / "config.json"
    if own_vae.is_file():
        theirs, ours = json.loads(own_vae.read_text()), base.configs["vae"]
        differ = sorted(k for k in set(theirs) | set(ours) if not k.startswith("_") and theirs.get(k) != ours.get(k))
        if differ:
            raise ConvertError(f"--{role} {given}: its VAE does not match the base's ({', '.join(differ[:4])} "
                               "differ); use the upsampler released with this LTX model")
    ref = hf_ref(repo_id, "latent_upsampler", None) if repo_id else str(folder)
    return folder, ref


def ltx_convert(src: Source, out: Path, tsr: str | None, ssr: str | None, size: str | None, frames: int | None,
                fps: float | None, steps: list[int] | None, eta: float, strength: float | None,
                name: str | None, copy: bool) -> tuple[CascadeConfig, list[tuple[Path, Path]]]:
    """The LTX cascade config and, with --copy, the (source, destination) folders to copy."""
    spatial, temporal = vae_ratios(src.configs["vae"])
    w, h = LTX_SIZE
    if size:
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ConvertError(f"--size {size!r}: write WIDTHxHEIGHT, e.g. 704x480") from None
    frames, fps = frames or LTX_FRAMES, fps or LTX_FPS
    if w % spatial or h % spatial:
        raise ConvertError(f"--size {w}x{h}: LTX's VAE needs a multiple of {spatial} pixels on each side")
    if frames % temporal != 1:
        raise ConvertError(f"--frames {frames}: LTX's VAE takes {temporal}k + 1 frames (e.g. {temporal * 12 + 1} or "
                           f"{temporal * 20 + 1})")
    ups = [(role, *_upsampler(given, role, src)) for role, given in (("tsr", tsr), ("ssr", ssr)) if given]
    steps = list(steps or [])
    if len(steps) > 1 + len(ups):
        raise ConvertError(f"--steps takes one value or one per stage ({1 + len(ups)}), got {len(steps)}")
    per_stage = [steps[0] if steps else LTX_STEPS] + [
        steps[min(i, len(steps) - 1)] if len(steps) > 1 else LTX_REFINE_STEPS for i in range(1, 1 + len(ups))]
    shared = {c: (("base/vae" if c == "vae" else "base") if copy else src.ref(c))
              for c in ("transformer", "vae", "scheduler")}
    stages = [StageConfig("base", "base", frames=frames, height=h, width=w, fps=fps, steps=per_stage[0], eta=eta,
                          finetune=True, latent={"layout": "ltx", **({} if copy else shared)})]
    copies = [(src.component_dir("transformer"), out / "base"), (src.component_dir("scheduler"), out / "base"),
              (src.component_dir("vae"), out / "base" / "vae")]
    for i, (role, folder, ref) in enumerate(ups, start=1):
        if role == "tsr":
            frames, fps = 2 * (frames - 1) + 1, 2 * fps
        else:
            w, h = 2 * w, 2 * h
        latent = {"layout": "ltx", "input": "latents", "temporal_compression": temporal,
                  "strength": LTX_REFINE_STRENGTH if strength is None else strength, "chunk_halo": LTX_CHUNK_HALO,
                  **shared, "upsampler": role + "/latent_upsampler" if copy else ref}
        stages.append(StageConfig(role, role, frames=frames, height=h, width=w, fps=fps, factor=2,
                                  steps=per_stage[i], eta=eta, latent=latent))
        copies.append((folder, out / role / "latent_upsampler"))
    text = {"kind": "t5", "max_length": LTX_TEXT_LENGTH, "attention_mask": False, "pooled": "mask",
            "path": "text_encoder" if copy else src.ref("text_encoder"),
            "tokenizer": "tokenizer" if copy else src.ref("tokenizer")}
    copies += [(src.component_dir(c), out / c) for c in ("text_encoder", "tokenizer")]
    config = CascadeConfig(tuple(stages), text, name=name or out.resolve().name, description=(
        f"Converted by `dreamix convert` from {src.label}{''.join(f', {r} {g}' for r, g in (('tsr', tsr), ('ssr', ssr)) if g)}"
        " (LTX-Video, flow matching; latents pass between stages). The weights keep their own licence (LTX-Video's "
        "changed between releases: see the model card); see docs/REAL_MODELS.md."),
        guidance_scale=LTX_GUIDANCE)
    return config, (copies if copy else [])


def copy_folders(copies: list[tuple[Path, Path]]) -> None:
    for source, dest in copies:
        shutil.copytree(source, dest, dirs_exist_ok=True)
