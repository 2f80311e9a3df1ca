"""`dreamix pretrain` (and jobs/pretrain.py): flags -> PretrainConfig per stage -> the training loop in
this process, or on Ray Train with --workers N; then --export."""

from __future__ import annotations

import argparse

import torch

from ..pretrain import PretrainConfig, export_cascade, train_stage

DESCRIPTION = "Pretrain the embedded cascade's stages on the procedural shapes world (videos and images)."


def _pretrain_on_ray(cfg: PretrainConfig, args) -> None:
    """One stage on Ray Train; a rerun with the same --run-dir resumes from its checkpoint."""
    from .train import (  # Ray: an optional extra
        TrainSettings,
        ensure_ray,
        pretrain_on_ray,
        read_state,
    )

    settings = TrainSettings(workers=args.workers, engine=args.engine, zero=args.zero, use_gpu=args.gpu,
                             threads=args.threads)
    ensure_ray(args.address)
    result = pretrain_on_ray(cfg, args.run_dir, settings)
    losses = read_state(result.checkpoint)["losses"][cfg.stage]
    print(f"[{cfg.stage}] {len(losses)} steps on {args.workers} Ray Train workers, last loss {losses[-1]:.4f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dreamix pretrain", description=DESCRIPTION)
    p.add_argument("--stages", nargs="+", default=["base", "tsr", "ssr"], choices=["base", "tsr", "ssr"])
    p.add_argument("--minutes", type=float, nargs="+", default=[60.0],
                   help="wall-clock budget per stage (one value, or one per stage)")
    p.add_argument("--run-dir", default="runs/pretrain", help="checkpoints and logs; rerun to resume")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=1_000_000,
                   help="step budget; the learning rate decays (cosine) to a tenth of --lr at this step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by '' (teaches the unconditional model for guidance)")
    p.add_argument("--image-fraction", type=float, default=PretrainConfig.image_fraction,
                   help="share of steps trained in frame mode on frames as images")
    p.add_argument("--reversed-twins", type=float, default=PretrainConfig.reversed_twins,
                   help="chance a translating scene comes with its time-reversed twin in the batch (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="",
                   help="start from this trained stage folder (e.g. dreamix_ray/default_cascade/base)")
    p.add_argument("--workers", type=int, default=None,
                   help="train on Ray Train with this many DeepSpeed workers (same batches, same result)")
    p.add_argument("--engine", choices=("deepspeed", "ddp"), default="deepspeed",
                   help="the distributed engine with --workers (DDP keeps the whole optimizer on every worker)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage with --workers")
    p.add_argument("--address", default=None, help="Ray cluster address with --workers (default: a local Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker with --workers")
    p.add_argument("--export", default=None, help="write the trained cascade to this directory when done")
    args = p.parse_args(argv)
    if args.init_from and len(args.stages) > 1:
        p.error("--init-from names one stage's weights: give it with a single --stages value")
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = args.minutes if len(args.minutes) == len(args.stages) else [args.minutes[0]] * len(args.stages)
    for stage, budget in zip(args.stages, minutes):
        cfg = PretrainConfig(stage=stage, minutes=budget, batch_size=args.batch_size, lr=args.lr,
                             max_steps=args.max_steps, seed=args.seed, caption_dropout=args.caption_dropout,
                             image_fraction=args.image_fraction, reversed_twins=args.reversed_twins,
                             init_from=args.init_from)
        if args.workers:
            _pretrain_on_ray(cfg, args)
        else:
            train_stage(cfg, args.run_dir, log=lambda m: print(m, flush=True))
    if args.export:
        export_cascade(args.run_dir, args.export)
        print(f"exported cascade to {args.export}")
    return 0
