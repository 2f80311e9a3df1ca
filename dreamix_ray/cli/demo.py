"""`dreamix demo`: the README's main command (dreamix_ray/demo.py)."""

from __future__ import annotations

import argparse

from ..demo import run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output-dir", default="out/demo")
    p.add_argument("-p", "--prompt", default=None, help="edit prompt (default: a new colour and motion)")
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="default: the cascade's tuned strength for motion edits, else 0.7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)


def run(args) -> int:
    return run_demo(args)
