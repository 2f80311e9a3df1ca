"""`dreamix subject IMAGES_DIR --token TOKEN`: frame-only finetuning on a subject's images (paper Sec. 5)."""

from __future__ import annotations

import argparse

from ..finetune import finetune_preset
from ..subject import finetune_subject
from .common import add_common, cascade_of, progress, store_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images_dir")
    p.add_argument("--token", required=True, help="the word that will name the subject in prompts")
    p.add_argument("--store", default=None)
    p.add_argument("--ft-steps", dest="ft_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    add_common(p)


def run(args) -> int:
    cfg = finetune_preset("frames", token=args.token, steps=args.ft_steps, lr=args.lr)
    print(finetune_subject(args.images_dir, args.token, cascade_of(args), store_of(args), cfg, progress(args)))
    return 0
