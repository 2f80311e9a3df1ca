"""Latent video stages: a diffusers text-to-video repository (ModelScope layout) as a cascade stage.

text-to-video-ms-1.7b and zeroscope_v2 (576w, XL) are a UNet3DConditionModel over 4-channel SD-VAE
latents, conditioned on CLIP token embeddings and trained for epsilon prediction. A latent stage keeps
the cascade's contract, pixels [B, 3, F, H, W] in [-1, 1] in and out: `Stage.encode` / `Stage.decode`
wrap its sampling in edit.py, so the cluster's per-stage actors pass pixels as before (and the SSR of
this family needs the previous output upscaled in pixel space anyway). That SSR (zeroscope_v2_XL)
refines by SDEdit from the upscaled previous output, not by concatenating it to the input.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel, WanTransformer3DModel

from ..config import DEFAULT_REFINE_STRENGTH, DEFAULT_VAE_CHUNK_FRAMES, StageConfig
from ..errors import UserError
from .frame_mode import enable_frame_mode_switch, frame_mode
from .refs import resolve_ref
from .temporal_conv import use_frame_axis_convs

LAYOUTS = ("modelscope", "wan", "ltx")  # wan: models/wan.py, ltx: models/ltx.py
SPEC_KEYS = ("layout", "unet", "transformer", "transformer_2", "boundary_ratio", "vae", "scheduler", "strength",
             "vae_chunk_frames", "upsampler", "input", "temporal_compression", "chunk_halo", "adain_factor",
             "decode_timestep")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LatentModelError(UserError):
    """A latent stage's spec or components are wrong; the message names the stage and the fix."""


class LatentVideoDenoiser(UNet3DConditionModel):
    """diffusers' UNet3DConditionModel behind StageDenoiser's signature; saved in the plain UNet3D format."""

    # Compute dtype under autocast, set by `place`; None runs in the weights' dtype.
    autocast_dtype: torch.dtype | None = None

    def forward(self, sample_bcfhw: torch.Tensor, timestep: torch.Tensor, text_tokens_bld: torch.Tensor,
                text_pooled_bd: torch.Tensor | None = None, cond_bcfhw: torch.Tensor | None = None,
                frame_mode_on: bool = False) -> torch.Tensor:
        """The UNet's prediction (epsilon for this family) for latents `sample_bcfhw`, on the input's device."""
        if cond_bcfhw is not None:
            raise ValueError("latent stages take no concatenated condition: their SR refines by SDEdit")
        if not self.__dict__.get("_frame_switch"):
            # Not in __init__: diffusers rebuilds models from config.json through __init__'s signature.
            enable_frame_mode_switch(self)
            use_frame_axis_convs(self)
            self._frame_switch = True
        device, dtype = self.device, self.dtype
        t = timestep.to(device) if torch.is_tensor(timestep) else timestep
        cast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None \
            else contextlib.nullcontext()
        with frame_mode(frame_mode_on), cast:
            out = super().forward(sample_bcfhw.to(device, dtype), t, text_tokens_bld.to(device, dtype)).sample
        # The sampler's state stays where it lives (CPU generators, fp32), whatever runs the network.
        return out.to(sample_bcfhw.device, sample_bcfhw.dtype)


class VideoVAE(torch.nn.Module):
    """An image AutoencoderKL applied frame by frame, `chunk_frames` frames at a time to bound memory."""

    def __init__(self, vae: AutoencoderKL, chunk_frames: int = DEFAULT_VAE_CHUNK_FRAMES):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.chunk_frames = max(1, int(chunk_frames))

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of a clip's latents."""
        return self.latent_channels, frames, height // self.scale_factor, width // self.scale_factor

    @torch.no_grad()
    def encode(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents; the posterior mode, so a row needs no random draw."""
        z = self._per_frame(video_bcfhw, lambda x: self.vae.encode(x).latent_dist.mode())
        return (z - self._shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents_bcfhw: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in about [-1, 1] (unclamped, as diffusers' decode_latents)."""
        z = latents_bcfhw / self.vae.config.scaling_factor + self._shift
        return self._per_frame(z, lambda x: self.vae.decode(x).sample)

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)

    @property
    def _shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _per_frame(self, x_bcfhw: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        b, _, f, _, _ = x_bcfhw.shape
        frames = x_bcfhw.permute(0, 2, 1, 3, 4).reshape(b * f, *x_bcfhw.shape[1:2], *x_bcfhw.shape[3:])
        p = next(self.vae.parameters())
        outs = [fn(chunk.to(p.device, p.dtype)).to(x_bcfhw.device, torch.float32)
                for chunk in frames.split(self.chunk_frames)]
        out = torch.cat(outs)
        return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)


