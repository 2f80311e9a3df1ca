"""What a stage costs on this machine's accelerator: one command for the first GPU node (issue 24, item 4).

    python jobs/bench_gpu.py [--model DIR] [--out gpu_bench.md] [--compile]   # real sizes; about 6 min on one A100
    python jobs/bench_gpu.py --smoke                                          # toy sizes, runs anywhere (the tests)

Per network (the cascade's stages at their real input sizes; with random weights, a ModelScope / zeroscope-shaped
UNet3D at 576x320x24, i.e. 4x24x40x72 latents, a Wan2.1-T2V-1.3B-shaped transformer at 832x480x81 (16x21x60x104
latents) and an LTX-Video-2B-shaped one at 704x480x121 (128x16x15x22)): seconds per forward (one sampling step
without guidance) and peak memory at batch 1 / 2 / 4 (1 / 2 and one timed forward for the two video transformers),
fp32 against the half precision `dreamix edit --precision` uses (bf16 where the device supports it, else fp16);
guidance per step as two forwards at batch 1 (cfg_mode sequential) against one at batch 2 (batched); SDPA
(diffusers' default attention) against the classic math attention; with --compile, the half-precision forward under
torch.compile, its first call (which compiles) reported apart. Then the Wan VAE's decode at batch 2, plain /
enable_tiling() / enable_slicing(); one end-to-end edit of the cascade per precision; and the cascade's edit at 1x /
2x / 4x its clip length with the last SSR in chunks of its own length: peak memory against clip length.
A cell that does not fit in the accelerator's memory says so, and the run goes on.
Needs nothing from the internet: random weights, the embedded text encoder's dimensions.
On a CPU it says so in the report: CPU numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKLWan, LTXVideoTransformer3DModel, UNet3DConditionModel
from diffusers.models.attention_processor import AttnProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.config import EditConfig  # noqa: E402
from dreamix_ray.devices import resolve_device  # noqa: E402
from dreamix_ray.edit import AUTOCAST_DTYPES, edit  # noqa: E402
from dreamix_ray.models.cascade import load_cascade, tiny_cascade  # noqa: E402
from dreamix_ray.models.ltx import LTXStageNet  # noqa: E402
from dreamix_ray.models.wan import WanDenoiser  # noqa: E402
from dreamix_ray.quiet import quiet_libraries  # noqa: E402
from dreamix_ray.request import EditPlan  # noqa: E402
from dreamix_ray.video import Video  # noqa: E402
from dreamix_ray.world import render, sample_scene  # noqa: E402

PROMPT = "a red circle moving left on a blue background"
# ModelScope text-to-video-ms-1.7b / zeroscope_v2_576w UNet3D (their unet/config.json), 576x320 latents / 8.
MODELSCOPE_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                       cross_attention_dim=1024, attention_head_dim=64, layers_per_block=2)
MODELSCOPE_LATENTS = (4, 24, 40, 72)  # channels, frames, height, width
SMOKE_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), cross_attention_dim=32,
                  attention_head_dim=4, layers_per_block=1, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
SMOKE_LATENTS = (4, 4, 8, 8)
# Wan2.1-T2V-1.3B's transformer/config.json; its VAE makes a latent of 8x8 pixels and 4 frames (the first alone):
# 832x480x81 -> 16x21x60x104, with 512 UMT5 tokens of 4096.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
WAN_LATENTS, WAN_TEXT = (16, 21, 60, 104), 512
SMOKE_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                 out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
SMOKE_WAN_LATENTS = (16, 3, 8, 8)
# LTX-Video 2B (0.9.x) transformer/config.json; its VAE makes a latent of 32x32 pixels and 8 frames:
# 704x480x121 -> 128x16x15x22, with 128 T5 tokens of 4096.
LTX_2B = dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64,
              cross_attention_dim=2048, num_layers=28, caption_channels=4096)
LTX_LATENTS, LTX_TEXT = (128, 16, 15, 22), 128
SMOKE_LTX = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                 num_layers=1, caption_channels=16)
SMOKE_LTX_LATENTS = (8, 2, 4, 4)
# AutoencoderKLWan's defaults are Wan2.1's vae/config.json; the toy one decodes 5 frames of 32x32, in 2x2 tiles.
SMOKE_VAE, SMOKE_VAE_LATENTS = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1), (16, 2, 4, 4)
SMOKE_TILES = dict(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                   tile_sample_stride_width=16)  # the toy frames are smaller than the default 256-pixel tile


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


def free(device: torch.device) -> None:
    """Return what the last network or failed cell held, so the next peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def half_precision(device: torch.device) -> str:
    """bf16 where the device computes it natively, else fp16 (pre-Ampere GPUs)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def autocast(device: torch.device, precision: str):
    return (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]) if precision != "fp32"
            else contextlib.nullcontext())


def fits(fn):
    """fn(), or None when it runs out of accelerator memory: its row says so and the run goes on."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        pass  # freed outside the handler: the exception's traceback holds the failed call's tensors
    gc.collect()
    torch.cuda.empty_cache()
    return None


