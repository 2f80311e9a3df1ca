"""The cascade: a text encoder plus ordered stages, and its on-disk format.

On disk: `cascade.json` (CascadeConfig) and one folder per stage holding the denoiser in
diffusers `save_pretrained` format plus its `scheduler_config.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLLTXVideo, AutoencoderKLWan, DDIMScheduler

from ..config import CascadeConfig, StageConfig
from ..host_memory import keep_freed_memory
from ..sampling import make_scheduler
from .latent import (_DTYPES, DEFAULT_VAE_CHUNK_FRAMES, LatentModelError, LatentRuntime, VideoVAE, component_dir,
                     load_latent_components)
from .ltx import LTXVAE, load_ltx_components
from .stage import StageDenoiser
from .text import TextEncoder, load_text_encoder
from .wan import WanVAE, load_wan_components
from .embedded import CASCADE_FILE, EMBEDDED_DIR, CascadeError
from .weights import save_denoiser

@dataclass
class Stage:
    config: StageConfig
    denoiser: StageDenoiser
    scheduler: DDIMScheduler
    vae: torch.nn.Module | None = None  # latent stages only (models/latent.py): samples in its latent space
    upsampler: torch.nn.Module | None = None  # LTX SR stages (models/ltx.py): the previous latents -> this stage's

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.denoiser.parameters())

    def encode(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """Pixels -> the space this stage samples in (identity for pixel stages)."""
        return video_bcfhw if self.vae is None else self.vae.encode(video_bcfhw)

    def decode(self, x_bcfhw: torch.Tensor, halo: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """This stage's samples -> pixels (identity for pixel stages), without the pixels of the `halo` (frames
        of context sampled on each side of a chunk, edit.run_cascade)."""
        out = x_bcfhw if self.vae is None else self.vae.decode(x_bcfhw)
        if halo == (0, 0):
            return out
        span = getattr(self.vae, "pixel_span", None)  # a causal VAE: the first latent frame is one pixel frame
        lo, hi = span(x_bcfhw.shape[2], *halo) if span else (halo[0], out.shape[2] - halo[1])
        return out[:, :, lo:hi]

    def output_frames(self, input_frames: int) -> int:
        """Pixel frames this stage makes from `input_frames` of its input (latent frames for a latent-input stage)."""
        c = self.config
        if c.latent_input:  # an LTX temporal upsampler makes 2L - 1 latent frames (its causal first frame)
            latents = c.factor * (input_frames - 1) + 1 if c.kind == "tsr" else input_frames
            return self.vae.pixel_frames(latents)
        return input_frames * c.factor if c.kind == "tsr" else input_frames


class Cascade:
    """Text encoder + stages; `edit.py` runs it, `finetune.py` trains parts of it."""

    def __init__(self, config: CascadeConfig, text_encoder: TextEncoder, stages: list[Stage], source: str = ""):
        if not stages or stages[0].config.kind != "base":
            raise CascadeError("a cascade needs a first stage of kind 'base'")
        keep_freed_memory()  # every process that runs a cascade's networks: CLI, batch actors, Serve, trainers
        self.config, self.text_encoder, self.stages, self.source = config, text_encoder, stages, source

    @property
    def base(self) -> Stage:
        return self.stages[0]

    @property
    def device(self) -> torch.device:
        return next(self.base.denoiser.parameters()).device

    def to(self, device: str | torch.device) -> "Cascade":
        """Move every network (text encoder, denoisers, VAEs) to `device`; noise is still drawn by CPU
        generators and then moved, so a seed gives the same video on any device."""
        self.text_encoder.to(device)
        for stage in self.stages:
            stage.denoiser.to(device)
            for part in (stage.vae, stage.upsampler):
                if part is not None:
                    part.to(device)
        return self

    def last_ssr_index(self) -> int | None:
        idx = [i for i, s in enumerate(self.stages) if s.config.kind == "ssr"]
        return idx[-1] if idx else None

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config, stages=tuple(s.config for s in self.stages),
                                     text_encoder=self.text_encoder.spec())
        for stage in self.stages:
            save_denoiser(stage.denoiser, path / stage.config.name)
            stage.scheduler.save_pretrained(path / stage.config.name)
            if stage.vae is not None:  # a latent stage's own folder then holds all it needs (latent.py)
                stage.vae.save_pretrained(path / stage.config.name / "vae")
            if stage.upsampler is not None:
                stage.upsampler.save_pretrained(path / stage.config.name / "latent_upsampler")
        write_config(path, config)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, text_encoder: TextEncoder | None = None) -> "Cascade":
        path = Path(path)
        config = read_config(path)
        stages = []
        for sc in config.stages:
            if sc.latent is not None:  # a diffusers text-to-video repository's components (latent.py, wan.py)
                stages.append(Stage(sc, *STAGE_LOADERS.get(sc.latent.get("layout"), load_latent_components)(sc, path)))
                continue
            folder = path / sc.name
            if not folder.is_dir():
                raise CascadeError(f"cascade {path} lists stage {sc.name!r} but has no folder {folder}")
            denoiser = StageDenoiser.from_pretrained(folder).eval()
            scheduler = DDIMScheduler.from_pretrained(folder)
            stages.append(Stage(sc, denoiser, scheduler))
        text_encoder = text_encoder or load_text_encoder(config.text_encoder, root=path)
        return cls(config, text_encoder, stages, source=str(path))

    def cascade_id(self) -> str:
        """Content hash of the config and every weight: keys finetuned artifacts to this exact cascade."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for net in [n for s in self.stages for n in (s.denoiser, s.upsampler) if n is not None]:
            for name, tensor in sorted(net.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def info(self) -> list[dict]:
        """Per stage: kind, size, frames, fps, steps, parameters, and a latent stage's (C, F, H, W) and VAE size (and
        a two-expert stage's parameters per expert and its boundary timestep)."""
        rows = []
        for s in self.stages:
            c = s.config
            row = dict(name=c.name, kind=c.kind, factor=c.factor, frames=c.frames, height=c.height, width=c.width,
                       fps=c.fps, steps=c.steps, parameters=s.num_parameters)
            if s.vae is not None:
                row.update(latent=s.vae.latent_shape(c.frames, c.height, c.width),
                           vae_parameters=sum(p.numel() for p in s.vae.parameters()))
            experts = getattr(s.denoiser, "experts", None)
            if experts is not None:  # a two-expert Wan stage (models/wan.py)
                row.update(expert_parameters=tuple(sum(p.numel() for p in e.parameters()) for e in experts),
                           boundary_timestep=s.denoiser.boundary_timestep)
            if s.upsampler is not None:
                row.update(upsampler_parameters=sum(p.numel() for p in s.upsampler.parameters()))
            rows.append(row)
        return rows


# A latent stage's loader by its layout (cascade.json `latent.layout`; none = ModelScope / Zeroscope).
STAGE_LOADERS = {"wan": load_wan_components, "ltx": load_ltx_components}
# Its VAE alone: (diffusers class, our wrapper from (model, stage config)).
VAE_CLASSES = {
    "wan": (AutoencoderKLWan, lambda model, sc: WanVAE(model)),
    "ltx": (AutoencoderKLLTXVideo, lambda model, sc: LTXVAE(model)),  # encoding takes no decode timestep
    None: (AutoencoderKL, lambda model, sc: VideoVAE(model, int(sc.latent.get("vae_chunk_frames",
                                                                               DEFAULT_VAE_CHUNK_FRAMES)))),
}


def load_base_vae(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The base stage's VAE alone (None for a pixel base): what the batch's degrade step holds, without the
    denoiser. Built as the stage loaders build it, so it encodes the same latents."""
    path = Path(path)
    sc = read_config(path).stages[0]
    if sc.latent is None:
        return None
    layout = sc.latent.get("layout")
    model_class, wrap = VAE_CLASSES.get(layout, VAE_CLASSES[None])
    try:
        model = model_class.from_pretrained(component_dir(sc, path, "vae"),
                                            torch_dtype=_DTYPES[LatentRuntime.from_env().dtype])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentModelError(f"stage {sc.name!r}: cannot load its VAE: {str(exc).splitlines()[0]}") from None
    return wrap(model, sc).to(device)


def read_config(path: str | Path) -> CascadeConfig:
    """A cascade directory's cascade.json, checked (CascadeConfig validates its structure and tables)."""
    path = Path(path)
    if not (path / CASCADE_FILE).is_file():
        raise CascadeError(f"{path} is not a cascade directory (no {CASCADE_FILE}); "
                           "give a directory written by Cascade.save_pretrained or `dreamix convert`")
    try:
        return CascadeConfig.from_dict(json.loads((path / CASCADE_FILE).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise CascadeError(f"{path / CASCADE_FILE} is malformed: {exc}") from None


def write_config(path: str | Path, config: CascadeConfig) -> None:
    (Path(path) / CASCADE_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def update_config(path: str | Path, **changes) -> CascadeConfig:
    """Replace fields of a cascade's config on disk (tuned strengths, a fitted prior), validated like a load:
    how tuners and fitters change a shipped cascade, never by editing its JSON."""
    config = dataclasses.replace(read_config(path), **changes)
    write_config(path, config)
    return config


def build_cascade(config: CascadeConfig, denoiser_kwargs: dict[str, dict], text_encoder: TextEncoder,
                  seed: int = 0) -> Cascade:
    """A freshly initialised cascade (pretraining start, tests)."""
    torch.manual_seed(seed)
    stages = []
    for sc in config.stages:
        kwargs = dict(denoiser_kwargs.get(sc.name, {}))
        kwargs.setdefault("text_dim", text_encoder.hidden_size)
        kwargs.setdefault("cond_channels", 0 if sc.kind == "base" else 3)
        stages.append(Stage(sc, StageDenoiser(**kwargs).eval(), make_scheduler()))
    return Cascade(config, text_encoder, stages, source="built")


def tiny_cascade(text_encoder: TextEncoder | None = None, seed: int = 0, ssr_factor: int = 2) -> Cascade:
    """A tiny random base -> TSR 2x -> SSR cascade that runs in seconds on a CPU (tests)."""
    stages = (
        StageConfig("base", "base", frames=4, height=8, width=8, fps=2.0, steps=3, finetune=True),
        StageConfig("tsr", "tsr", frames=8, height=8, width=8, fps=4.0, factor=2, steps=2),
        StageConfig("ssr", "ssr", frames=8, height=8 * ssr_factor, width=8 * ssr_factor, fps=4.0,
                    factor=ssr_factor, steps=2, finetune=True),
    )
    small = dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=4, attention_head_dim=4)
    kwargs = {"base": dict(small, position_frames=4), "tsr": dict(small, position_frames=8),
              "ssr": dict(small, frame_position=False)}
    te = text_encoder or TextEncoder("minilm")
    cascade = build_cascade(CascadeConfig(stages, te.spec(), name="tiny"), kwargs, te, seed)
    # Zero-initialised output layers would make every stage ignore its input; tests need real signal.
    gen = torch.Generator().manual_seed(seed)
    for stage in cascade.stages:
        for p in stage.denoiser.parameters():
            if not p.detach().abs().sum():
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return cascade


def load_cascade(model_dir: str | Path | None = None) -> Cascade:
    """A cascade directory, or the embedded default that ships inside the package."""
    if model_dir is not None:
        return Cascade.from_pretrained(model_dir)
    if (EMBEDDED_DIR / CASCADE_FILE).is_file():
        return Cascade.from_pretrained(EMBEDDED_DIR)
    import warnings

    from .embedded import EMBEDDED_DENOISERS, embedded_config

    warnings.warn("the embedded cascade's weights are not in this package yet: using UNTRAINED weights "
                  "(run `dreamix pretrain` to train them)")
    text_encoder = TextEncoder("minilm")
    return build_cascade(embedded_config(text_encoder.spec()), EMBEDDED_DENOISERS, text_encoder)