@dataclass(frozen=True)
class LatentRuntime:
    """Where and how latent stages run; `from_env` reads DREAMIX_* variables (docs/REAL_MODELS.md)."""

    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "float32"  # weights: float32 | float16 | bfloat16 (fp32 to finetune)
    autocast: str = "auto"  # compute dtype with fp32 weights on CUDA: auto (bf16, else fp16) | off | a dtype
    attention: str = "sdpa"  # sdpa (torch's fused kernels) | sliced | xformers
    vae_tiling: bool = False  # decode large frames in tiles (1024x576 and up on small GPUs)
    gradient_checkpointing: bool = False  # finetuning at full resolution on one GPU

    _ENV = {"device": "DREAMIX_DEVICE", "dtype": "DREAMIX_DTYPE", "autocast": "DREAMIX_AUTOCAST",
            "attention": "DREAMIX_ATTENTION", "vae_tiling": "DREAMIX_VAE_TILING",
            "gradient_checkpointing": "DREAMIX_GRADIENT_CHECKPOINTING"}

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise LatentModelError(f"dtype must be one of {sorted(_DTYPES)} (DREAMIX_DTYPE), got {self.dtype!r}")
        if self.autocast not in ("auto", "off", *_DTYPES):
            raise LatentModelError(f"autocast must be auto, off or a dtype (DREAMIX_AUTOCAST), got {self.autocast!r}")
        if self.attention not in ("sdpa", "sliced", "xformers"):
            raise LatentModelError(f"attention must be sdpa, sliced or xformers (DREAMIX_ATTENTION), "
                                   f"got {self.attention!r}")

    @classmethod
    def from_env(cls, env=os.environ) -> "LatentRuntime":
        values = {}
        for f in fields(cls):
            raw = env.get(cls._ENV.get(f.name, ""), "").strip()
            if raw:
                values[f.name] = raw.lower() in ("1", "true", "yes", "on") if isinstance(f.default, bool) else raw
        return cls(**values)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise LatentModelError(f"unknown device {self.device!r} (DREAMIX_DEVICE): use auto, cpu or cuda[:N]") \
                from None

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if device.type != "cuda" or self.autocast == "off" or self.dtype != "float32":
            return None
        if self.autocast == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _DTYPES[self.autocast]


def place(denoiser: LatentVideoDenoiser, vae: VideoVAE | None, runtime: LatentRuntime) -> None:
    """Device, weight dtype, autocast, attention kernel, VAE tiling and checkpointing of one latent stage."""
    if isinstance(denoiser, WanTransformer3DModel) and runtime.attention != "sdpa":
        raise LatentModelError(f"DREAMIX_ATTENTION={runtime.attention}: Wan stages run torch SDPA only; unset it")
    device, dtype = runtime.torch_device(), _DTYPES[runtime.dtype]
    _move(denoiser, device, dtype)
    denoiser.autocast_dtype = runtime.autocast_dtype(device)
    if runtime.attention == "sliced":
        denoiser.set_attention_slice("auto")
    elif runtime.attention == "xformers":
        try:
            denoiser.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise LatentModelError(f"DREAMIX_ATTENTION=xformers needs a working xformers install ({exc})") from None
    if runtime.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if vae is not None:
        _move(vae.vae, device, dtype)
        if runtime.vae_tiling:
            vae.vae.enable_tiling()


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Cast only when needed: loading already used torch_dtype, and diffusers warns on every cast.
    p = next(model.parameters())
    if p.dtype != dtype:
        model.to(dtype=dtype)
    if p.device != device:
        model.to(device=device)


def place_cascade(cascade, runtime: LatentRuntime | None = None) -> None:
    """Place every latent stage (and the text encoder) of a loaded cascade, e.g. on a GPU worker."""
    runtime = runtime or LatentRuntime.from_env()
    cascade.text_encoder.to(runtime.torch_device())
    for stage in cascade.stages:
        experts = getattr(stage.denoiser, "experts", None)  # a two-expert Wan stage (models/wan.py): both resident
        if experts is not None:
            for expert in experts:
                place(expert, stage.vae, runtime)
        elif isinstance(stage.denoiser, (LatentVideoDenoiser, WanTransformer3DModel)):
            place(stage.denoiser, stage.vae, runtime)
        elif hasattr(stage.denoiser, "transformer"):  # an LTX stage: its shared transformer (models/ltx.py)
            place(stage.denoiser.transformer, stage.vae, runtime)
            if stage.upsampler is not None:
                _move(stage.upsampler, runtime.torch_device(), _DTYPES[runtime.dtype])


