"""What a stage costs on this machine's accelerator: one command for the first GPU node (issue 24, item 4).

    python jobs/bench_gpu.py [--model DIR] [--out gpu_bench.md]   # real sizes; about 5 min on one GPU
    python jobs/bench_gpu.py --smoke                              # toy sizes, runs anywhere (the test suite)

Per network (the cascade's stages at their real input sizes, and a ModelScope / zeroscope-shaped UNet3D
with random weights at 576x320x24, i.e. 4x24x40x72 latents): seconds per forward (one sampling step
without guidance) and peak memory at batch 1 / 2 / 4, fp32 against the half precision `dreamix edit
--precision` uses (bf16 where the device supports it, else fp16); guidance per step as two forwards at
batch 1 (cfg_mode sequential) against one at batch 2 (batched); SDPA (diffusers' default attention
processor) against the classic math processor. Then one end-to-end edit of the cascade per precision.
Needs nothing from the internet: random weights, the embedded text encoder's dimensions.
On a CPU it says so in the report: CPU numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet3DConditionModel
from diffusers.models.attention_processor import AttnProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.config import EditConfig  # noqa: E402
from dreamix_ray.devices import resolve_device  # noqa: E402
from dreamix_ray.edit import AUTOCAST_DTYPES, edit  # noqa: E402
from dreamix_ray.models.cascade import load_cascade, tiny_cascade  # noqa: E402
from dreamix_ray.quiet import quiet_libraries  # noqa: E402
from dreamix_ray.video import Video  # noqa: E402
from dreamix_ray.world import render, sample_scene  # noqa: E402

# ModelScope text-to-video-ms-1.7b / zeroscope_v2_576w UNet3D (their unet/config.json), 576x320 latents / 8.
MODELSCOPE_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                       cross_attention_dim=1024, attention_head_dim=64, layers_per_block=2)
MODELSCOPE_LATENTS = (4, 24, 40, 72)  # channels, frames, height, width
SMOKE_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), cross_attention_dim=32,
                  attention_head_dim=4, layers_per_block=1, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
SMOKE_LATENTS = (4, 4, 8, 8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> str:
    """Peak allocated memory since the last reset (CUDA); on a CPU, the process's peak RSS (never resets)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} (RSS)"


def half_precision(device: torch.device) -> str:
    """bf16 where the device computes it natively, else fp16 (pre-Ampere GPUs)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def networks(cascade, device: torch.device, smoke: bool):
    """(name, module, make_inputs(batch) -> forward kwargs-free call) for every network to measure."""
    out = []
    tokens, pooled = cascade.text_encoder(["a red circle moving left on a blue background"])
    tokens, pooled = tokens.to(device), pooled.to(device)
    for stage in cascade.stages:
        sc, net = stage.config, stage.denoiser
        shape = (3, sc.frames, sc.height, sc.width)  # an SR stage's condition is its input upsampled to this

        def call(net_, b, sc=sc, shape=shape):
            x = torch.randn(b, *shape, device=device)
            cond = torch.randn(b, *shape, device=device) if sc.kind != "base" else None
            t = torch.full((b,), 500, device=device)
            tok, pool = tokens.expand(b, -1, -1), pooled.expand(b, -1)
            return lambda: net_(x, t, tok, pool, cond)
        out.append((f"{cascade.config.name} {sc.name} {shape[1]}x{shape[2]}x{shape[3]}", net, call))
    kwargs, latents = (SMOKE_UNET, SMOKE_LATENTS) if smoke else (MODELSCOPE_UNET, MODELSCOPE_LATENTS)
    unet = UNet3DConditionModel(**kwargs).eval().to(device)  # random weights: speed and memory only

    def call_unet(net_, b):
        x = torch.randn(b, *latents, device=device)
        text = torch.randn(b, 77, kwargs["cross_attention_dim"], device=device)
        t = torch.full((b,), 500, device=device)
        return lambda: net_(x, t, text).sample
    label = "toy UNet3D" if smoke else "ModelScope-shaped UNet3D"
    out.append((f"{label} {latents[1]}x{latents[2] * 8}x{latents[3] * 8} (latents "
                f"{'x'.join(map(str, latents))})", unet, call_unet))
    return out


def measure(name, net, call, device, precisions, batches, reps) -> list[str]:
    rows = []
    math_net = copy.deepcopy(net)
    math_net.unet.set_attn_processor(AttnProcessor()) if hasattr(math_net, "unet") else \
        math_net.set_attn_processor(AttnProcessor())
    for precision in precisions:
        ctx = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]) if precision != "fp32"
               else contextlib.nullcontext())
        per_batch = {}
        for b in batches:
            reset_peak(device)
            with torch.inference_mode(), ctx:
                per_batch[b] = timed(call(net, b), device, reps)
            rows.append(f"| {name} | {precision} | {b} | {per_batch[b]:.4f} | {peak_mib(device)} | | |")
        with torch.inference_mode(), ctx:
            math_s = timed(call(math_net, 1), device, reps)
        if 2 in per_batch:
            rows.append(f"| {name} | {precision} | guided, 1 row | sequential {2 * per_batch[1]:.4f} / batched "
                        f"{per_batch[2]:.4f} | | | SDPA {per_batch[1]:.4f} / math {math_s:.4f} |")
    return rows


def end_to_end(cascade, device, precisions, smoke: bool) -> list[str]:
    last = cascade.stages[-1].config
    video = Video(render(sample_scene(np.random.default_rng(0), motion="right"), last.frames, last.height, last.fps),
                  last.fps)
    rows = []
    for precision in precisions:
        cfg = EditConfig(strength=0.9, precision=precision, steps=(2,) if smoke else ())
        edit(video, "warm up", EditConfig(steps=(1,), precision=precision), cascade)
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out = edit(video, "a red circle moving left on a blue background", cfg, cascade)
        sync(device)
        rows.append(f"| {cascade.config.name}, {out.num_frames} frames {out.width}x{out.height} | {precision} | "
                    f"{time.perf_counter() - start:.2f} | {peak_mib(device)} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="toy sizes (a tiny cascade and UNet3D), any machine")
    p.add_argument("--reps", type=int, default=None, help="timed forwards per cell (default 5; 1 with --smoke)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = p.parse_args()
    quiet_libraries()
    device = resolve_device(args.device)
    cascade = (tiny_cascade() if args.smoke else load_cascade(args.model)).to(device)
    precisions = ["fp32", half_precision(device)]
    batches, reps = ((1, 2) if args.smoke else (1, 2, 4)), args.reps or (1 if args.smoke else 5)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads): "
                  "ran on CPU, these numbers say nothing about a GPU")
    lines = [f"`python jobs/bench_gpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"Device: {where}; torch {torch.__version__}; {'toy sizes (--smoke)' if args.smoke else 'real sizes'}.",
             "", "| network | precision | batch | s / forward | peak MiB | | attention (batch 1) |",
             "|---|---|---|---:|---:|---|---|"]
    for name, net, call in networks(cascade, device, args.smoke):
        lines += measure(name, net, call, device, precisions, batches, reps)
        print(f"measured {name}", file=sys.stderr, flush=True)
    lines += ["", "| end-to-end edit | precision | seconds | peak MiB |", "|---|---|---:|---:|"]
    lines += end_to_end(cascade, device, precisions, args.smoke)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
