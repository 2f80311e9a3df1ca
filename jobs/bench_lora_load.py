"""Finetuned artifacts on a base already in memory (issue 21): size and load time, LoRA against full.

    python jobs/bench_lora_load.py [--model DIR] [--repeats 10] [--append]

For each adapter kind: finetune once (2 steps per finetuned stage: the size and the load path do not
depend on the step count) into a fresh local store, then time `load_finetuned(base, key, store)` and
`FinetunedCascades.get` alternating two artifacts with room for one (so every get merges again), with
the base loaded once before any timing. Reports bytes against the finetuned stages' weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dreamix_ray.finetune import finetune_or_load, finetune_preset, load_finetuned  # noqa: E402
from dreamix_ray.finetuned_cache import FinetunedCascades  # noqa: E402
from dreamix_ray.models.cascade import load_cascade  # noqa: E402
from dreamix_ray.quiet import quiet_libraries  # noqa: E402
from dreamix_ray.storage import ArtifactStore  # noqa: E402
from dreamix_ray.video import Video  # noqa: E402
from dreamix_ray.world import render, sample_scene  # noqa: E402


def _clip(cascade, seed: int) -> Video:
    last = cascade.stages[-1].config
    scene = sample_scene(np.random.default_rng(seed), motion="left")
    return Video(render(scene, last.frames, last.height, last.fps), last.fps)


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(cascade, adapter: str, repeats: int) -> dict:
    weights = sum(p.numel() * p.element_size() for s in cascade.stages if s.config.finetune
                  for p in s.denoiser.parameters())
    root = tempfile.mkdtemp(prefix="dreamix-bench-lora-")
    try:
        store = ArtifactStore(root)
        keys = [finetune_or_load(_clip(cascade, seed), finetune_preset("mixed", steps=2, adapter=adapter), cascade,
                                 store)[1] for seed in (0, 1)]
        size = sum(f.stat().st_size for f in Path(root, keys[0]).rglob("*") if f.is_file())
        load = _timed(lambda: load_finetuned(cascade, keys[0], store), repeats)
        models = FinetunedCascades(lambda: cascade, store, size=1)
        order = iter(keys * repeats)
        swap = _timed(lambda: models.get(next(order)), 2 * repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return dict(adapter=adapter, bytes=size, share=size / weights, weights=weights,
                load_median=statistics.median(load), load_max=max(load),
                swap_median=statistics.median(swap), swap_max=max(swap))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    quiet_libraries()
    start = time.perf_counter()
    cascade = load_cascade(args.model)
    base_load = time.perf_counter() - start
    rows = [measure(cascade, adapter, args.repeats) for adapter in ("lora", "full")]
    names = [s.config.name for s in cascade.stages if s.config.finetune]
    lines = [
        "## LoRA artifacts on a base in memory (issue 21)",
        "",
        f"`python jobs/bench_lora_load.py{' --model ' + args.model if args.model else ''} --repeats {args.repeats}`"
        f" ({datetime.now():%Y-%m-%d %H:%M}, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end; cascade "
        f"{cascade.config.name}, finetuned stages {', '.join(names)}: {rows[0]['weights']:,} bytes of weights; "
        f"loading the base cascade from disk took {base_load:.2f} s)",
        "",
        "| artifact | bytes | % of the finetuned stages | load onto the base in memory, median / max s "
        "| FinetunedCascades swap A<->B, median / max s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['bytes']:,} | {100 * r['share']:.2f}% | {r['load_median']:.3f} / "
                     f"{r['load_max']:.3f} | {r['swap_median']:.3f} / {r['swap_max']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
