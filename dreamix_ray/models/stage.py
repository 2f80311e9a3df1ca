"""A cascade stage's denoiser: diffusers' UNet3DConditionModel plus the stage's conditioning."""

from __future__ import annotations

import torch
from diffusers import UNet3DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .frame_mode import enable_frame_mode_switch, frame_mode, in_frame_mode
from .temporal_conv import use_frame_axis_convs


class StageDenoiser(ModelMixin, ConfigMixin):
    """Predicts v for a noisy clip, given text and (SR stages) the previous stage's output.

    Inputs concatenated on channels: the noisy video, the upsampled low-res condition (SR
    stages), and two frame-position planes (position in the clip, video-vs-frame flag).
    The position planes exist because diffusers' temporal layers get no frame position and
    no text; with them the spatial path can place a moving object per frame (DESIGN.md,
    first measurement). The pooled text embedding reaches every resnet via `timestep_cond`.
    (Text-driven motion planes and x / y coordinate planes were tried for the base and are not shipped:
    BENCHMARKS.md, sessions 4-6.)
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
    ):
        super().__init__()
        extra = 2 if frame_position else 0
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
        use_frame_axis_convs(self.unet)

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
            parts.append(self._position_planes(sample_bcfhw, frame_mode_on or in_frame_mode()))
        x = torch.cat(parts, dim=1)
        with frame_mode(frame_mode_on):
            return self.unet(x, timestep, text_tokens_bld, timestep_cond=text_pooled_bd).sample

    def _position_planes(self, sample_bcfhw: torch.Tensor, frame_mode_on: bool) -> torch.Tensor:
        """[B, 2, F, H, W]: the frame's position in the clip and a video-vs-frame flag (both 0 in frame mode)."""
        b, _, f, h, w = sample_bcfhw.shape
        planes = sample_bcfhw.new_zeros(b, 2, f, h, w)
        if not frame_mode_on:  # frames as images carry no position: every plane stays 0
            span = max(self.config.position_frames - 1, 1)
            pos_f = (2 * torch.arange(f, dtype=sample_bcfhw.dtype, device=sample_bcfhw.device) - (f - 1)) / span
            planes[:, 0] = pos_f.view(1, f, 1, 1)
            planes[:, 1] = 1.0
        return planes
