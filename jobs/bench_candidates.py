"""Speed candidates per stage network, side by side in one process (issue 24, item 1).

    python jobs/bench_candidates.py [--model DIR] [--threads 1] [--reps 5] [--stages base tsr ssr]
        [--modes fp32 bf16 cl bf16+cl mathproc bf16+mathproc compile]

One forward of each stage at its real input size, per candidate, interleaved (the order reverses every
round), medians; the speedup is against the first mode, and maxerr is the largest |v| difference from it.
Modes, joined by "+": fp32 (nothing), conv3d (the temporal convs as the plain Conv3d of releases before
models/temporal_conv.py), bf16 (torch.autocast on the CPU, as `--precision bf16`), cl (conv
weights in channels-last memory format), mathproc (diffusers' classic AttnProcessor instead of SDPA),
compile (torch.compile of the network; its first call, the compile, is reported apart).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.models.cascade import load_cascade  # noqa: E402
from dreamix_ray.models.temporal_conv import FrameAxisConv3d  # noqa: E402
from dreamix_ray.quiet import quiet_libraries  # noqa: E402


def prepared(net: torch.nn.Module, parts: list[str]) -> torch.nn.Module:
    net = copy.deepcopy(net)
    if "conv3d" in parts:  # the temporal convs as Conv3d again, as before models/temporal_conv.py
        for mod in net.modules():
            if type(mod) is FrameAxisConv3d:
                mod.__class__ = torch.nn.Conv3d
    if "mathproc" in parts:
        net.unet.set_attn_processor(AttnProcessor())
    if "cl" in parts:
        for mod in net.modules():
            if type(mod) is torch.nn.Conv3d:  # a FrameAxisConv3d runs as a Conv2d over a [B, C, F, H*W] view
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(mod, torch.nn.Conv2d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
    return torch.compile(net) if "compile" in parts else net


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stages", nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "cl", "bf16+cl", "mathproc", "bf16+mathproc"])
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    cascade = load_cascade(args.model)
    tokens, pooled = cascade.text_encoder(["a red circle moving left on a blue background"])
    t = torch.tensor([500])
    print(f"threads {args.threads}, reps {args.reps}")
    for stage in cascade.stages:
        sc = stage.config
        if args.stages and sc.name not in args.stages:
            continue
        x = torch.randn(1, 3, sc.frames, sc.height, sc.width)
        cond = torch.randn_like(x) if sc.kind != "base" else None
        calls = {}
        for mode in args.modes:
            parts, net = mode.split("+"), prepared(stage.denoiser, mode.split("+"))

            def call(net=net, parts=parts):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in parts else contextlib.nullcontext()
                with torch.inference_mode(), ctx:
                    return net(x, t, tokens, pooled, cond).float()
            calls[mode] = call
        times = {m: [] for m in args.modes}
        for mode, call in calls.items():
            start = time.perf_counter()
            call()
            if "compile" in mode:
                print(f"{sc.name} {mode}: first call (compile) {time.perf_counter() - start:.1f} s")
        for r in range(args.reps):
            for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
                start = time.perf_counter()
                calls[mode]()
                times[mode].append(time.perf_counter() - start)
        ref, first = calls[args.modes[0]](), statistics.median(times[args.modes[0]])
        for mode in args.modes:
            med = statistics.median(times[mode])
            err = (calls[mode]() - ref).abs().max().item()
            print(f"{sc.name} {sc.frames}x{sc.height}x{sc.width} {mode}: {med:.4f} s/forward, "
                  f"speedup {first / med:.2f}, maxerr {err:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