def fmt(seconds: float | None, times: int = 1, digits: int = 4) -> str:
    return "out of memory" if seconds is None else f"{times * seconds:.{digits}f}"


def timed(fn, device: torch.device, reps: int, warmup: bool = True) -> float:
    """Median seconds of `fn()` over `reps` calls after one warm-up call (without it: the first call's time)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cell(make, device, precision, reps, warmup=True) -> tuple[float | None, str]:
    """(timed seconds of the call `make()` builds under `precision`, its peak memory); (None, "-") if it does not
    fit. `make` builds inputs inside the OOM guard: at batch 2 the inputs alone may not fit."""
    reset_peak(device)
    with torch.inference_mode(), autocast(device, precision):
        seconds = fits(lambda: timed(make(), device, reps, warmup))
    return seconds, (peak_mib(device) if seconds is not None else "-")


@contextlib.contextmanager
def classic_attention(net):
    """The math attention instead of SDPA's fused kernels, switched in place: a copy of a 1.3B model would double
    its memory. UNets take the classic AttnProcessor; Wan and LTX run diffusers' attention dispatch, whose
    processors would not work with it, so they take its math backend."""
    model = next(m for m in (getattr(net, "unet", None), getattr(net, "transformer", None), net) if m is not None)
    saved = model.attn_processors
    dispatched = all(hasattr(p, "_attention_backend") for p in saved.values())
    if dispatched:
        model.set_attention_backend("_native_math")
    else:
        model.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:  # back to "native" (the default), not reset_attention_backend: that leaves the global backend on math
        model.set_attention_backend("native") if dispatched else model.set_attn_processor(saved)


def latent_label(what: str, latents, pixels: int, frames: int) -> str:
    """'<what> FxHxW (latents CxFxHxW)': the clip a latent of `pixels` pixels and `frames` frames decodes to."""
    c, f, h, w = latents
    return f"{what} {frames * (f - 1) + 1}x{h * pixels}x{w * pixels} (latents {'x'.join(map(str, latents))})"


def networks(cascade, device: torch.device, smoke: bool):
    """(name, build() -> module, make_call(module, batch) -> call, heavy) per network to measure. Built one at a
    time by the caller, so only one real-size model is in memory at once; `heavy`: a real-size video transformer,
    measured at batch 1 / 2 with one timed forward (a Wan forward in fp32 takes ~20 s on an A100)."""
    out = []
    tokens, pooled = cascade.text_encoder([PROMPT])
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
        out.append((f"{cascade.config.name} {sc.name} {shape[1]}x{shape[2]}x{shape[3]}", lambda net=net: net, call,
                    False))

    def on_device(make):  # random init on the device: seconds for a 2B model, where a CPU init takes a minute
        def build():
            with torch.device(device):
                return make().eval()
        return build

    def video_call(latents, text_len, text_dim, with_mask=False):
        def call(net_, b):
            x = torch.randn(b, *latents, device=device)
            text = torch.randn(b, text_len, text_dim, device=device)
            t = torch.full((b,), 500, device=device)
            extra = (torch.ones(b, text_len, device=device),) if with_mask else ()  # LTX's text mask
            return lambda: net_(x, t, text, *extra)
        return call

    kwargs, latents = (SMOKE_UNET, SMOKE_LATENTS) if smoke else (MODELSCOPE_UNET, MODELSCOPE_LATENTS)

    def call_unet(net_, b, kwargs=kwargs, latents=latents):
        x = torch.randn(b, *latents, device=device)
        text = torch.randn(b, 77, kwargs["cross_attention_dim"], device=device)
        t = torch.full((b,), 500, device=device)
        return lambda: net_(x, t, text).sample
    out.append((f"{'toy UNet3D' if smoke else 'ModelScope-shaped UNet3D'} {latents[1]}x{latents[2] * 8}x"
                f"{latents[3] * 8} (latents {'x'.join(map(str, latents))})",
                on_device(lambda kwargs=kwargs: UNet3DConditionModel(**kwargs)), call_unet, False))
    # Wan and LTX behind the project's own stage wrappers (models/wan.py, models/ltx.py): what an edit runs.
    kwargs, latents = (SMOKE_WAN, SMOKE_WAN_LATENTS) if smoke else (WAN_1_3B, WAN_LATENTS)
    out.append((latent_label("toy Wan transformer" if smoke else "Wan2.1-T2V-1.3B-shaped transformer", latents, 8, 4),
                on_device(lambda kwargs=kwargs: WanDenoiser(**kwargs)),
                video_call(latents, 8 if smoke else WAN_TEXT, kwargs["text_dim"]), not smoke))
    kwargs, latents = (SMOKE_LTX, SMOKE_LTX_LATENTS) if smoke else (LTX_2B, LTX_LATENTS)
    ratios = SimpleNamespace(temporal_factor=8, scale_factor=32)  # all LTXStageNet reads of the VAE: its RoPE scale
    out.append((latent_label("toy LTX transformer" if smoke else "LTX-Video-2B-shaped transformer", latents, 32, 8),
                on_device(lambda kwargs=kwargs: LTXStageNet(LTXVideoTransformer3DModel(**kwargs), 24.0, ratios)),
                video_call(latents, 8 if smoke else LTX_TEXT, kwargs["caption_channels"], with_mask=True), not smoke))
    return out


def measure(name, net, call, device, precisions, batches, reps, compiled=False) -> list[str]:
    rows = []
    for precision in precisions:
        per_batch = {}
        for b in batches:
            per_batch[b], peak = cell(lambda: call(net, b), device, precision, reps)
            rows.append(f"| {name} | {precision} | {b} | {fmt(per_batch[b])} | {peak} | | |")
        with classic_attention(net):
            math_s, _ = cell(lambda: call(net, 1), device, precision, reps)
        if 2 in per_batch:
            rows.append(f"| {name} | {precision} | guided, 1 row | sequential {fmt(per_batch[1], 2)} / batched "
                        f"{fmt(per_batch[2])} | | | SDPA {fmt(per_batch[1])} / math {fmt(math_s)} |")
    if compiled:  # the half precision an edit on a GPU would run, at batch 1
        fast, precision = torch.compile(net), precisions[-1]
        first, _ = cell(lambda: call(fast, 1), device, precision, 1, warmup=False)  # this call compiles
        seconds, peak = cell(lambda: call(fast, 1), device, precision, reps)
        rows.append(f"| {name} | {precision} | 1 | {fmt(seconds)} | {peak} | compiled; first call "
                    f"{fmt(first, digits=1)} s | |")
        torch._dynamo.reset()  # drop the compiled graphs, which hold on to the network
    return rows


def vae_rows(device, smoke: bool, reps: int) -> list[str]:
    """The Wan VAE's decode of 2 clips at once, plain, tiled, and sliced (one clip at a time, as WanVAE.decode)."""
    kwargs, latents = (SMOKE_VAE, SMOKE_VAE_LATENTS) if smoke else ({}, WAN_LATENTS)
    name = latent_label("toy Wan VAE" if smoke else "Wan2.1 VAE", latents, 8, 4)
    vae = fits(lambda: AutoencoderKLWan(**kwargs).eval().to(device))
    if vae is None:
        return [f"| {name} | fp32 | 2 | does not fit in memory | - |"]
    def decode():
        z = torch.randn(2, *latents, device=device)
        return lambda: vae.decode(z).sample

    rows = []
    for mode in ("plain", "enable_tiling()", "enable_slicing()"):
        vae.disable_tiling()
        vae.disable_slicing()
        if mode == "enable_tiling()":
            vae.enable_tiling(**(SMOKE_TILES if smoke else {}))
        elif mode == "enable_slicing()":
            vae.enable_slicing()
        seconds, peak = cell(decode, device, "fp32", reps)  # fp32: diffusers' Wan pipelines keep the VAE in fp32
        rows.append(f"| {name}, {mode} | fp32 | 2 | {fmt(seconds)} | {peak} |")
    return rows


