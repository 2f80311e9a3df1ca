"""Edit benchmarks (issue 2), side by side in one run; results go to BENCHMARKS.md.

    python jobs/bench_edit.py [--model DIR] [--repeats 3]

1. overhead: an edit's wall time / time inside the stage networks' forward passes (target <= 1.10);
2. chunked SSR memory: peak RSS of a 4x longer edit / the shorter one, output buffers aside (<= 1.3);
3. loop speed: our sampling loop against one written like diffusers' video-to-video pipeline
   (same UNet, steps and scheduler): seconds per step ratio (target <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _cascade(model):
    from dreamix_ray.models.cascade import load_cascade

    return load_cascade(model)


def _clip(cascade, frames: int):
    from dreamix_ray.video import Video
    from dreamix_ray.world import render, sample_scene

    last = cascade.stages[-1].config
    scene = sample_scene(np.random.default_rng(0), motion="right")
    return Video(render(scene, frames, last.height, last.fps), last.fps)


def overhead(cascade, repeats: int) -> dict:
    from dreamix_ray.config import EditConfig
    from dreamix_ray.edit import Timings, edit

    video = _clip(cascade, 16)
    edit(video, "warm up", EditConfig(steps=(2, 2, 2)), cascade)
    ratios, walls = [], []
    for seed in range(repeats):
        timings = Timings()
        start = time.perf_counter()
        edit(video, "a yellow square moving left on a white background", EditConfig(seed=seed), cascade,
             timings=timings)
        wall = time.perf_counter() - start
        walls.append(wall)
        ratios.append(wall / sum(timings.network_s.values()))
    return {"edit_wall_s": float(np.median(walls)), "overhead_ratio": float(np.median(ratios))}


def memory_child(model: str | None, base_frames: int) -> None:
    """Runs in a fresh process: one edit, then prints peak RSS and the output buffer size."""
    from dreamix_ray.config import EditConfig
    from dreamix_ray.edit import edit

    cascade = _cascade(model)
    video = _clip(cascade, base_frames * 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = edit(video, "a red circle", EditConfig(num_frames=base_frames), cascade)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "before": before, "output_bytes": out.frames.nbytes,
                      "input_bytes": video.frames.nbytes, "frames": out.num_frames}))


def memory(model: str | None, short_frames: int) -> dict:
    runs = {}
    for frames in (short_frames, 4 * short_frames):
        cmd = [sys.executable, __file__, "--memory-child", str(frames)] + (["--model", model] if model else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        runs[frames] = json.loads(out)
    short, long = runs[short_frames], runs[4 * short_frames]
    # Leave the buffers the edit must hold whatever the chunking (decoded input, uint8 output) aside.
    net = {k: r["peak"] - r["output_bytes"] - r["input_bytes"] for k, r in runs.items()}
    return {"short_output_frames": short["frames"], "long_output_frames": long["frames"],
            "short_peak_mb": short["peak"] / 2**20, "long_peak_mb": long["peak"] / 2**20,
            "memory_ratio": net[4 * short_frames] / net[short_frames]}


def diffusers_style_loop(unet_call, scheduler, latents, timesteps, generator, eta):
    """The loop as diffusers' VideoToVideoSDPipeline writes it (scale input, predict, step)."""
    for t in timesteps:
        latent_model_input = scheduler.scale_model_input(latents, t)
        noise_pred = unet_call(latent_model_input, t)
        latents = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator).prev_sample
    return latents


def loop_speed(cascade, steps: int, repeats: int) -> dict:
    from dreamix_ray.sampling import ddim_sample, fresh_scheduler, seed_generators, strength_timesteps

    stage = cascade.base
    tokens, pooled = cascade.text_encoder(["a red circle moving left"])
    x = torch.randn(1, 3, stage.config.frames, stage.config.height, stage.config.width)

    def unet_call(x_, t_):
        with torch.inference_mode():
            t_b = torch.as_tensor(t_).reshape(-1).expand(x_.shape[0])
            return stage.denoiser(x_, t_b, tokens, pooled)

    ours, ref = [], []
    for r in range(repeats):
        pair = [("ours", ours), ("diffusers", ref)]
        for name, bucket in (pair if r % 2 == 0 else pair[::-1]):  # alternate who runs first (warm caches)
            sched = fresh_scheduler(stage.scheduler)
            ts = strength_timesteps(sched, steps, 1.0)
            start = time.perf_counter()
            if name == "ours":
                ddim_sample(unet_call, x, sched, ts, 0.5, seed_generators([r], 0))
            else:
                diffusers_style_loop(unet_call, sched, x, ts, torch.Generator().manual_seed(r), 0.5)
            bucket.append((time.perf_counter() - start) / steps)
    return {"ours_s_per_step": float(np.median(ours)), "diffusers_style_s_per_step": float(np.median(ref)),
            "loop_speed_ratio": float(np.median(ours) / np.median(ref))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--short-frames", type=int, default=16, help="base frames of the shorter memory run")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from dreamix_ray.quiet import quiet_libraries

    quiet_libraries()
    if args.memory_child:
        memory_child(args.model, args.memory_child)
        return 0
    cascade = _cascade(args.model)
    results = {"cascade": cascade.config.name, "threads": torch.get_num_threads()}
    results.update(overhead(cascade, args.repeats))
    results.update(loop_speed(cascade, cascade.base.config.steps, args.repeats))
    results.update(memory(args.model, args.short_frames))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
