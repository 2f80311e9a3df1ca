"""One way to save and reload a stage denoiser's weights, for every stage family.

A stage denoiser is one diffusers model (StageDenoiser, the ModelScope UNet, WanDenoiser) or a wrapper holding
some (WanExperts: two transformers; LTXStageNet: the shared transformer). `saved_models` says which diffusers
models a denoiser holds, under which parameter-name prefix and in which subfolder, so the same writer saves the
module's own tensors (one process) or weights gathered from ZeRO-3 partitions (whose module holds placeholders),
in diffusers' format either way: each folder has config.json and the weights, and `from_pretrained` reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

SavedModels = dict[str, tuple[str, ModelMixin]]  # subfolder ("" = the folder itself) -> (name prefix, model)


class TransformerWrapper(torch.nn.Module):
    """A stage denoiser wrapping diffusers' `self.transformer` (WanExperts, LTXStageNet): it says where it is and in
    which dtype as a diffusers ModelMixin does, which the training loop asks."""

    transformer: ModelMixin

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


def saved_models(denoiser: torch.nn.Module) -> SavedModels:
    """The diffusers models `denoiser` is saved as: its own `saved_models()` (a wrapper), or itself."""
    own = getattr(denoiser, "saved_models", None)
    if own is not None:
        return own()
    if isinstance(denoiser, ModelMixin):
        return {"": ("", denoiser)}
    raise TypeError(f"{type(denoiser).__name__} is neither a diffusers model nor a wrapper with saved_models()")


def save_denoiser(denoiser: torch.nn.Module, folder: str | Path, weights: dict[str, torch.Tensor] | None = None
                  ) -> None:
    """`denoiser` in diffusers' format under `folder`; `weights` = its full state by parameter name, gathered
    elsewhere (ZeRO-3), else the module's own tensors (diffusers' save_pretrained, sharded when large)."""
    for sub, (prefix, model) in saved_models(denoiser).items():
        out = Path(folder, sub)
        if weights is None:
            model.save_pretrained(out)
            continue
        # the names of the model's persistent state (under ZeRO-3 the tensors are empty placeholders): no
        # second copy of the model is built, only this file's dict of the gathered tensors
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: weights[prefix + k].contiguous() for k in model.state_dict()},
                  str(out / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        model.save_config(out)


def load_denoiser(like: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """A denoiser of `like`'s family with the weights `save_denoiser` wrote in `folder` (a full finetune): the
    wrapper's `reloaded(folder)` (it keeps what is not saved, such as a boundary or fps), or from_pretrained."""
    reload = getattr(like, "reloaded", None)
    if reload is not None:
        return reload(folder)
    if isinstance(like, ModelMixin):
        return type(like).from_pretrained(folder)
    raise TypeError(f"{type(like).__name__} is neither a diffusers model nor a wrapper with reloaded()")
