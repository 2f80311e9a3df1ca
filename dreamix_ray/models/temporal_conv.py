"""UNet3D's temporal convolutions on CPU as the 2D convolutions they are.

diffusers' TemporalConvLayer convolves over frames only: Conv3d kernels of (3, 1, 1). PyTorch's CPU
backend has no fast path for that shape in fp32 and runs it in `slow_conv3d` (im2col + matmul), about a
fifth of an SSR forward at 1 thread. Seen as a [B, C, F, H*W] image, the same convolution is a Conv2d with
a (3, 1) kernel, which oneDNN runs 2-5x faster (BENCHMARKS.md, "Faster edits on CPU"). Same weights, same
parameter names and state dict, same result up to float summation order; CUDA keeps cuDNN's Conv3d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FrameAxisConv3d(torch.nn.Conv3d):
    """A Conv3d with a (k, 1, 1) kernel that runs as a Conv2d over [B, C, F, H*W] on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        b, _, f, h, w = x.shape
        y = F.conv2d(x.reshape(b, x.shape[1], f, h * w), self.weight.squeeze(-1), self.bias,
                     stride=self.stride[:2], padding=self.padding[:2], dilation=self.dilation[:2], groups=self.groups)
        return y.reshape(b, y.shape[1], y.shape[2], h, w)


def use_frame_axis_convs(model: torch.nn.Module) -> torch.nn.Module:
    """Every Conv3d over frames alone (kernel, stride (k, 1, 1), no spatial padding: in a UNet3D, the temporal
    convs) becomes a FrameAxisConv3d; a class swap, so weights, names and pickles stay."""
    for conv in model.modules():
        if type(conv) is torch.nn.Conv3d and conv.kernel_size[1:] == (1, 1) and conv.stride[1:] == (1, 1) \
                and conv.padding[1:] == (0, 0) and conv.padding_mode == "zeros":
            conv.__class__ = FrameAxisConv3d
    return model
