"""`dreamix pretrain ...`: shapes-world pretraining of the embedded stages; its flags are jobs/pretrain.py's."""

from __future__ import annotations

import argparse

from ..cluster.pretrain_cli import main as pretrain_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="arguments of jobs/pretrain.py (see --help)")


def run(args) -> int:
    return pretrain_main(args.pretrain_args)
