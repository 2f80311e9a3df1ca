"""Find the finetuning learning rate / steps / strength that work on a cascade, on TUNING videos
(training combinations of the shapes world, never the held-out evaluation ones).

    python research/tune_finetune.py [--model DIR] --lrs 1e-4 3e-4 1e-3 --steps 60 --strengths 0.85 0.95 \
        [--adapters lora full] [--ranks 4 8] [--targets attention temporal] [--stages base ssr] [--baseline]

Scores mixed and video finetuning (base stage by default) by the same success rule as `dreamix eval`;
--baseline adds the unfinetuned Dreamix row at each strength.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> int:
    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.evaluate import EDIT_TYPES, PRESET_VARIANT, EvalSettings, _render, eval_cases, run_method, score
    from dreamix_ray.finetune import finetune, finetune_preset
    from dreamix_ray.models.cascade import load_cascade

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--sources", type=int, default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--steps", type=int, nargs="+", default=[60])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.9])
    p.add_argument("--presets", nargs="+", default=["mixed"], choices=("video", "mixed"))
    p.add_argument("--adapters", nargs="+", default=["lora"], choices=("lora", "full"))
    p.add_argument("--ranks", type=int, nargs="+", default=[4], help="LoRA ranks")
    p.add_argument("--targets", nargs="+", default=["attention"], choices=("attention", "spatial", "temporal"),
                   help="LoRA targets (temporal only with the video preset)")
    p.add_argument("--stages", nargs="+", default=["base"], help="stages to finetune")
    p.add_argument("--baseline", action="store_true", help="also score Dreamix without finetuning")
    args = p.parse_args()
    quiet_libraries()
    cascade = load_cascade(args.model)
    groups = defaultdict(list)
    for case in eval_cases(args.sources, held=False):
        groups[id(case.source)].append(case)
    # rendered once: the sources and the ideal edits do not depend on the settings swept below
    sources = {key: _render(group[0].source, cascade) for key, group in groups.items()}
    targets = {key: [_render(c.target, cascade).frames for c in group] for key, group in groups.items()}
    rows = []

    def scored(variant, tuned, settings):
        scores = []
        for key, group in groups.items():
            outs = run_method(variant, group, sources[key], cascade, tuned.get(key, {}), settings)
            scores += [score(case, sources[key].frames, out, target)
                       for case, out, target in zip(group, outs, targets[key])]
        return {"success": float(np.mean([s.success for s in scores])),
                "alignment": float(np.mean([s.alignment for s in scores])),
                "fidelity": float(np.mean([s.fidelity for s in scores])),
                "quality": float(np.mean([s.quality for s in scores])),
                "layout": float(np.mean([s.layout for s in scores])),
                "psnr": float(np.mean([s.psnr for s in scores]))}

    if args.baseline:
        for strength in args.strengths:
            settings = EvalSettings(edit_strengths={"none": dict.fromkeys(EDIT_TYPES, strength)})
            print(json.dumps({"preset": "none", "strength": strength, **scored("dreamix", {}, settings)}), flush=True)
    settings_grid = [(a, r, t) for a in args.adapters for r, t in itertools.product(args.ranks, args.targets)
                     if a == "lora" or (r, t) == (args.ranks[0], args.targets[0])]  # full: no LoRA settings
    for (adapter, rank, target), preset, lr, steps in itertools.product(settings_grid, args.presets, args.lrs,
                                                                         args.steps):
        if adapter == "lora" and target == "temporal" and preset != "video":
            continue  # a temporal-only LoRA learns nothing on frame steps (FinetuneConfig refuses it)
        start = time.perf_counter()
        variant = PRESET_VARIANT[preset]
        tuned = {}
        for key, group in groups.items():
            cfg = finetune_preset(preset, steps=steps, lr=lr, stages=tuple(args.stages), seed=group[0].seed,
                                  adapter=adapter, lora_rank=rank, lora_targets=target)
            tuned[key] = {variant: (finetune(sources[key], cfg, cascade), cfg)}
        for strength in args.strengths:
            settings = EvalSettings(edit_strengths={preset: dict.fromkeys(EDIT_TYPES, strength)})
            row = {"preset": preset, "adapter": adapter, "rank": rank if adapter == "lora" else None,
                   "targets": target if adapter == "lora" else None, "lr": lr, "steps": steps,
                   "strength": strength, **scored(variant, tuned, settings),
                   "minutes": (time.perf_counter() - start) / 60}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: (r["success"], r["alignment"] + r["fidelity"]))
    print("best:", json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
