"""The chunked last stage of an LTX cascade (issue 20, item 3): the seam at chunk boundaries and peak RSS.

Random-weight LTX cascades (tests/ltx_repo.py's builders: base -> temporal upsampler -> spatial upsampler), so the
numbers say what chunking does to continuity and memory, not how good a picture is.
- seam: one edit per halo (context latent frames sampled on each side of a chunk), and one unchunked; the mean
  absolute step between consecutive output frames across chunk boundaries against inside chunks (uint8 levels),
  and how far each chunked output is from the unchunked one.
- rss: peak RSS of an edit of a clip and of a 4x longer clip, each in a fresh process, with the output's size and
  the per-row bytes the Ray Data rows / Serve store carry between stages (latents) against pixel frames.

    nice -n 10 python jobs/bench_ltx_chunks.py [--frames 17] [--size 64] [--chunk 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build(root: Path, size: int, frames: int, channels: int) -> Path:
    from ltx_repo import write_ltx_repo, write_upsampler

    from dreamix_ray.cli import main

    base = write_ltx_repo(root / "ltx", vae_channels=channels)
    tsr, ssr = (write_upsampler(root / n, base, temporal=n == "tsr") for n in ("tsr", "ssr"))
    out = root / "cascade"
    assert main(["convert", str(base), "-o", str(out), "--size", f"{size}x{size}", "--frames", str(frames),
                 "--fps", "8", "--steps", "4", "3", "3", "--tsr", str(tsr), "--ssr", str(ssr), "--quiet"]) == 0
    return out


def with_halo(cascade, halo: int, strength: float):
    stages = list(cascade.config.stages)
    stages[-1] = dataclasses.replace(stages[-1], latent={**stages[-1].latent, "chunk_halo": halo,
                                                         "strength": strength})
    cascade.config = dataclasses.replace(cascade.config, stages=tuple(stages))
    return cascade


def clip(frames: int, size: int):
    from dreamix_ray.video import Video

    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:size, 0:size]
    r = ((x[None] - (size / 4 + t * size / (2 * frames))) ** 2 + (y[None] - size / 2) ** 2) < (size / 6) ** 2
    video = np.zeros((frames, size, size, 3), np.uint8)
    video[..., 0], video[..., 2] = r * 220, 60
    return Video(video, 8.0)


def edit_once(cascade_dir: Path, frames: int, size: int, chunk: int, halo: int | None, strength: float = 0.4):
    from dreamix_ray.config import EditConfig
    from dreamix_ray.edit import StageRun, run_cascade
    from dreamix_ray.degrade import downsample_to_stage
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.request import EditPlan

    cascade = Cascade.from_pretrained(cascade_dir)
    if halo is not None:
        with_halo(cascade, halo, strength)
    cfg = EditConfig(strength=0.7, seed=3, num_frames=frames, ssr_chunk_frames=chunk, guidance_scale=3.0)
    plan = EditPlan.of(cfg, cascade.config)
    run = StageRun.of(cascade, plan, ["a red cat moving left"], [3])
    x0 = downsample_to_stage(clip(frames, size), cascade.base.config, frames)
    with torch.inference_mode():
        return run_cascade(run, x0), run


def seam(cascade_dir: Path, frames: int, size: int, chunk: int) -> list[dict]:
    from dreamix_ray.edit import chunk_seams

    rows = []
    # refine strength 0: the SSR is its upsampler and the VAE decode alone, so any seam is the chunking's;
    # 0.4 (the default) adds the refine pass, whose random transformer makes every frame step large
    for strength in (0.0, 0.4):
        whole, _ = edit_once(cascade_dir, frames, size, 10 ** 6, 1, strength)
        for halo in (1, 2, 3):  # 1 is the least a latent chunk takes (request._halo)
            out, run = edit_once(cascade_dir, frames, size, chunk, halo, strength)
            across, inside = chunk_seams(out, run)
            whole_across, _ = chunk_seams(whole, run)  # the unchunked clip's steps at the same places
            rows.append(dict(strength=strength, halo=halo, chunks=len(run.plan.stages[-1].chunks),
                             across=round(across, 2), inside=round(inside, 2), ratio=round(across / inside, 2),
                             unchunked_across=round(whole_across, 2),
                             vs_unchunked=round(float(np.abs(out.astype(np.float32) - whole).mean()), 2)))
    return rows


def rss(cascade_dir: Path, frames: int, size: int, chunk: int) -> dict:
    start = time.perf_counter()
    out, run = edit_once(cascade_dir, frames, size, chunk, None)
    plan = run.plan
    x0 = torch.zeros(1, 3, frames, size, size)
    base_latents = run.cascade.base.encode(x0)  # what the base step hands the TSR step, per row
    tsr_frames = run.cascade.stages[1].output_frames(plan.stages[1].frames)
    return dict(frames=frames, output_frames=int(out.shape[1]), output_mb=round(out.nbytes / 1e6, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                seconds=round(time.perf_counter() - start, 1),
                row_latents_bytes={"base->tsr": int(base_latents.numel() * 4),
                                   "tsr->ssr": int(base_latents[:, :, :1].numel() * 4 * plan.stages[2].frames)},
                row_pixels_bytes={"base->tsr": int(x0.numel() * 4),
                                  "tsr->ssr": int(3 * tsr_frames * size * size * 4)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=17, help="base clip (4k + 1 for the tiny VAE)")
    p.add_argument("--size", type=int, default=64, help="base size; the SSR output is 2x")
    p.add_argument("--chunk", type=int, default=16, help="ssr_chunk_frames (pixel frames; 4 per latent frame here)")
    p.add_argument("--vae-channels", type=int, default=32)
    p.add_argument("--rss-child", nargs=2, metavar=("DIR", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.rss_child:
        print(json.dumps(rss(Path(args.rss_child[0]), int(args.rss_child[1]), args.size, args.chunk)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-ltx-") as tmp:
        cascade_dir = build(Path(tmp), args.size, args.frames, args.vae_channels)
        print(json.dumps({"seam": seam(cascade_dir, args.frames, args.size, args.chunk)}))
        for frames in (args.frames, 4 * (args.frames - 1) + 1):
            child = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--chunk", str(args.chunk),
                                    "--rss-child", str(cascade_dir), str(frames)], capture_output=True, text=True,
                                   check=True)
            print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
