"""Start a stage from trained weights, growing convs that gained input channels."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def warm_start(model: torch.nn.Module, weights_dir: str | Path) -> str:
    """Load a trained stage's weights into `model` (see PretrainConfig.init_from); returns a summary."""
    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {weights_dir} to warm-start from")
    trained, own = load_file(str(files[0])), model.state_dict()
    grown, unknown = [], [k for k in trained if k not in own]
    with torch.no_grad():
        for name, value in trained.items():
            if name not in own:
                continue
            target = own[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif _more_input_channels(target.shape, value.shape):
                target[:, :value.shape[1]].copy_(value)  # the new input channels keep their init
                grown.append(name)
            else:
                raise ValueError(f"{weights_dir}: {name} has shape {tuple(value.shape)}, this model "
                                 f"{tuple(target.shape)}: not the same architecture")
    if unknown:
        raise ValueError(f"{weights_dir} has weights this model lacks ({unknown[:3]}...): another architecture")
    new = [k for k in own if k not in trained]
    return f"{len(trained) - len(grown)} tensors copied, grown {grown or 'none'}, new {new or 'none'}"


def _more_input_channels(new: torch.Size, old: torch.Size) -> bool:
    """A conv weight [out, in, ...] that only gained input channels."""
    return (len(new) == len(old) >= 2 and new[1] > old[1]
            and new[0] == old[0] and tuple(new[2:]) == tuple(old[2:]))
