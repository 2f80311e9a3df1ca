"""Choose the edit strength per edit type and finetuning preset on TUNING videos (training
combinations of the shapes world, never the held-out evaluation ones), by the success rule of
`dreamix eval`.

    python research/tune_strengths.py [--model DIR] --sources 8 --strengths 0.6 0.8 0.9 0.95 1.0 --base-only [--write]

--base-only judges the base stage's output (every attribute is decided there; the SR stages only
add resolution) and runs ~10x faster than the full cascade. Prints success per (preset, edit type,
strength) and the chosen table; --write stores it as the
cascade's `edit_strengths` in DIR/cascade.json (the embedded cascade by default), which
`dreamix eval` and `dreamix edit --edit-type` then use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

def choose(scores_by_key: dict) -> dict:
    """Best strength per (preset, edit type): most successes, then alignment + fidelity, then the
    lower strength (it keeps more of the source)."""
    table: dict = defaultdict(dict)
    for (preset, edit_type), by_strength in scores_by_key.items():
        def rank(item):
            strength, scores = item
            return (np.mean([s.success for s in scores]),
                    np.mean([s.alignment + s.fidelity for s in scores]), -strength)
        table[preset][edit_type] = max(by_strength.items(), key=rank)[0]
    return {p: dict(sorted(t.items())) for p, t in table.items()}


def base_only(cascade):
    """The cascade cut after its base stage (same weights, same text encoder)."""
    import dataclasses

    from dreamix_ray.models.cascade import Cascade

    config = dataclasses.replace(cascade.config, stages=(cascade.base.config,))
    return Cascade(config, cascade.text_encoder, [cascade.base])


def main() -> int:
    from dreamix_ray.quiet import quiet_libraries
    from dreamix_ray.evaluate import (EDIT_TYPES, PRESET_VARIANT, EvalSettings, _render, eval_cases,
                                      finetune_variants, run_method, score)
    from dreamix_ray.config import STRENGTH_PRESETS
    from dreamix_ray.models.cascade import load_cascade

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--sources", type=int, default=4, help="tuning source videos (4 edits each)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0])
    p.add_argument("--presets", nargs="+", default=list(STRENGTH_PRESETS), choices=list(STRENGTH_PRESETS))
    p.add_argument("--ft-steps", type=int, default=EvalSettings.finetune_steps, help="base finetuning steps")
    p.add_argument("--ft-lr", type=float, default=None, help="finetuning lr (default: the cascade's)")
    p.add_argument("--types", nargs="+", default=list(EDIT_TYPES), choices=list(EDIT_TYPES))
    p.add_argument("--motion-from-model", action="store_true",
                   help="motion edits guide with the base's own estimate, not the source's middle frame "
                        "(EditConfig.motion_from_input, on in `dreamix eval`)")
    p.add_argument("--base-only", action="store_true", help="judge the base stage's output (10x faster)")
    p.add_argument("--write", action="store_true", help="store the chosen table in the cascade's cascade.json")
    args = p.parse_args()
    quiet_libraries()
    full = load_cascade(args.model)
    cascade = base_only(full) if args.base_only else full
    groups = defaultdict(list)
    for case in eval_cases(args.sources, held=False):
        if case.edit_type in args.types:
            groups[id(case.source)].append(case)
    scores: dict = defaultdict(lambda: defaultdict(list))  # (preset, type) -> strength -> [Scores]
    start = time.perf_counter()
    for n, group in enumerate(groups.values(), 1):
        source = _render(group[0].source, cascade)
        targets = [_render(c.target, cascade).frames for c in group]
        tuned = {}
        if any(p != "none" for p in args.presets):  # finetuned on the full-size source, as in `dreamix eval`
            ft = EvalSettings(finetune_steps=args.ft_steps, finetune_lr=args.ft_lr)
            presets = tuple(p for p in args.presets if p != "none")
            tuned = finetune_variants(_render(group[0].source, full), full, ft, group[0].seed, presets)
            if args.base_only:
                tuned = {v: (base_only(model), cfg) for v, (model, cfg) in tuned.items()}
        for preset in args.presets:
            for strength in args.strengths:
                settings = EvalSettings(edit_strengths={preset: {c.edit_type: strength for c in group}},
                                        motion_from_input=not args.motion_from_model)
                outs = run_method(PRESET_VARIANT[preset], group, source, cascade, tuned, settings)
                for case, out, target in zip(group, outs, targets):
                    scores[(preset, case.edit_type)][strength].append(score(case, source.frames, out, target))
        print(f"source {n}/{len(groups)} done after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    for (preset, edit_type), by_strength in sorted(scores.items()):
        print(f"{preset:5s} {edit_type:10s} " + "  ".join(
            f"s={st:g}: {np.mean([x.success for x in sc]):.0%} (align {np.mean([x.alignment for x in sc]):.2f}, "
            f"fid {np.mean([x.fidelity for x in sc]):.2f})" for st, sc in sorted(by_strength.items())))
    table = choose(scores)
    print("edit_strengths:", json.dumps(table))
    if args.write:
        from dreamix_ray.models.cascade import EMBEDDED_DIR, read_config, update_config

        path = Path(args.model or EMBEDDED_DIR)
        old = read_config(path).edit_strengths or {}  # merged per preset: a sweep of some types keeps the others
        update_config(path, edit_strengths={p: {**old.get(p, {}), **table.get(p, {})} for p in {**old, **table}})
        print(f"wrote edit_strengths to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
