"""A cascade stage's denoiser: diffusers' UNet3DConditionModel plus the stage's conditioning."""

from __future__ import annotations

import torch
from diffusers import UNet3DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .frame_mode import enable_frame_mode_switch, frame_mode, in_frame_mode


class StageDenoiser(ModelMixin, ConfigMixin):
    """Predicts v for a noisy clip, given text and (SR stages) the previous stage's output.

    Inputs concatenated on channels: the noisy video, the upsampled low-res condition (SR
    stages), and two frame-position planes (position in the clip, video-vs-frame flag).
    The position planes exist because diffusers' temporal layers get no frame position and
    no text; with them the spatial path can place a moving object per frame (DESIGN.md,
    first measurement). The pooled text embedding reaches every resnet via `timestep_cond`.

    `motion_planes` > 0 adds that many text-driven planes: the clip-position ramp times tanh of a
    learned projection of the pooled text. A base without them learned the axis of a translation but
    picked its direction by chance (BENCHMARKS.md, session 4): direction needs the product of text and
    frame position, which the UNet only adds. These planes hand it that product as an input.
    """

    @register_to_config
    def __init__(
        self,
        video_channels: int = 3,
        cond_channels: int = 0,
        frame_position: bool = True,
        position_frames: int = 8,
        text_dim: int = 384,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 16,
        motion_planes: int = 0,
        coord_planes: bool = False,
    ):
        super().__init__()
        if motion_planes and not frame_position:
            raise ValueError("motion_planes need frame_position (they are the position ramp times text)")
        extra = ((2 + motion_planes) if frame_position else 0) + (2 if coord_planes else 0)
        self.motion_from_text = torch.nn.Linear(text_dim, motion_planes) if motion_planes else None
        self.unet = UNet3DConditionModel(
            in_channels=video_channels + cond_channels + extra,
            out_channels=video_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=text_dim,
            attention_head_dim=attention_head_dim,
            time_cond_proj_dim=text_dim,
        )
        enable_frame_mode_switch(self.unet)

    def forward(
        self,
        sample_bcfhw: torch.Tensor,
        timestep: torch.Tensor,
        text_tokens_bld: torch.Tensor,
        text_pooled_bd: torch.Tensor,
        cond_bcfhw: torch.Tensor | None = None,
        frame_mode_on: bool = False,
    ) -> torch.Tensor:
        """v-prediction for `sample_bcfhw` at `timestep` ([B] or scalar)."""
        parts = [sample_bcfhw]
        if self.config.cond_channels:
            if cond_bcfhw is None:
                raise ValueError("this SR stage needs the previous stage's output as cond_bcfhw")
            parts.append(cond_bcfhw.to(sample_bcfhw.dtype))
        if self.config.frame_position:
            parts.append(self._position_planes(sample_bcfhw, text_pooled_bd, frame_mode_on or in_frame_mode()))
        if self.config.coord_planes:
            parts.append(self._coord_planes(sample_bcfhw))
        x = torch.cat(parts, dim=1)
        with frame_mode(frame_mode_on):
            return self.unet(x, timestep, text_tokens_bld, timestep_cond=text_pooled_bd).sample

    def motion_gain(self, text_pooled_bd: torch.Tensor) -> torch.Tensor:
        """[B, motion_planes] in (-1, 1): how strongly each motion plane's ramp runs, from the text."""
        return torch.tanh(self.motion_from_text(text_pooled_bd))

    def _position_planes(self, sample_bcfhw: torch.Tensor, text_pooled_bd: torch.Tensor,
                         frame_mode_on: bool) -> torch.Tensor:
        b, _, f, h, w = sample_bcfhw.shape
        k = self.config.motion_planes
        planes = sample_bcfhw.new_zeros(b, 2 + k, f, h, w)
        if not frame_mode_on:  # frames as images carry no position: every plane stays 0
            span = max(self.config.position_frames - 1, 1)
            pos_f = (2 * torch.arange(f, dtype=sample_bcfhw.dtype, device=sample_bcfhw.device) - (f - 1)) / span
            planes[:, 0] = pos_f.view(1, f, 1, 1)
            planes[:, 1] = 1.0
            if k:
                gain_bk = self.motion_gain(text_pooled_bd.to(sample_bcfhw.dtype))
                planes[:, 2:] = gain_bk.view(b, k, 1, 1, 1) * pos_f.view(1, 1, f, 1, 1)
        return planes

    @staticmethod
    def _coord_planes(sample_bcfhw: torch.Tensor) -> torch.Tensor:
        """x and y of every pixel in [-1, 1]; the same in frame mode (an image has positions too)."""
        b, _, f, h, w = sample_bcfhw.shape
        kw = dict(dtype=sample_bcfhw.dtype, device=sample_bcfhw.device)
        x = torch.linspace(-1, 1, w, **kw).view(1, 1, 1, 1, w).expand(b, 1, f, h, w)
        y = torch.linspace(-1, 1, h, **kw).view(1, 1, 1, h, 1).expand(b, 1, f, h, w)
        return torch.cat([x, y], dim=1)
