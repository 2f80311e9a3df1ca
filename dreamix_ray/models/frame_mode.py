"""Frame mode (paper Sec. 4.2): temporal convs bypassed, temporal attention within each frame.

`num_frames=1` alone is not frame mode: diffusers' temporal layers would still mix the
frames of a batch laid out as video. Here every temporal conv returns its input unchanged
(the residual branch is masked) and every temporal transformer is told each frame is its
own one-frame clip, which is attention masked to the diagonal.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

# Per-thread so two requests sharing one model (a serving replica) do not see each other's mode.
_state = threading.local()


def in_frame_mode() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def frame_mode(enabled: bool = True):
    """Within this block, every model patched by `enable_frame_mode_switch` runs in frame mode."""
    if not enabled:
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _frames_as_single_clips(module, args, kwargs):
    if in_frame_mode():
        kwargs = dict(kwargs, num_frames=1)
    return args, kwargs


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


def enable_frame_mode_switch(model: torch.nn.Module) -> torch.nn.Module:
    """Install the hooks once; they act only inside `with frame_mode():`."""
    if getattr(model, "_frame_mode_hooks", False):
        return model
    for m in temporal_modules(model):
        if isinstance(m, TemporalConvLayer):
            m.forward = _identity_in_frame_mode(m.forward)
        else:
            m.register_forward_pre_hook(_frames_as_single_clips, with_kwargs=True)
    model._frame_mode_hooks = True
    return model


def _identity_in_frame_mode(forward):
    def wrapped(hidden_states, num_frames: int = 1):
        if in_frame_mode():
            return hidden_states
        return forward(hidden_states, num_frames=num_frames)

    return wrapped
