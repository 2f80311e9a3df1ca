"""Frame mode (paper Sec. 4.2): the temporal layers are masked so frames act as independent images.

Every temporal conv and every temporal transformer (transformer_in included) returns its input:
their residual branches are masked, so each frame sees only itself and the temporal parameters
are frozen, as the paper's image pretraining and frame finetuning do (imagen-pytorch calls this
`ignore_time`). `num_frames=1` alone is not frame mode: the layers would still act on each frame.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import (
    TransformerTemporalModel, TransformerTemporalModelOutput,
)

# Per-thread so two requests sharing one model (a serving replica) do not see each other's mode.
_state = threading.local()


def in_frame_mode() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def frame_mode(enabled: bool = True):
    """Within this block, every model prepared by `enable_frame_mode_switch` runs in frame mode."""
    if not enabled:
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def temporal_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers frame mode masks: temporal convs and temporal transformers (incl. transformer_in)."""
    return [m for m in model.modules() if isinstance(m, (TemporalConvLayer, TransformerTemporalModel))]


def temporal_parameter_names(model: torch.nn.Module) -> set[str]:
    mods = {id(m) for m in temporal_modules(model)}
    names = set()
    for mod_name, mod in model.named_modules():
        if id(mod) in mods:
            names.update(f"{mod_name}.{p}" if mod_name else p for p, _ in mod.named_parameters())
    return names


class _MaskableTemporalConv(TemporalConvLayer):
    """A TemporalConvLayer that returns its input in frame mode."""

    def forward(self, hidden_states, num_frames: int = 1):
        return hidden_states if in_frame_mode() else super().forward(hidden_states, num_frames=num_frames)


class _MaskableTransformerTemporal(TransformerTemporalModel):
    """A TransformerTemporalModel that returns its input in frame mode."""

    def forward(self, hidden_states, *args, **kwargs):
        if not in_frame_mode():
            return super().forward(hidden_states, *args, **kwargs)
        return TransformerTemporalModelOutput(sample=hidden_states) if kwargs.get("return_dict", True) \
            else (hidden_states,)


def enable_frame_mode_switch(model: torch.nn.Module) -> torch.nn.Module:
    """Give the temporal layers their frame-mode switch (a class swap, so copies and pickles keep it)."""
    for m in temporal_modules(model):
        if type(m) is TemporalConvLayer:
            m.__class__ = _MaskableTemporalConv
        elif type(m) is TransformerTemporalModel:
            m.__class__ = _MaskableTransformerTemporal
    return model
