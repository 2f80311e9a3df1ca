"""Find the finetuning learning rate / steps / strength that work on a cascade, on TUNING videos
(training combinations of the shapes world, never the held-out evaluation ones).

    python research/tune_finetune.py [--model DIR] --lrs 1e-4 3e-4 1e-3 --steps 60 --strengths 0.85 0.95

Scores mixed and video finetuning (base stage) by the same success rule as `dreamix eval`.
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
    for preset, lr, steps in itertools.product(args.presets, args.lrs, args.steps):
        start = time.perf_counter()
        variant = PRESET_VARIANT[preset]
        tuned = {}
        for key, group in groups.items():
            cfg = finetune_preset(preset, steps=steps, lr=lr, stages=("base",), seed=group[0].seed)
            tuned[key] = {variant: (finetune(sources[key], cfg, cascade), cfg)}
        for strength in args.strengths:
            settings = EvalSettings(edit_strengths={preset: dict.fromkeys(EDIT_TYPES, strength)})
            scores = []
            for key, group in groups.items():
                outs = run_method(variant, group, sources[key], cascade, tuned[key], settings)
                scores += [score(case, sources[key].frames, out, target)
                           for case, out, target in zip(group, outs, targets[key])]
            row = {"preset": preset, "lr": lr, "steps": steps, "strength": strength,
                   "success": float(np.mean([s.success for s in scores])),
                   "alignment": float(np.mean([s.alignment for s in scores])),
                   "fidelity": float(np.mean([s.fidelity for s in scores])),
                   "quality": float(np.mean([s.quality for s in scores])),
                   "minutes": (time.perf_counter() - start) / 60}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: (r["success"], r["alignment"] + r["fidelity"]))
    print("best:", json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
