"""Pretrain the embedded cascade on the shapes world: `python jobs/pretrain.py --stages base tsr ssr`.

Single process by default (one stage after another); a rerun with the same --run-dir resumes.
`--export DIR` writes the cascade directory from the stages' EMA weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamix_ray.pretrain import PretrainConfig, export_cascade, train_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=["base", "tsr", "ssr"], choices=["base", "tsr", "ssr"])
    p.add_argument("--minutes", type=float, nargs="+", default=[60.0],
                   help="wall-clock budget per stage (one value, or one per stage)")
    p.add_argument("--run-dir", default="runs/pretrain", help="checkpoints and logs; rerun to resume")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", default=None, help="write the trained cascade to this directory when done")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = args.minutes if len(args.minutes) == len(args.stages) else [args.minutes[0]] * len(args.stages)
    for stage, budget in zip(args.stages, minutes):
        cfg = PretrainConfig(stage=stage, minutes=budget, batch_size=args.batch_size, lr=args.lr,
                             max_steps=args.max_steps, seed=args.seed)
        train_stage(cfg, args.run_dir, log=lambda m: print(m, flush=True))
    if args.export:
        export_cascade(args.run_dir, args.export)
        print(f"exported cascade to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
