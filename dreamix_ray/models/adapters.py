"""LoRA adapters (peft) on a stage's denoiser: what finetuning trains by default, and how an artifact's
adapter goes onto a base that is already in memory.

An adapter is saved in peft's own layout (`adapter_model.safetensors` + `adapter_config.json`, so
`PeftModel.from_pretrained` reads it too). `merged_copy` puts it on a base without reloading or changing
the base: the copy shares every module and tensor with the base except the adapted layers (and the
modules above them), whose weights it owns with the adapter merged in (peft's merge, then its unload).
A row then runs a plain denoiser at the base's speed, and rows of different artifacts cannot see each
other's adapters, whatever their order.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from .frame_mode import temporal_modules

# Which attention projections carry the adapter. "temporal" / "spatial" split the UNet families the way
# MotionDirector does (temporal transformers vs the per-frame attention); Wan's attention is joint. A denoiser
# may name FFN projections to adapt too (`lora_ffn_projections`: Wan's, where the FFN holds most weights).
LORA_TARGETS = ("attention", "spatial", "temporal")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's; a denoiser carries at most one adapter (training only)


def target_modules(denoiser: torch.nn.Module, targets: str, stage: str = "") -> list[str]:
    """Names of the Linear projections `targets` (one of LORA_TARGETS) selects in this denoiser."""
    masked = {id(m) for m in temporal_modules(denoiser)}
    temporal = [name for name, m in denoiser.named_modules() if id(m) in masked]
    if targets != "attention" and not temporal:
        raise ConfigError(f"stage {stage!r} has no separate temporal layers (joint space-time attention): "
                          f"use lora_targets 'attention', not {targets!r}")
    projections = PROJECTIONS + tuple(getattr(denoiser, "lora_ffn_projections", ()))
    names = []
    for name, m in denoiser.named_modules():
        if not isinstance(m, torch.nn.Linear) or not any(name.endswith("." + p) for p in projections):
            continue
        in_temporal = any(name.startswith(t + ".") for t in temporal)
        if targets == "attention" or (targets == "temporal") == in_temporal:
            names.append(name)
    if not names:
        raise ConfigError(f"stage {stage!r} has no attention projections ({', '.join(PROJECTIONS)}) for LoRA; "
                          "finetune it with adapter 'full'")
    return sorted(names)


def lora_config(denoiser: torch.nn.Module, rank: int, alpha: float, targets: str, stage: str = "") -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules(denoiser, targets, stage),
                      init_lora_weights=True)


def add_adapter(denoiser: torch.nn.Module, config: LoraConfig, seed: int) -> torch.nn.Module:
    """Inject a fresh adapter into `denoiser` in place (B = 0, so it starts as the base); A is drawn from
    `seed`, so every rank and every resumed run builds the same module."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"lora:{seed}".encode()).digest()[:8], "little"))
        return inject_adapter_in_model(config, denoiser, ADAPTER_NAME)


def has_adapter(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name  # peft's own test (get_peft_model_state_dict)


def mark_trainable(module: torch.nn.Module) -> None:
    """Only the adapter trains when the module carries one (the base stays frozen), else every weight."""
    adapter = has_adapter(module)
    for name, p in module.named_parameters():
        p.requires_grad_(not adapter or is_adapter_parameter(name))


def save_adapter(module: torch.nn.Module, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The module's adapter in peft's layout; `weights` = its full state gathered elsewhere (ZeRO)."""
    state = get_peft_model_state_dict(module, state_dict=weights, adapter_name=ADAPTER_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    module.peft_config[ADAPTER_NAME].save_pretrained(str(folder))


def is_adapter_dir(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file()


def merged_copy(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """A denoiser equal to `base` with the adapter in `folder` merged in; `base` is neither changed nor
    copied beyond the adapted layers' weights (every other tensor is shared)."""
    config = LoraConfig.from_pretrained(str(folder))
    weights = load_file(str(folder / WEIGHTS_FILE))
    # the adapted layers by their full names, from the stored weights: peft saves target_modules shortened
    # to suffixes, which could also match a layer of the shared (base) modules
    config.target_modules = sorted({k.split(".lora_")[0] for k in weights})
    copied = _copy_along(base, config.target_modules)
    # low_cpu_mem_usage: the adapter is created empty and takes the stored weights, with no random init
    inject_adapter_in_model(config, copied, ADAPTER_NAME, low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(copied, weights, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True)
    missing = [k for k in result.missing_keys if is_adapter_parameter(k)]
    if result.unexpected_keys or missing:
        raise ConfigError(f"the adapter in {folder} does not fit this stage's denoiser "
                          f"(unexpected {result.unexpected_keys[:2]}, missing {missing[:2]})")
    for name, module in list(copied.named_modules()):
        if isinstance(module, BaseTunerLayer):
            layer = module.get_base_layer()
            # peft merges in place: into a weight of the copy's own, never the shared base's
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            module.merge(adapter_names=[ADAPTER_NAME])
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, layer)  # peft's unload: the plain layer back in place
    copied.__dict__.pop("peft_config", None)
    return copied  # (peft also turned requires_grad off on the shared base weights; inference never needs it)


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    twin = copy.copy(module)  # the same attributes; its own child and parameter tables below
    twin._modules, twin._parameters = dict(module._modules), dict(module._parameters)
    return twin


def _copy_along(root: torch.nn.Module, names) -> torch.nn.Module:
    """`root` again, where only the modules on the way to `names` are new objects: every other module and
    every tensor is root's (a deep copy of a whole UNet costs more than the merge itself)."""
    copies = {"": _shallow(root)}
    for name in sorted(names):
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path not in copies:
                parent = copies[".".join(parts[:depth - 1])]
                copies[path] = parent._modules[parts[depth - 1]] = _shallow(parent._modules[parts[depth - 1]])
    return copies[""]
