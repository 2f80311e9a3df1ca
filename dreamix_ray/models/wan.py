"""Wan 2.x stages: a diffusers Wan repository (WanTransformer3DModel + AutoencoderKLWan + UMT5) as a cascade stage.

Wan is a flow-matching video transformer with full 3D self-attention over latent frames: x_t = (1 - sigma) x0 +
sigma eps, the network predicts the velocity eps - x0, and its scheduler is diffusers'
FlowMatchEulerDiscreteScheduler with the repository's shift (sampling.py's "flow" family). Like the ModelScope
stages (latent.py) it takes and returns pixels; `WanVAE` encodes the whole clip causally (F = 4k + 1 frames ->
k + 1 latent frames) and normalises the latents with the VAE's per-channel mean and std, as diffusers' Wan
pipelines do.

Frame mode (paper Sec. 4.2) folds the latent frames into the batch: each frame becomes a one-frame clip, so its
tokens attend only to themselves, the way Wan trains on images. With temporal patch 1, that equals a
block-diagonal attention mask over frames: RoPE is relative, and tokens of one frame share their temporal angle.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from ..config import StageConfig
from .frame_mode import in_frame_mode
from .latent import _DTYPES, LatentModelError, LatentRuntime, component_dir, latent_spec, place

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


class WanDenoiser(WanTransformer3DModel):
    """diffusers' WanTransformer3DModel behind StageDenoiser's signature; saved in the plain Wan format."""

    autocast_dtype: torch.dtype | None = None  # set by latent.place; None runs in the weights' dtype
    # LoRA adapts the FFN as well as the attention (adapters.target_modules): in Wan the FFN holds over half
    # of each block's weights, and Wan LoRA trainers (DiffSynth-Studio: q,k,v,o,ffn.0,ffn.2) adapt it too
    lora_ffn_projections = ("ffn.net.0.proj", "ffn.net.2")

    def forward(self, sample_bcfhw: torch.Tensor, timestep: torch.Tensor, text_tokens_bld: torch.Tensor,
                text_pooled_bd: torch.Tensor | None = None, cond_bcfhw: torch.Tensor | None = None,
                frame_mode_on: bool = False) -> torch.Tensor:
        """The velocity eps - x0 for latents `sample_bcfhw` at `timestep` ([B] or scalar), on the input's device."""
        if cond_bcfhw is not None:
            raise ValueError("Wan stages take no concatenated condition")
        device, dtype = self.device, self.dtype
        b, _, f, h, w = sample_bcfhw.shape
        x_bcfhw, tokens_bld = sample_bcfhw.to(device, dtype), text_tokens_bld.to(device, dtype)
        t_b = torch.as_tensor(timestep, device=device).reshape(-1).expand(b)
        folded = frame_mode_on or in_frame_mode()
        if folded:  # (B, C, F, H, W) -> (B*F, C, 1, H, W): every latent frame a one-frame clip
            x_bcfhw = x_bcfhw.permute(0, 2, 1, 3, 4).reshape(b * f, -1, 1, h, w)
            t_b, tokens_bld = t_b.repeat_interleave(f), tokens_bld.repeat_interleave(f, dim=0)
        cast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None \
            else contextlib.nullcontext()
        with cast:
            out = super().forward(hidden_states=x_bcfhw, timestep=t_b, encoder_hidden_states=tokens_bld,
                                  return_dict=False)[0]
        if folded:
            out = out.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)
        return out.to(sample_bcfhw.device, sample_bcfhw.dtype)


class WanVAE(torch.nn.Module):
    """AutoencoderKLWan on whole clips, one row at a time (as diffusers' Wan pipelines), normalised latents."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side."""
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of a clip's latents: the first frame alone, then one latent frame per 4."""
        s = self.scale_factor
        return self.latent_channels, (frames - 1) // self.temporal_factor + 1, height // s, width // s

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> normalised latents; the posterior mode, so a row needs no random draw."""
        p = next(self.vae.parameters())
        z = torch.cat([self.vae.encode(row.unsqueeze(0).to(p.device, p.dtype)).latent_dist.mode()
                       for row in video_bcfhw]).to(video_bcfhw.device, torch.float32)
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents_bcfhw: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in about [-1, 1] (unclamped)."""
        p = next(self.vae.parameters())
        mean, std = self._stats(latents_bcfhw)
        z = latents_bcfhw * std + mean
        return torch.cat([self.vae.decode(row.unsqueeze(0).to(p.device, p.dtype)).sample
                          for row in z]).to(latents_bcfhw.device, torch.float32)

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)


def flow_scheduler(folder: Path, stage: str) -> FlowMatchEulerDiscreteScheduler:
    """The stage's FlowMatchEulerDiscreteScheduler; a Wan repository's UniPC flow config gives its flow_shift."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    name = config.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                               shift=float(config.get("flow_shift") or 1.0))
    raise LatentModelError(f"stage {stage!r}: {folder} holds a {name} without flow sigmas; a Wan stage needs a "
                           f"flow-matching scheduler ({' or '.join(FLOW_SCHEDULERS)} with use_flow_sigmas)")


def load_wan_components(sc: StageConfig, root: str | Path, runtime: LatentRuntime | None = None
                        ) -> tuple[WanDenoiser, FlowMatchEulerDiscreteScheduler, WanVAE]:
    """(denoiser, scheduler, VAE) of a Wan stage, placed per `runtime` (default: from the environment)."""
    latent_spec(sc)
    runtime = runtime or LatentRuntime.from_env()
    dirs = {c: component_dir(sc, Path(root), c) for c in ("transformer", "scheduler", "vae")}
    try:
        denoiser = WanDenoiser.from_pretrained(dirs["transformer"], torch_dtype=_DTYPES[runtime.dtype]).eval()
        vae = WanVAE(AutoencoderKLWan.from_pretrained(dirs["vae"], torch_dtype=_DTYPES[runtime.dtype]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentModelError(f"stage {sc.name!r}: cannot load its components: {str(exc).splitlines()[0]}") \
            from None
    scheduler = flow_scheduler(dirs["scheduler"], sc.name)
    check_wan_stage(sc, denoiser.config, vae)
    place(denoiser, vae, runtime)
    return denoiser, scheduler, vae


def check_wan_stage(sc: StageConfig, transformer: dict, vae: WanVAE) -> None:
    """The transformer reads the VAE's latents, the size fits VAE x patch, the frames are 4k + 1."""
    c, patch = vae.latent_channels, tuple(transformer["patch_size"])
    if transformer["in_channels"] != c or transformer["out_channels"] != c:
        raise LatentModelError(f"stage {sc.name!r}: the transformer takes {transformer['in_channels']} channels but "
                               f"the VAE makes {c}; image-to-video Wan models, or transformer/ and vae/ from "
                               "different models, are not supported")
    if patch[0] != 1:
        raise LatentModelError(f"stage {sc.name!r}: temporal patch {patch[0]}; frame mode needs patch (1, h, w)")
    px = (vae.scale_factor * patch[1], vae.scale_factor * patch[2])
    if sc.height % px[0] or sc.width % px[1]:
        raise LatentModelError(f"stage {sc.name!r}: {sc.width}x{sc.height} is not a multiple of {px[1]}x{px[0]} "
                               "(VAE pixels per latent x patch); pick a size divisible by it")
    if sc.frames % vae.temporal_factor != 1:
        raise LatentModelError(f"stage {sc.name!r}: {sc.frames} frames; Wan needs 4k + 1 frames (e.g. 49 or 81)")
