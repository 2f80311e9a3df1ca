"""The loop's engines: plain torch, DDP (torch.distributed) or DeepSpeed ZeRO, one interface.

An engine owns the optimizer of one stage's module: it backpropagates each micro-step's loss, steps
(clipping the global gradient norm), saves and loads its state under `optim/` of a checkpoint, and
exports the trained weights. Every engine uses MaskedAdamW on the same two parameter groups, so a
frame step moves no temporal weight on any engine.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..models import adapters
from ..models.frame_mode import temporal_parameter_names
from ..models.weights import save_denoiser
from .checkpoint import ResumeError

ENGINES = ("torch", "ddp", "deepspeed")


@dataclass(frozen=True)
class EngineConfig:
    """How the loop runs a step; none of it changes the result beyond float reduction order."""

    kind: str = "torch"  # torch (one process) | ddp | deepspeed (ranks from torch.distributed)
    zero: int = 2  # DeepSpeed ZeRO stage
    precision: str = "auto"  # DeepSpeed: auto = bf16 on GPUs that support it, else fp32
    micro_steps: int = 1  # gradient accumulation: micro-steps per optimizer step
    deepspeed: dict = field(default_factory=dict)  # a DeepSpeed config over the defaults (ZeRO knobs)

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"unknown training engine {self.kind!r}: choose one of {ENGINES}")

    def layout(self, world: int) -> str:
        """How the optimizer state is cut: a checkpoint resumes only under the same layout."""
        return f"zero{self.zero}x{world}" if self.kind == "deepspeed" else "full"


class MaskedAdamW(torch.optim.AdamW):
    """AdamW that leaves groups marked `frame_masked` untouched while `masking` is on: ZeRO hands every
    flat partition a (zero) gradient, and without this Adam's momentum would move the temporal layers
    on frame steps, which per-parameter AdamW (grad None -> skipped) never does. Groups are found
    by their mark, since ZeRO steps one group (or sub-group) at a time with the others swapped out."""

    masking: bool = False

    def step(self, closure=None):
        masked = [g for g in self.param_groups if self.masking and g.get("frame_masked")]
        stashed = [(p, p.grad) for g in masked for p in g["params"]]
        for p, _ in stashed:
            p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, g in stashed:
                p.grad = g


def param_groups(module: torch.nn.Module) -> list[dict]:
    """The trained parameters, spatial and temporal apart; the temporal group (the names frame mode masks,
    LoRA layers inside them included) is marked."""
    temporal = temporal_parameter_names(module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n not in temporal]},
              {"params": [p for n, p in named if n in temporal], "frame_masked": True}]
    return [g for g in groups if g["params"]]


def _trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state without its frozen weights (a LoRA run's base): checkpoints stay adapter-sized."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def memory_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds for parameters (ZeRO-3: its partition), gradients (ZeRO-3: its partition's flat
    buffer; torch / DDP: the trained weights' .grad) and optimizer (fp32 master + moments)."""
    def nbytes(t):
        return t.numel() * t.element_size()

    seen, params = set(), 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps only this rank's partition in ds_tensor
        params += nbytes(t)
        seen.add(t.data_ptr())
    base = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside a ZeRO wrapper
    # fp32 master partitions: ZeRO-3 swaps them out of the param groups between sub-group steps
    masters = (getattr(optimizer, "fp32_partitioned_groups_flat", None)
               or getattr(optimizer, "single_partition_of_fp32_groups", None)
               or [p for g in base.param_groups for p in g["params"]])
    opt = sum(nbytes(m) for m in masters if m.data_ptr() not in seen)  # torch / DDP: the weights themselves
    opt += sum(nbytes(v) for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3 reduces each rank's part into it
    grads = nbytes(flat) if flat is not None else sum(nbytes(p.grad) for p in module.parameters()
                                                      if p.grad is not None)
    return {"params": params, "grads": grads, "optimizer": opt}


class _Wrapped:
    """A wrapped module (DDP, a DeepSpeed engine) in the Stage's denoiser slot, with the stage signature."""

    def __init__(self, wrapped, device: torch.device, dtype: torch.dtype = torch.float32):
        self.wrapped, self.device, self.dtype = wrapped, device, dtype

    def __call__(self, x, t, tokens, pooled, cond=None, frame_mode_on: bool = False):
        def cast(v):  # DeepSpeed bf16: inputs in the engine dtype, the loss in fp32
            return None if v is None else v.to(self.dtype)

        return self.wrapped(cast(x), t, cast(tokens), cast(pooled), cast(cond), frame_mode_on=frame_mode_on).float()


class TorchEngine:
    """One process: MaskedAdamW on the module itself, torch's global-norm clipping."""

    def __init__(self, cfg: EngineConfig, module: torch.nn.Module, lr: float, grad_clip: float, device=None):
        self.cfg, self.module, self.grad_clip = cfg, module, grad_clip
        self.optimizer = MaskedAdamW(param_groups(module), lr=lr, weight_decay=0.0)
        self.denoiser = module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def begin(self, frames_step: bool) -> None:
        self.optimizer.masking = frames_step
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, last: bool):
        """Context of one micro-step's forward and backward; `last` ends the optimizer step's batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip and step; returns the global gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(norm)

    def gathered(self):
        """Context in which every rank holds all of the module's parameters (for the EMA)."""
        return contextlib.nullcontext()

    def save(self, folder: Path, rank: int) -> None:
        if rank == 0:  # the state is the same on every rank
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"model": _trained_state(self.module), "optimizer": self.optimizer.state_dict()},
                       folder / "state.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
        result = self.module.load_state_dict(state["model"], strict=False)  # frozen weights: the spec's own
        missing = sorted(set(result.missing_keys) - frozen)
        if result.unexpected_keys or missing:
            raise ResumeError(f"{folder} was checkpointed with other finetuning settings (missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}): use a new run name")
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self, folder: Path, rank: int) -> None:
        """The trained weights in diffusers format, or the LoRA adapter alone in peft's (a collective for
        DeepSpeed: every rank calls it)."""
        if rank == 0:
            if adapters.has_adapter(self.module):
                adapters.save_adapter(self.module, folder)
            else:
                save_denoiser(self.module, folder)

    def memory(self) -> dict:
        return memory_bytes(self.module, self.optimizer)

    def close(self) -> None:
        pass


