"""Per edit, what the base stage got wrong and what the whole cascade got wrong: which stage loses an
edit. Dreamix without finetuning at the cascade's tuned strengths, on the evaluation's edits.

    python research/compare_base_and_cascade.py --types motion background --split held --sources 6

Prints one line per (edit, stage): success by the `dreamix eval` rules, whether the layout was kept,
quality, and each attribute the analyzer found different from the edit's target. Then counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.degrade import downsample_to_stage, tensor_to_frames
    from dreamix_ray.edit import StageRun, run_cascade, run_stage
    from dreamix_ray.evaluate import CHECKED, EDIT_TYPES, EvalSettings, _render, eval_cases, score
    from dreamix_ray.models.cascade import load_cascade
    from dreamix_ray.world.analyze import analyze
    from tune_strengths import base_only

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--sources", type=int, default=6, help="source videos (4 edits each)")
    p.add_argument("--split", choices=("held", "tuning"), default="held",
                   help="held: the evaluation's held-out sources; tuning: training combinations")
    p.add_argument("--types", nargs="+", default=list(EDIT_TYPES), choices=list(EDIT_TYPES))
    p.add_argument("--name-solid", action="store_true",
                   help="prompts say 'solid' for a solid target object (canonical captions leave the default "
                        "style unsaid; pretraining captions say it 15%% of the time)")
    p.add_argument("--sr-strength", type=float, default=None,
                   help="the SR stages start from their noised upsampled input at this strength (SDEdit; 1 = pure "
                        "noise), so they keep the base's texture; default: the cascade's")
    args = p.parse_args()
    quiet_libraries()
    full = load_cascade(args.model)
    base, settings = base_only(full), EvalSettings()
    wrong_counts: dict[str, Counter] = {"base": Counter(), "cascade": Counter()}
    cases = [c for c in eval_cases(args.sources, held=args.split == "held") if c.edit_type in args.types]
    for case in cases:
        if args.name_solid and case.target.objects[0].style == "solid":
            article, rest = case.prompt.split(" ", 1)  # "a red ..." / "an orange ..."
            assert article in ("a", "an"), case.prompt
            case = dataclasses.replace(case, prompt=f"a solid {rest}")
        cfg = settings.plan_for("dreamix", case.edit_type, full).config
        if args.sr_strength is not None:
            cfg = dataclasses.replace(cfg, sr_strength=args.sr_strength)
        x0 = downsample_to_stage(_render(case.source, full), full.base.config)
        with torch.no_grad():
            base_out = run_stage(StageRun.of(full, cfg, [case.prompt], [case.seed]), 0, x0)
            outputs = {"base": tensor_to_frames(base_out)[0],
                       "cascade": run_cascade(StageRun.of(full, cfg, [case.prompt], [case.seed]), base_out, first=1)[0]}
        want = {"background": case.target.background,
                **{k: getattr(case.target.objects[0], k) for k in CHECKED[1:]}}
        for stage, frames in outputs.items():
            model = base if stage == "base" else full  # scored against renders at that stage's size
            s = score(case, _render(case.source, model).frames, frames, _render(case.target, model).frames)
            est = analyze(frames)
            got = {"background": est.background,
                   **{k: getattr(est.objects[0], k) if est.objects else None for k in CHECKED[1:]}}
            wrong = {k: got[k] for k in CHECKED if got[k] != want[k]}
            wrong_counts[stage].update(wrong.keys())
            print(f"{case.edit_type:10s} {stage:7s} success={s.success} layout={s.layout} quality={s.quality:.2f} "
                  f"wrong={wrong}", flush=True)
    for stage, counts in wrong_counts.items():
        print(f"{stage}: attributes wrong over {len(cases)} edits: {dict(counts) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
