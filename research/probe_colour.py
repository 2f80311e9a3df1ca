"""Colour edits on TUNING videos: success and which facet fails, per strength, with and without the
source's layout carried in at high noise (EditConfig.motion_from_input, which motion edits use).

    python research/probe_colour.py --sources 12 --strengths 0.7 0.8 0.9 1.0 [--base-only]

Prints, per (strength, motion_from_input): success, alignment, and how often each kept facet
(background, shape, style, motion, layout) was missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from dreamix_ray.evaluate import EvalSettings, _render, _run_rows, eval_cases, score
    from dreamix_ray.models.cascade import load_cascade
    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.request import EditPlan
    from dreamix_ray.world.analyze import analyze
    from research.tune_strengths import base_only

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--sources", type=int, default=12)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0])
    p.add_argument("--base-only", action="store_true")
    args = p.parse_args()
    quiet_libraries()
    cascade = load_cascade(args.model)
    if args.base_only:
        cascade = base_only(cascade)
    cases = [c for c in eval_cases(args.sources, held=False) if c.edit_type == "colour"]
    for from_input in (False, True):
        for strength in args.strengths:
            settings = EvalSettings(edit_strengths={"none": {"colour": strength}})
            config = settings.plan_for("dreamix", "colour", cascade).config
            plan = EditPlan.of(dataclasses.replace(config, motion_from_input=from_input), cascade.config)
            missed, hits, aligned = Counter(), 0, 0
            for case in cases:
                source = _render(case.source, cascade)
                out = _run_rows(cascade, [source], [case.prompt], [case.seed], plan)[0]
                target = _render(case.target, cascade).frames
                s = score(case, source.frames, out, target)
                hits += s.success
                aligned += s.alignment == 1.0
                est = analyze(out).objects
                obj = est[0] if est else None
                src = case.source.objects[0]
                for facet in ("shape", "style", "motion"):
                    missed[facet] += obj is None or getattr(obj, facet) != getattr(src, facet)
                missed["background"] += analyze(out).background != case.source.background
                missed["layout"] += not s.layout
            n = len(cases)
            print(f"strength {strength:g} motion_from_input {from_input!s:5}: success {hits}/{n}, "
                  f"aligned {aligned}/{n}, missed " + ", ".join(f"{k} {v}" for k, v in sorted(missed.items())),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
