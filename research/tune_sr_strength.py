"""Choose the noise the pixel SR stages start from (CascadeConfig.sr_strength) on TUNING videos
(training combinations of the shapes world, never the held-out evaluation ones), by the success
rule of `dreamix eval`, for Dreamix without finetuning at the cascade's tuned edit strengths.

    python research/tune_sr_strength.py [--model DIR] --sources 8 --sr-strengths 1.0 0.8 0.6 [--write]

The base stage runs once per edit; only the SR stages rerun per candidate, from the same base output
and seeds, so the candidates differ in nothing else. Prints success (and alignment, fidelity,
quality, PSNR of the unedited region) per candidate and edit type; --write stores the best in
DIR/cascade.json (the embedded cascade by default), which every edit then uses unless it sets
EditConfig.sr_strength / `dreamix edit --sr-strength`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def summarize(scores: list) -> str:
    psnr = np.nanmean([s.psnr for s in scores]) if any(np.isfinite(s.psnr) for s in scores) else float("nan")
    return (f"{np.mean([s.success for s in scores]):.0%} (align {np.mean([s.alignment for s in scores]):.2f}, "
            f"fid {np.mean([s.fidelity for s in scores]):.2f}, qual {np.mean([s.quality for s in scores]):.2f}, "
            f"psnr {psnr:.1f})")


def main() -> int:
    import torch

    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.config import EditConfig
    from dreamix_ray.degrade import downsample_to_stage
    from dreamix_ray.edit import StageRun, run_cascade, run_stage
    from dreamix_ray.evaluate import EDIT_TYPES, EvalSettings, _render, eval_cases, score
    from dreamix_ray.models.cascade import load_cascade

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--sources", type=int, default=8, help="tuning source videos (4 edits each)")
    p.add_argument("--sr-strengths", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    p.add_argument("--consistency", nargs="+", default=["on"], choices=["on", "off"],
                   help="EditConfig.sr_consistency settings to compare (sr_consistency.py)")
    p.add_argument("--types", nargs="+", default=list(EDIT_TYPES), choices=list(EDIT_TYPES))
    p.add_argument("--write", action="store_true", help="store the best in the cascade's cascade.json")
    args = p.parse_args()
    quiet_libraries()
    cascade = load_cascade(args.model)
    settings = EvalSettings()
    cases = [c for c in eval_cases(args.sources, held=False) if c.edit_type in args.types]
    scores: dict = defaultdict(lambda: defaultdict(list))  # (sr strength, consistency) -> edit type -> [Scores]
    grid = [(sr, c == "on") for c in args.consistency for sr in args.sr_strengths]
    start = time.perf_counter()
    for n, case in enumerate(cases, 1):
        source, target = _render(case.source, cascade), _render(case.target, cascade).frames
        cfg = settings.plan_for("dreamix", case.edit_type, cascade).config
        x0 = downsample_to_stage(source, cascade.base.config)
        with torch.no_grad():
            base_out = run_stage(StageRun.of(cascade, cfg, [case.prompt], [case.seed]), 0, x0)
            for sr, consistency in grid:
                sr_cfg = EditConfig(**{**cfg.to_dict(), "sr_strength": sr, "sr_consistency": consistency})
                out = run_cascade(StageRun.of(cascade, sr_cfg, [case.prompt], [case.seed]), base_out, first=1)[0]
                scores[(sr, consistency)][case.edit_type].append(score(case, source.frames, out, target))
        print(f"edit {n}/{len(cases)} done after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    for (sr, consistency), by_type in scores.items():
        every = [s for group in by_type.values() for s in group]
        print(f"sr_strength {sr:g}, sr_consistency {'on' if consistency else 'off'}: all {summarize(every)}")
        for edit_type, group in sorted(by_type.items()):
            print(f"    {edit_type:10s} {summarize(group)}")
    # most successes, then the higher strength (closer to the paper's SR from pure noise)
    best, _ = max(scores, key=lambda k: (np.mean([s.success for g in scores[k].values() for s in g]), k[0]))
    print(f"best sr_strength: {best:g}")
    if args.write:
        from dreamix_ray.models.cascade import EMBEDDED_DIR, update_config

        path = Path(args.model or EMBEDDED_DIR)
        update_config(path, sr_strength=best)
        print(f"wrote sr_strength to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
