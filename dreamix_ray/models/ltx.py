"""LTX-Video stages: LTXVideoTransformer3DModel + AutoencoderKLLTXVideo + T5, with LTXLatentUpsamplerModel SR stages.

An LTX cascade is the paper's base -> TSR -> SSR in latent space (docs/REAL_MODELS.md, "LTX-Video"):
- the base is a flow-matching stage like Wan's (sampling.py's "flow" family), degrading the VAE latents;
- an SR stage is one of LTX's latent upsamplers (temporal: 2L - 1 latent frames, spatial: 2x each side) followed
  by a refine pass of the *same* transformer, SDEdit from the upsampled latents at the stage's own start strength
  (cascade.json `latent.strength`; 1 = from pure noise, the paper's SR stages). The refine pass is part of the SR
  stage, not a stage of its own, so `edit.run_stage` stays one runner over "input -> stage -> output".
- all stages share one VAE, so they pass normalised latents to each other (`latent.input = "latents"`); only the
  last stage decodes, chunk by chunk with a halo of latent frames around each chunk (`latent.chunk_halo`).

Conventions follow diffusers' LTXPipeline / LTXLatentUpsamplePipeline: latents normalised per channel by the VAE's
`latents_mean` / `latents_std` and `scaling_factor`, packed to tokens (patch 1), the raw scheduler timestep as the
transformer's timestep, rope_interpolation_scale = (temporal compression / fps, spatial, spatial), the schedule
linspace(1, 1/N, N) shifted by exp(mu) with mu from the stage's latent sequence length, T5 run without its mask and
the mask given to the transformer instead (the text encoder's `pooled: mask`, models/text.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
from diffusers.pipelines.ltx.pipeline_ltx_latent_upsample import LTXLatentUpsamplePipeline

from ..config import StageConfig
from .frame_mode import in_frame_mode
from .latent import _DTYPES, LatentModelError, LatentRuntime, component_dir, latent_spec, place
from .weights import TransformerWrapper, save_denoiser


class LTXFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler with LTXPipeline's schedule: sigmas linspace(1, 1/N, N), then the shift.

    LTXPipeline shifts by exp(mu) with mu from the clip's latent sequence length (`use_dynamic_shifting`); a stage
    fixes mu from its planned clip at load (`ltx_scheduler`), so the static shift exp(mu) gives the same sigmas and
    every chunk of the last stage runs the whole clip's schedule."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def ltx_scheduler(folder: Path, latent_tokens: int) -> LTXFlowScheduler:
    """The stage's scheduler, its dynamic shift fixed for `latent_tokens` (latent frames x height x width)."""
    config = dict(LTXFlowScheduler.load_config(folder))
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(latent_tokens, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        config.update(use_dynamic_shifting=False, shift=math.exp(mu))
    return LTXFlowScheduler.from_config(config)


class LTXVAE(torch.nn.Module):
    """AutoencoderKLLTXVideo on whole clips, one row at a time, latents normalised as LTXPipeline's."""

    def __init__(self, vae: AutoencoderKLLTXVideo, decode_timestep: float = 0.0):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.decode_timestep = float(decode_timestep)

    @property
    def scale_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.scale_factor
        return self.latent_channels, (frames - 1) // self.temporal_factor + 1, height // s, width // s

    def pixel_frames(self, latent_frames: int) -> int:
        """The causal VAE's first latent frame is one pixel frame, every later one `temporal_factor` frames."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    def pixel_span(self, latent_frames: int, left: int, right: int) -> tuple[int, int]:
        """Pixel frames of the decoded clip that belong to its latent frames [left, latent_frames - right)."""
        t, total = self.temporal_factor, self.pixel_frames(latent_frames)
        return (1 + t * (left - 1) if left else 0), total - t * right

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std, float(self.vae.config.scaling_factor)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._scale(z)
        return (z - mean) * scale / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._scale(latents)
        return latents * std / scale + mean

    @torch.no_grad()
    def encode(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (t k + 1 frames) -> normalised latents; the posterior mode, so no random draw."""
        f, t = video_bcfhw.shape[2], self.temporal_factor
        if f % t != 1:
            raise LatentModelError(f"{f} frames: LTX's VAE takes {t}k + 1 frames (e.g. {t * 2 + 1} or {t * 12 + 1}); "
                                   f"pass --frames {max(1, (f - 1) // t) * t + 1}")
        p = next(self.vae.parameters())
        z = torch.cat([self.vae.encode(row.unsqueeze(0).to(p.device, p.dtype)).latent_dist.mode()
                       for row in video_bcfhw]).to(video_bcfhw.device, torch.float32)
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latents_bcfhw: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in about [-1, 1]. A timestep-conditioned decoder (LTX 0.9.1+) decodes at
        `decode_timestep` without the pipelines' decode noise, so a row's decode needs no random draw."""
        p = next(self.vae.parameters())
        z = self.denormalize(latents_bcfhw)
        temb = (torch.tensor([self.decode_timestep], device=p.device, dtype=p.dtype)
                if self.vae.config.timestep_conditioning else None)
        return torch.cat([self.vae.decode(row.unsqueeze(0).to(p.device, p.dtype), temb).sample
                          for row in z]).to(latents_bcfhw.device, torch.float32)

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)


class LTXUpsampler(torch.nn.Module):
    """LTXLatentUpsamplerModel on normalised latents, as LTXLatentUpsamplePipeline(latents=..., output_type="latent"):
    denormalise, upsample, optional AdaIN towards the input's statistics, normalise."""

    def __init__(self, model: LTXLatentUpsamplerModel, vae: LTXVAE, adain_factor: float = 0.0):
        super().__init__()
        self.model, self.adain_factor = model.eval().requires_grad_(False), float(adain_factor)
        self._vae = [vae]  # a list: the VAE belongs to the stage, not to this module's parameters

    @torch.no_grad()
    def forward(self, latents_bcfhw: torch.Tensor) -> torch.Tensor:
        vae, p = self._vae[0], next(self.model.parameters())
        z = vae.denormalize(latents_bcfhw)
        up = self.model(z.to(p.device, p.dtype)).to(z.device, torch.float32)
        if self.adain_factor > 0:
            up = LTXLatentUpsamplePipeline.adain_filter_latent(None, up, z, self.adain_factor)
        return vae.normalize(up)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)


