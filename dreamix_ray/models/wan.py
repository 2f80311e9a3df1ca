"""Wan 2.x stages: a diffusers Wan repository (WanTransformer3DModel + AutoencoderKLWan + UMT5) as a cascade stage.

Wan is a flow-matching video transformer with full 3D self-attention over latent frames: x_t = (1 - sigma) x0 +
sigma eps, the network predicts the velocity eps - x0, and its scheduler is diffusers'
FlowMatchEulerDiscreteScheduler with the repository's shift (sampling.py's "flow" family). Like the ModelScope
stages (latent.py) it takes and returns pixels; `WanVAE` encodes the whole clip causally (F = 4k + 1 frames ->
k + 1 latent frames) and normalises the latents with the VAE's per-channel mean and std, as diffusers' Wan
pipelines do.

Wan 2.2 A14B is two such transformers, experts for two noise ranges (`WanExperts`): WanPipeline runs `transformer`
at timesteps t >= boundary_ratio * num_train_timesteps and `transformer_2` below. A stage holding both picks the
expert from the timestep it is called with, so the sampler, guidance and training stay the ones every stage uses.

Frame mode (paper Sec. 4.2) folds the latent frames into the batch: each frame becomes a one-frame clip, so its
tokens attend only to themselves, the way Wan trains on images. With temporal patch 1, that equals a
block-diagonal attention mask over frames: RoPE is relative, and tokens of one frame share their temporal angle.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from ..config import StageConfig
from .frame_mode import in_frame_mode
from .latent import _DTYPES, LatentModelError, LatentRuntime, component_dir, latent_spec, place
from .weights import TransformerWrapper, save_denoiser

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


class WanExperts(TransformerWrapper):
    """Wan 2.2 A14B's two WanDenoisers as one stage denoiser: the high-noise expert `transformer` at timesteps
    t >= boundary_ratio * num_train_timesteps, the low-noise `transformer_2` below (diffusers' WanPipeline rule).
    Saved as the two plain Wan folders: `transformer` in the given folder, `transformer_2` in its transformer_2/."""

    lora_ffn_projections = WanDenoiser.lora_ffn_projections  # adapters.target_modules reads it

    def __init__(self, transformer: WanDenoiser, transformer_2: WanDenoiser, boundary_ratio: float,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio, self.num_train_timesteps = float(boundary_ratio), int(num_train_timesteps)

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def experts(self) -> tuple[WanDenoiser, WanDenoiser]:
        """(high-noise, low-noise): what latent.place puts on the device one by one."""
        return self.transformer, self.transformer_2

    def forward(self, sample_bcfhw: torch.Tensor, timestep: torch.Tensor, text_tokens_bld: torch.Tensor,
                text_pooled_bd: torch.Tensor | None = None, cond_bcfhw: torch.Tensor | None = None,
                frame_mode_on: bool = False) -> torch.Tensor:
        """The velocity from the expert of each row's timestep ([B] or scalar)."""
        b = sample_bcfhw.shape[0]
        t_b = torch.as_tensor(timestep, device=sample_bcfhw.device).reshape(-1).expand(b)
        high_b = t_b >= self.boundary_timestep
        # Which weights run is a host decision: one read per step. A sampling step has one timestep for all rows;
        # training draws one per row, so a batch may straddle the boundary and each expert then takes its rows.
        n_high = int(high_b.sum())
        run_high, run_low = self._experts_to_run(n_high > 0, n_high < b)
        if (run_high, run_low) == (n_high == b, n_high == 0):  # one expert takes every row
            net = self.transformer if n_high else self.transformer_2
            return net(sample_bcfhw, t_b, text_tokens_bld, text_pooled_bd, cond_bcfhw, frame_mode_on)
        out, idle = torch.empty_like(sample_bcfhw), []
        for net, rows, run in ((self.transformer, high_b, run_high), (self.transformer_2, ~high_b, run_low)):
            if not run:
                continue
            picked = rows if rows.any() else torch.arange(b, device=rows.device) == 0  # idle: one row, weight 0
            v = net(sample_bcfhw[picked], t_b[picked], text_tokens_bld[picked],
                    None if text_pooled_bd is None else text_pooled_bd[picked], cond_bcfhw, frame_mode_on)
            if rows.any():
                out[rows] = v
            else:
                idle.append(v)
        return out + sum(0.0 * v.sum() for v in idle)  # an idle expert still enters the backward's collectives

    def _experts_to_run(self, high: bool, low: bool) -> tuple[bool, bool]:
        """(high-noise, low-noise): the experts this rank's rows need, or under data-parallel training those any
        rank's rows need. ZeRO-3 gathers an expert's weights in its forward and reduces its gradients in backward,
        both collectives: ranks running different experts would pair one expert's shards with the other's."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return high, low
        device = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL or gloo
        flags = torch.tensor([int(high), int(low)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def saved_models(self) -> dict[str, tuple[str, WanDenoiser]]:
        """Where weights.save_denoiser writes each expert: the two plain Wan folders of a converted stage."""
        return {"": ("transformer.", self.transformer), "transformer_2": ("transformer_2.", self.transformer_2)}

    def save_pretrained(self, path: str | Path) -> None:
        save_denoiser(self, path)

    def reloaded(self, folder: str | Path) -> WanExperts:
        """The experts saved in `folder` (saved_models' layout) at this pair's boundary: a full finetune."""
        high, low = (WanDenoiser.from_pretrained(f) for f in (Path(folder), Path(folder) / "transformer_2"))
        return WanExperts(high, low, self.boundary_ratio, self.num_train_timesteps).eval()


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
                        ) -> tuple[WanDenoiser | WanExperts, FlowMatchEulerDiscreteScheduler, WanVAE]:
    """(denoiser, scheduler, VAE) of a Wan stage, placed per `runtime` (default: from the environment); a stage
    with a `boundary_ratio` gets its two experts as one WanExperts."""
    boundary = wan_boundary(sc)
    runtime = runtime or LatentRuntime.from_env()
    parts = ("transformer", "scheduler", "vae") + (("transformer_2",) if boundary is not None else ())
    dirs = {c: component_dir(sc, Path(root), c) for c in parts}
    dtype = _DTYPES[runtime.dtype]
    try:
        experts = [WanDenoiser.from_pretrained(dirs[c], torch_dtype=dtype).eval()
                   for c in ("transformer", "transformer_2") if c in dirs]
        vae = WanVAE(AutoencoderKLWan.from_pretrained(dirs["vae"], torch_dtype=dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentModelError(f"stage {sc.name!r}: cannot load its components: {str(exc).splitlines()[0]}") \
            from None
    scheduler = flow_scheduler(dirs["scheduler"], sc.name)
    for expert in experts:
        check_wan_stage(sc, expert.config, vae)
        place(expert, vae, runtime)
    if boundary is None:
        return experts[0], scheduler, vae
    return WanExperts(*experts, boundary, scheduler.config.num_train_timesteps), scheduler, vae


def wan_boundary(sc: StageConfig) -> float | None:
    """The stage's `boundary_ratio` (two experts), checked, or None (one transformer)."""
    spec = latent_spec(sc)
    boundary = spec.get("boundary_ratio")
    if boundary is None:
        if spec.get("transformer_2"):
            raise LatentModelError(f"stage {sc.name!r}: transformer_2 without boundary_ratio; rerun `dreamix convert`")
        return None
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0.0 < boundary < 1.0:
        raise LatentModelError(f"stage {sc.name!r}: boundary_ratio must be a number in (0, 1), got {boundary!r}")
    return float(boundary)


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
