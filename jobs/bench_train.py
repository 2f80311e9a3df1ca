"""Distributed-training benchmark: steps/s with 1 and 2 workers, and per-worker parameter + optimizer
bytes under ZeRO-2, ZeRO-3 and plain DDP, on one finetuned stage of a cascade.

    python jobs/bench_train.py [--model DIR] [--stage base] [--steps 8] [--batch-size 2] [--append]

Every configuration is a real Ray Train run of the one training loop (dreamix_ray/training/loop.py)
with its DeepSpeed or DDP engine, on the same sharded batches. With --append the table goes to
BENCHMARKS.md under "## Distributed training". "optimizer" = fp32 master partitions (ZeRO keeps a copy)
+ Adam moments, measured on each rank after the last step; "params" = the weights a rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

SECTION = "## Distributed training"


def run_engine(video, cfg, cascade, workers: int, engine: str, zero: int, storage: str) -> dict:
    """One Ray Train run of the core training loop with `engine` (deepspeed or ddp)."""
    from dreamix_ray.cluster.train import (
        TrainSettings,
        finetune_job,
        read_state,
        run_training,
    )

    settings = TrainSettings(workers=workers, engine=engine, zero=zero, threads=1)
    result = run_training(finetune_job(video, cfg, cascade, settings), settings, f"{engine}{zero}-{workers}", storage)
    state = read_state(result.checkpoint)
    name = cfg.stages[0]
    return {"seconds_per_step": state["seconds_per_step"][name], "memory": state["memory"][name][0],
            "memory_ranks": state["memory"][name]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--stage", default="base")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    p.add_argument("--append", action="store_true", help="append the results to BENCHMARKS.md")
    args = p.parse_args(argv)

    import numpy as np
    import ray

    from dreamix_ray.finetune import finetune_preset
    from dreamix_ray.models.cascade import load_cascade
    from dreamix_ray.video import Video
    from dreamix_ray.world import render, sample_scene

    cascade = load_cascade(args.model)
    scene = sample_scene(np.random.default_rng(0), colour="red", shape="circle", motion="left", background="blue")
    video = Video(render(scene, num_frames=16, size=64, fps=8.0), 8.0)
    # alpha 0.5 so the timed steps mix frame and video steps, as the paper's mixed recipe does
    cfg = finetune_preset("mixed", alpha=0.5, steps=args.steps, lr=1e-4, stages=(args.stage,),
                          batch_size=args.batch_size, checkpoint_every=10**6)
    temp, storage = tempfile.mkdtemp(prefix="rb", dir="/tmp"), tempfile.mkdtemp(prefix="dreamix-bench-train-")
    ray.init(num_cpus=args.num_cpus, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name, run in [("ZeRO-2, 1 worker", lambda: run_engine(video, cfg, cascade, 1, "deepspeed", 2, storage)),
                          ("ZeRO-2, 2 workers", lambda: run_engine(video, cfg, cascade, 2, "deepspeed", 2, storage)),
                          ("ZeRO-3, 2 workers", lambda: run_engine(video, cfg, cascade, 2, "deepspeed", 3, storage)),
                          ("DDP, 2 workers", lambda: run_engine(video, cfg, cascade, 2, "ddp", 2, storage))]:
            t0 = time.perf_counter()
            out = run()
            rows.append((name, out, time.perf_counter() - t0))
            print(name, json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    stage = next(s for s in cascade.stages if s.config.name == args.stage)
    params = sum(p.numel() for p in stage.denoiser.parameters())
    report = _table(rows, args, params, argv if argv is not None else sys.argv[1:])
    print(report)
    if args.append:
        _append(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", report)
    return 0


def _table(rows, args, params: int, argv) -> str:
    def total(name):
        m = next(out for n, out, _ in rows if n.startswith(name))["memory"]
        return m["params"] + m["optimizer"]

    ddp_total, one_total = total("DDP"), total("ZeRO-2, 1 worker")
    lines = [f"`python jobs/bench_train.py {' '.join(argv)}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU "
             f"cores, load average {os.getloadavg()[0]:.1f} at the end, gloo, 1 torch thread per worker; stage "
             f"{args.stage}, {params:,} parameters, fp32, global batch {args.batch_size}, {args.steps} steps, "
             "first step not timed)", "",
             "| run | steps/s | params / worker | optimizer / worker | total vs 1 worker | total vs DDP | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, out, wall in rows:
        m = out["memory"]
        held = m["params"] + m["optimizer"]
        lines.append(f"| {name} | {1 / out['seconds_per_step']:.2f} | {m['params'] / 2**20:.2f} MiB | "
                     f"{m['optimizer'] / 2**20:.2f} MiB | {held / one_total:.2f} | {held / ddp_total:.2f} | "
                     f"{wall:.0f} |")
    return "\n".join(lines) + "\n"


def _append(path: Path, report: str) -> None:
    """Add under our section only (created at the end if missing); other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
    head, _, rest = text.partition(SECTION)
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt + 1], rest[nxt + 1:])
    path.write_text(head + SECTION + body.rstrip("\n") + "\n\n" + report + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    sys.exit(main())