class LTXStageNet(TransformerWrapper):
    """One stage's view of the (shared) LTX transformer behind StageDenoiser's signature; `text_pooled_bd` is the
    prompt's token mask (T5's padding is masked in the transformer, as LTXPipeline does)."""

    def __init__(self, transformer: LTXVideoTransformer3DModel, fps: float, vae: LTXVAE):
        super().__init__()
        self.transformer, self.fps = transformer, float(fps)
        self.ratios = (vae.temporal_factor, vae.scale_factor)

    def forward(self, sample_bcfhw: torch.Tensor, timestep: torch.Tensor, text_tokens_bld: torch.Tensor,
                text_pooled_bd: torch.Tensor | None = None, cond_bcfhw: torch.Tensor | None = None,
                frame_mode_on: bool = False) -> torch.Tensor:
        """The velocity eps - x0 for normalised latents at the scheduler's `timestep`, on the input's device."""
        if cond_bcfhw is not None:
            raise ValueError("LTX stages take no concatenated condition: their SR stages refine by SDEdit")
        net = self.transformer
        device, dtype = net.device, net.dtype
        b, c, f, h, w = sample_bcfhw.shape
        x, tokens = sample_bcfhw.to(device, dtype), text_tokens_bld.to(device, dtype)
        mask = (text_pooled_bd if text_pooled_bd is not None else torch.ones(tokens.shape[:2])).to(device)
        t_b = torch.as_tensor(timestep, device=device).reshape(-1).expand(b)
        if frame_mode_on or in_frame_mode():  # every latent frame a one-frame clip (paper Sec. 4.2; as wan.py)
            x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, 1, h, w)
            t_b, tokens, mask = (v.repeat_interleave(f, dim=0) for v in (t_b, tokens, mask))
        frames = x.shape[2]
        packed = x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, c)  # LTXPipeline._pack_latents at patch 1
        t_ratio, s_ratio = self.ratios
        cast = torch.autocast(device.type, dtype=net.autocast_dtype) if getattr(net, "autocast_dtype", None) \
            else contextlib.nullcontext()
        with cast:
            out = net(hidden_states=packed, encoder_hidden_states=tokens, timestep=t_b, encoder_attention_mask=mask,
                      num_frames=frames, height=h, width=w,
                      rope_interpolation_scale=(t_ratio / self.fps, s_ratio, s_ratio), return_dict=False)[0]
        out = out.reshape(x.shape[0], frames, h, w, c).permute(0, 4, 1, 2, 3)
        if frames != f:
            out = out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        return out.to(sample_bcfhw.device, sample_bcfhw.dtype)

    def saved_models(self) -> dict[str, tuple[str, LTXVideoTransformer3DModel]]:
        """weights.save_denoiser writes the transformer alone, in a plain LTX transformer folder."""
        return {"": ("transformer.", self.transformer)}

    def save_pretrained(self, path: str | Path) -> None:
        save_denoiser(self, path)

    def reloaded(self, folder: str | Path) -> LTXStageNet:
        """This stage's view (fps, VAE ratios) of the transformer saved in `folder`: a full finetune, owned by this
        stage alone (the refine passes keep the shared one)."""
        t_ratio, s_ratio = self.ratios
        ratios = SimpleNamespace(temporal_factor=t_ratio, scale_factor=s_ratio)  # all __init__ reads of the VAE
        return LTXStageNet(LTXVideoTransformer3DModel.from_pretrained(folder).eval(), self.fps, ratios)