def clip(cascade, frames: int) -> Video:
    last = cascade.stages[-1].config
    scene = sample_scene(np.random.default_rng(0), motion="right")
    return Video(render(scene, frames, last.height, last.fps), last.fps)


def one_edit(video, cfg, cascade, device) -> tuple[str, str]:
    """(seconds, peak memory) of one edit; "out of memory" and "-" when it does not fit."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    done = fits(lambda: edit(video, PROMPT, cfg, cascade)) is not None
    sync(device)
    return fmt(time.perf_counter() - start if done else None, digits=2), peak_mib(device) if done else "-"


def end_to_end(cascade, device, precisions, smoke: bool) -> list[str]:
    last = cascade.stages[-1].config
    video = clip(cascade, last.frames)
    rows = []
    for precision in precisions:
        fits(lambda: edit(video, "warm up", EditConfig(steps=(1,), precision=precision), cascade))
        seconds, peak = one_edit(video, EditConfig(strength=0.9, precision=precision, steps=(2,) if smoke else ()),
                                 cascade, device)
        rows.append(f"| {cascade.config.name}, {last.frames} frames {last.width}x{last.height} | {precision} | "
                    f"{seconds} | {peak} |")
    return rows


def clip_lengths(cascade, device, smoke: bool) -> list[str]:
    """The edit at 1x / 2x / 4x the cascade's clip length, the last SSR in chunks of its own trained length (the
    paper's 32 would leave the embedded cascade's 16 and 32 frames one chunk): its peak should not grow with it."""
    base, last = cascade.base.config, cascade.stages[-1].config
    rows = []
    for frames in (last.frames, 2 * last.frames, 4 * last.frames):
        cfg = EditConfig(strength=0.9, num_frames=frames * base.frames // last.frames, ssr_chunk_frames=last.frames,
                         steps=(2,) if smoke else ())
        chunks = len(EditPlan.of(cfg, cascade.config).stages[-1].chunks)
        seconds, peak = one_edit(clip(cascade, frames), cfg, cascade, device)
        rows.append(f"| {cascade.config.name} clip of {frames} frames {last.width}x{last.height} | {chunks} | "
                    f"{seconds} | {peak} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="toy sizes (a tiny cascade and toy networks), any machine")
    p.add_argument("--reps", type=int, default=None,
                   help="timed forwards per cell (default 5, 1 for the video transformers and the VAE; 1 with --smoke)")
    p.add_argument("--compile", action="store_true", help="also time each network under torch.compile")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = p.parse_args()
    quiet_libraries()
    device = resolve_device(args.device)
    cascade = (tiny_cascade() if args.smoke else load_cascade(args.model)).to(device)
    precisions = ["fp32", half_precision(device)]
    batches, reps = ((1, 2) if args.smoke else (1, 2, 4)), args.reps or (1 if args.smoke else 5)
    heavy_reps = args.reps or 1
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads): "
                  "ran on CPU, these numbers say nothing about a GPU")
    lines = [f"`python jobs/bench_gpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"Device: {where}; torch {torch.__version__}; {'toy sizes (--smoke)' if args.smoke else 'real sizes'}.",
             "", "| network | precision | batch | s / forward | peak MiB | torch.compile | attention (batch 1) |",
             "|---|---|---|---:|---:|---|---|"]
    for name, build, call, heavy in networks(cascade, device, args.smoke):
        net = fits(build)
        if net is None:
            lines.append(f"| {name} | | | does not fit in memory | | | |")
        else:
            lines += measure(name, net, call, device, precisions, (1, 2) if heavy else batches,
                             heavy_reps if heavy else reps, args.compile)
        del net  # before the next one is built
        free(device)
        print(f"measured {name}", file=sys.stderr, flush=True)
    lines += ["", "| VAE decode | precision | batch | seconds | peak MiB |", "|---|---|---|---:|---:|"]
    lines += vae_rows(device, args.smoke, reps if args.smoke else heavy_reps)
    free(device)
    print("measured the VAE", file=sys.stderr, flush=True)
    lines += ["", "| end-to-end edit | precision | seconds | peak MiB |", "|---|---|---:|---:|"]
    lines += end_to_end(cascade, device, precisions, args.smoke)
    lines += ["", "| edit, last SSR in chunks (fp32) | chunks | seconds | peak MiB |", "|---|---:|---:|---:|"]
    lines += clip_lengths(cascade, device, args.smoke)
    print("measured the edits", file=sys.stderr, flush=True)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
