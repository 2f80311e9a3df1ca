"""Exponential moving average of a stage's weights (pretraining exports the average)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of weights; the exported model is the average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.shadow = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach().to(s.device, s.dtype), 1 - d)  # DeepSpeed: bf16 or GPU weights, fp32 average