class DDPEngine(TorchEngine):
    """torch.distributed data parallel: every rank holds the whole model and optimizer."""

    def __init__(self, cfg: EngineConfig, module: torch.nn.Module, lr: float, grad_clip: float, device=None):
        super().__init__(cfg, module, lr, grad_clip)
        device = torch.device(device or "cpu")
        # frame steps leave the temporal layers out of the graph: DDP must look for unused parameters
        self.ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                           find_unused_parameters=True)
        self.denoiser = _Wrapped(self.ddp, device)

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()  # one all-reduce per optimizer step


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO-2 / ZeRO-3: optimizer state (and under ZeRO-3 the weights) partitioned over ranks."""

    def __init__(self, cfg: EngineConfig, module: torch.nn.Module, lr: float, grad_clip: float, device=None):
        import deepspeed  # optional dependency (the ray extra), needed only by this engine

        world = torch.distributed.get_world_size()
        self.cfg, self.module, self.grad_clip = cfg, module, grad_clip
        self.masked = MaskedAdamW(param_groups(module), lr=lr, weight_decay=0.0)
        bf16 = _bf16(cfg.precision, torch.device(device or "cpu"))
        ds_cfg = deepspeed_config(cfg.deepspeed, cfg.zero, world, cfg.micro_steps, grad_clip, bf16)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=self.masked, config=ds_cfg)
        self.denoiser = _Wrapped(self.engine, torch.device(self.engine.device),
                                 torch.bfloat16 if bf16 else torch.float32)

    def begin(self, frames_step: bool) -> None:
        self.masked.masking = frames_step  # DeepSpeed zeroes the gradients itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the part scales already sum to the batch mean
        self.engine.step()  # counts micro-steps; steps the optimizer at the boundary

    def step(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def gathered(self):
        if self.cfg.zero != 3:
            return contextlib.nullcontext()
        import deepspeed  # optional dependency, as above

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))  # a collective

    def save(self, folder: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(folder), tag="ds")  # every rank writes its shards

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="ds")

    def export(self, folder: Path, rank: int) -> None:
        if adapters.has_adapter(self.module):
            trained = {n for n, p in self.module.named_parameters() if p.requires_grad}
            weights = full_state_dict(self.module, trained)
            if rank == 0:
                adapters.save_adapter(self.module, folder, weights)
            return
        # only rank 0 keeps the gathered weights, and writes them in the stage family's layout without building a
        # second copy of the model: at 0.5B+ parameters that copy is GBs
        weights = full_state_dict(self.module, keep=rank == 0)
        if rank == 0:
            save_denoiser(self.module, folder, weights)

    def close(self) -> None:
        self.engine.destroy()


def open_engine(cfg: EngineConfig, module: torch.nn.Module, lr: float, grad_clip: float, device=None):
    """The engine `cfg.kind` names, around `module` (trained in place)."""
    kind = {"torch": TorchEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine}[cfg.kind]
    return kind(cfg, module, lr, grad_clip, device)


def full_state_dict(module: torch.nn.Module, only: set[str] | None = None, keep: bool = True
                    ) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from the ZeRO partitions (a collective: every rank calls it); `only` = just these
    parameters (a LoRA adapter's), without buffers; keep=False takes part in the gathers and keeps nothing."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,  # optional dependency, as above
    )

    out = {}
    for name, p in module.named_parameters():
        if only is not None and name not in only:
            continue
        full = safe_get_full_fp32_param(p)
        if keep:
            out[name] = (p.data if full is None else full).detach().float().cpu().clone()
    if only is None and keep:
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return out


def deepspeed_config(base: dict, zero: int, world: int, micro_steps: int, grad_clip: float, bf16: bool) -> dict:
    """The DeepSpeed config with the fields the loop owns filled in (batch sizes are nominal: the loop
    feeds its own parts and DeepSpeed only counts micro-steps)."""
    cfg = json.loads(json.dumps(base))
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": zero}
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=micro_steps,
               train_batch_size=world * micro_steps, gradient_clipping=grad_clip,
               zero_allow_untested_optimizer=True)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bf16}
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"
