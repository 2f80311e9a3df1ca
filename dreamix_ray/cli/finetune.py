"""`dreamix finetune INPUT`: finetune once on a video (paper Sec. 4.2), in this process or on Ray Train
workers; prints the artifact id alone on the last line of stdout."""

from __future__ import annotations

import argparse

from ..finetune import finetune_or_load
from ..video import read_video
from .common import FIT_HELP, add_common, add_finetune_args, cascade_of, file_bytes, finetune_config, progress, store_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input")
    add_finetune_args(p)
    p.add_argument("--fit", choices=("crop", "pad"), default="crop", help=FIT_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DeepSpeed ZeRO)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage with --workers")
    p.add_argument("--address", default=None, help="Ray cluster address with --workers")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per finetuning step (default 1); the same on any number of --workers")
    p.add_argument("--run-name", default=None, help="Ray Train run name with --workers (default: the artifact id)")
    p.add_argument("--storage", default=None, metavar="DIR|s3://...",
                   help="Ray Train checkpoint storage with --workers (default: <store>/_train)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker (NCCL, bf16 if supported)")
    p.add_argument("--spread", action="store_true",
                   help="Ray Train workers on different nodes where possible (default: packed onto few nodes)")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="with --workers, restart the workers up to N times from the newest checkpoint when one "
                        "(or its node) is lost (default 0: the run stops; rerunning it resumes too)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="with --workers, steps between checkpoints (default 25); not part of the artifact's id")
    p.add_argument("--deepspeed-config", default=None, metavar="JSON",
                   help="DeepSpeed config over the defaults with --workers (e.g. infra/deepspeed_zero3.json)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="clips per worker per micro-step with --workers (gradient accumulation)")
    add_common(p)


def run(args) -> int:
    cfg = finetune_config(args, args.preset)
    video = read_video(args.input)
    if args.workers:
        from ..cluster.train import distributed_finetune  # Ray Train + DeepSpeed: the optional ray extra

        key = distributed_finetune(args, video, cfg, file_bytes(args.input))
    else:
        _, key = finetune_or_load(video, cfg, cascade_of(args), store_of(args), progress(args),
                                  source_bytes=file_bytes(args.input))
    print(key)  # alone on the last line of stdout, for scripts
    return 0
