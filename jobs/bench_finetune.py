"""Finetuning benchmarks (issue 3), side by side in one run; results go to BENCHMARKS.md.

    python jobs/bench_finetune.py [--model DIR] [--preset mixed] [--steps N] [--append]

1. finetune steps per second per finetuned stage (the preset's objective, the cascade's stages);
2. finetune once, edit many: latency of the first edit request (finetune + store + edit) against the
   second one with the same video and config (artifact loaded from the store + edit), as a ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _clip(cascade):
    from dreamix_ray.video import Video
    from dreamix_ray.world import render, sample_scene

    last = cascade.stages[-1].config
    scene = sample_scene(np.random.default_rng(7), motion="left")
    return Video(render(scene, last.frames, last.height, last.fps), last.fps)


def request(video, prompt, ft_cfg, cascade, store, edit_cfg) -> tuple[float, str]:
    """One `dreamix edit --finetune` request: finetune or load, then edit; (seconds, artifact key)."""
    from dreamix_ray.edit import edit
    from dreamix_ray.finetune import finetune_or_load, finetuned_prompt

    start = time.perf_counter()
    tuned, key = finetune_or_load(video, ft_cfg, cascade, store)
    edit(video, finetuned_prompt(prompt, ft_cfg), edit_cfg, tuned)
    return time.perf_counter() - start, key


def main(argv: list[str] | None = None) -> int:
    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.config import PAPER_STRENGTH_FINETUNED, EditConfig
    from dreamix_ray.finetune import finetune, finetune_preset
    from dreamix_ray.models.cascade import load_cascade
    from dreamix_ray.storage import ArtifactStore

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default="mixed", choices=("video", "mixed", "frames"))
    p.add_argument("--steps", type=int, default=None, help="finetuning steps per stage (default: the preset's)")
    p.add_argument("--speed-steps", type=int, default=20, help="steps per stage timed for steps/s")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    quiet_libraries()
    cascade = load_cascade(args.model)
    video = _clip(cascade)

    # 1. steps/s per stage: time between consecutive steps, the first step of each stage not timed
    speed_cfg = finetune_preset(args.preset, steps=args.speed_steps, seed=0)
    stamps: dict[str, list[float]] = defaultdict(list)
    finetune(video, speed_cfg, cascade, on_step=lambda name, *_: stamps[name].append(time.perf_counter()))
    per_stage = {name: (len(ts) - 1) / (ts[-1] - ts[0]) for name, ts in stamps.items() if len(ts) > 1}

    # 2. the same request twice against an empty store
    ft_cfg = finetune_preset(args.preset, steps=args.steps, seed=0)
    edit_cfg = EditConfig(strength=PAPER_STRENGTH_FINETUNED[0], seed=1)
    root = tempfile.mkdtemp(prefix="dreamix-bench-ft-")
    try:
        store = ArtifactStore(root)
        first, key = request(video, "a yellow square moving right", ft_cfg, cascade, store, edit_cfg)
        second, again = request(video, "a yellow square moving right", ft_cfg, cascade, store, edit_cfg)
        assert again == key
    finally:
        shutil.rmtree(root, ignore_errors=True)

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    stages = " " + ", ".join(per_stage)
    lines = [f"`python jobs/bench_finetune.py {argv_text}` ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} "
             f"CPU cores, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the "
             f"end; cascade {cascade.config.name}, preset {args.preset}: alpha {ft_cfg.alpha}, {ft_cfg.steps} "
             f"steps per stage, finetuned stages:{stages})", "",
             "| stage | finetune steps/s |", "|---|---:|"]
    lines += [f"| {name} | {rate:.2f} |" for name, rate in per_stage.items()]
    lines += ["", "| request | seconds |", "|---|---:|",
              f"| first: finetune + store + edit | {first:.1f} |",
              f"| second, same video and config: load artifact + edit | {second:.1f} |", "",
              f"Cache-hit latency ratio (second / first): **{second / first:.3f}**", ""]
    report = "\n".join(lines)
    print(report)
    if args.append:
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as f:
            f.write("\n## Finetuning\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