# Stages naming one folder share one module: the SR stages' refine passes run the base's transformer and VAE.
_shared: "weakref.WeakValueDictionary[tuple, torch.nn.Module]" = weakref.WeakValueDictionary()


def _shared_load(cls, folder: Path, dtype: str):
    key = (cls.__name__, str(folder.resolve()), dtype)
    model = _shared.get(key)
    if model is None:
        model = _shared[key] = cls.from_pretrained(folder, torch_dtype=_DTYPES[dtype]).eval()
    return model


def load_ltx_components(sc: StageConfig, root: str | Path, runtime: LatentRuntime | None = None):
    """(denoiser, scheduler, VAE, upsampler or None) of an LTX stage, placed per `runtime`."""
    spec, root = latent_spec(sc), Path(root)
    runtime = runtime or LatentRuntime.from_env()
    parts = ("transformer", "scheduler", "vae") + (("upsampler",) if sc.kind != "base" else ())
    dirs = {c: component_dir(sc, root, c) for c in parts}
    try:
        transformer = _shared_load(LTXVideoTransformer3DModel, dirs["transformer"], runtime.dtype)
        vae_model = _shared_load(AutoencoderKLLTXVideo, dirs["vae"], runtime.dtype)
        upsampler_model = (LTXLatentUpsamplerModel.from_pretrained(dirs["upsampler"]).eval()
                           if "upsampler" in dirs else None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentModelError(f"stage {sc.name!r}: cannot load its components: {str(exc).splitlines()[0]}") \
            from None
    vae = LTXVAE(vae_model, float(spec.get("decode_timestep", 0.05 if vae_model.config.timestep_conditioning
                                           else 0.0)))
    check_ltx_stage(sc, transformer.config, vae, upsampler_model)
    c, f, h, w = vae.latent_shape(sc.frames, sc.height, sc.width)
    scheduler = ltx_scheduler(dirs["scheduler"], f * h * w)
    upsampler = LTXUpsampler(upsampler_model, vae, float(spec.get("adain_factor", 0.0))) if upsampler_model else None
    place(transformer, vae, runtime)
    return LTXStageNet(transformer, sc.fps, vae), scheduler, vae, upsampler


def check_ltx_stage(sc: StageConfig, transformer: dict, vae: LTXVAE, upsampler: LTXLatentUpsamplerModel | None):
    """The transformer and upsampler read the VAE's latents, patch 1, the size and frames fit the VAE."""
    c = vae.latent_channels
    if transformer["in_channels"] != c or transformer["out_channels"] != c:
        raise LatentModelError(f"stage {sc.name!r}: the transformer takes {transformer['in_channels']} channels but "
                               f"the VAE makes {c}; transformer/ and vae/ come from different models")
    if transformer["patch_size"] != 1 or transformer["patch_size_t"] != 1:
        raise LatentModelError(f"stage {sc.name!r}: transformer patch {transformer['patch_size']}; LTX stages "
                               "need patch 1 (every LTX-Video 0.9.x release)")
    if upsampler is not None and upsampler.config.in_channels != c:
        raise LatentModelError(f"stage {sc.name!r}: the upsampler reads {upsampler.config.in_channels}-channel "
                               f"latents but the base's VAE makes {c}; use the upsampler of this LTX release")
    if sc.height % vae.scale_factor or sc.width % vae.scale_factor:
        raise LatentModelError(f"stage {sc.name!r}: {sc.width}x{sc.height} is not a multiple of the VAE's "
                               f"{vae.scale_factor} pixels per latent")
    if sc.frames % vae.temporal_factor != 1:
        raise LatentModelError(f"stage {sc.name!r}: {sc.frames} frames; LTX's VAE takes "
                               f"{vae.temporal_factor}k + 1 frames")


def upsampler_config(folder: Path) -> dict:
    """An upsampler repository's LTXLatentUpsamplerModel config (latent_upsampler/ of an LTXLatentUpsamplePipeline
    repository, or the model's own folder)."""
    for candidate in (folder / "latent_upsampler" / "config.json", folder / "config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            if config.get("_class_name") == "LTXLatentUpsamplerModel":
                return config
    raise LatentModelError(f"{folder} holds no LTXLatentUpsamplerModel (latent_upsampler/config.json); give an "
                           "LTX upsampler repository such as Lightricks/ltxv-spatial-upscaler-0.9.7")
