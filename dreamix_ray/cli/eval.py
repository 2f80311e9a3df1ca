"""`dreamix eval`: the automatic Tables 1 and 2 on held-out shapes-world edits -> EVAL.md (evaluate.py)."""

from __future__ import annotations

import argparse

from ..config import PRECISIONS
from ..evaluate import run_eval_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="one source video, one edit per type and method (CI)")
    p.add_argument("--sources", type=int, default=None,
                   help="held-out source videos, one edit per type each (default 12; 1 with --quick)")
    p.add_argument("-o", "--output", default="EVAL.md")
    p.add_argument("--model", default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the networks' arithmetic for every edit (default: dreamix edit's)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)


def run(args) -> int:
    return run_eval_cli(args)