def latent_spec(sc: StageConfig) -> dict:
    """The stage's `latent` object from cascade.json, checked."""
    spec = dict(sc.latent or {})
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise LatentModelError(f"stage {sc.name!r}: unknown latent key(s) {unknown}; known: {list(SPEC_KEYS)}")
    if spec.get("layout", "modelscope") not in LAYOUTS:
        raise LatentModelError(f"stage {sc.name!r}: unknown latent layout {spec['layout']!r}; supported: "
                               "modelscope (diffusers UNet3DConditionModel + AutoencoderKL + CLIP), wan "
                               "(WanTransformer3DModel + AutoencoderKLWan + UMT5), ltx (LTXVideoTransformer3DModel + "
                               "AutoencoderKLLTXVideo + T5, LTXLatentUpsamplerModel SR stages)")
    if sc.kind == "tsr" and spec.get("layout") != "ltx":
        raise LatentModelError(f"stage {sc.name!r}: latent stages are base or ssr (SDEdit refiners), not tsr")
    try:
        strength = float(spec.get("strength", DEFAULT_REFINE_STRENGTH))
    except (TypeError, ValueError):
        strength = float("nan")
    if not 0.0 <= strength <= 1.0:
        raise LatentModelError(f"stage {sc.name!r}: latent strength must be in [0, 1], got {spec['strength']!r}")
    return spec


def refine_strength(sc: StageConfig) -> float:
    """SDEdit strength of a latent SSR: how much of the upscaled previous output it re-noises."""
    return float(latent_spec(sc).get("strength", DEFAULT_REFINE_STRENGTH))


def component_dir(sc: StageConfig, root: Path, component: str) -> Path:
    """Where a component lives: the cascade's own stage folder wins, then the spec's reference."""
    own = Path(root) / sc.name
    marker = "scheduler_config.json" if component == "scheduler" else "config.json"
    local = own / {"vae": "vae", "upsampler": "latent_upsampler", "transformer_2": "transformer_2"}.get(component, "")
    if (local / marker).is_file():
        return local
    ref = latent_spec(sc).get(component)
    if not ref:
        raise LatentModelError(f"stage {sc.name!r}: no {local / marker} and the latent spec names no "
                               f"{component!r}; rerun `dreamix convert`")
    path = resolve_ref(str(ref), root)
    if not (path / marker).is_file():
        raise LatentModelError(f"stage {sc.name!r}: {component} {path} has no {marker}; point the latent "
                               f"spec at a diffusers repository's {component}/ folder")
    return path


_shared_vaes: "weakref.WeakValueDictionary[tuple, AutoencoderKL]" = weakref.WeakValueDictionary()


def load_latent_components(sc: StageConfig, root: str | Path, runtime: LatentRuntime | None = None
                           ) -> tuple[LatentVideoDenoiser, DDIMScheduler, VideoVAE]:
    """(denoiser, scheduler, VAE) of a latent stage, placed per `runtime` (default: from the environment)."""
    spec, root = latent_spec(sc), Path(root)
    runtime = runtime or LatentRuntime.from_env()
    dtype = _DTYPES[runtime.dtype]
    dirs = {c: component_dir(sc, root, c) for c in ("unet", "scheduler", "vae")}
    try:
        denoiser = LatentVideoDenoiser.from_pretrained(dirs["unet"], torch_dtype=dtype).eval()
        scheduler = DDIMScheduler.from_pretrained(dirs["scheduler"])
        key = (str(dirs["vae"].resolve()), runtime.dtype)  # stages naming one VAE folder share it
        vae_model = _shared_vaes.get(key)
        if vae_model is None:
            vae_model = AutoencoderKL.from_pretrained(dirs["vae"], torch_dtype=dtype)
            _shared_vaes[key] = vae_model
    except (OSError, ValueError, KeyError) as exc:
        raise LatentModelError(f"stage {sc.name!r}: cannot load its components: {str(exc).splitlines()[0]}") \
            from None
    vae = VideoVAE(vae_model, int(spec.get("vae_chunk_frames", DEFAULT_VAE_CHUNK_FRAMES)))
    _check_compatible(sc, denoiser, vae)
    place(denoiser, vae, runtime)
    return denoiser, scheduler, vae


def _check_compatible(sc: StageConfig, denoiser: LatentVideoDenoiser, vae: VideoVAE) -> None:
    c = vae.latent_channels
    if denoiser.config.in_channels != c or denoiser.config.out_channels != c:
        raise LatentModelError(f"stage {sc.name!r}: the UNet takes {denoiser.config.in_channels} channels but "
                               f"the VAE makes {c}; its unet/ and vae/ come from different models")
    f = vae.scale_factor
    if sc.height % f or sc.width % f:
        raise LatentModelError(f"stage {sc.name!r}: {sc.width}x{sc.height} is not a multiple of the VAE's "
                               f"{f} pixels per latent; pick a size divisible by {f}")
