"""`dreamix generate -p PROMPT -o OUT.mp4`: text-to-video, strength 1 with no input (the paper's baseline)."""

from __future__ import annotations

import argparse

from ..edit import generate
from ..finetune import load_finetuned
from ..request import resolve
from .common import add_edit_args, cascade_of, edit_request, note_if_out_of_world, progress, store_of, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_edit_args(p)
    p.add_argument("--finetuned", default=None, metavar="ID", help="a finetuned artifact (e.g. a subject)")
    p.add_argument("--store", default=None, metavar="DIR|s3://...", help="artifact store")


def run(args) -> int:
    note_if_out_of_world(args, args.prompt)
    request = edit_request(args, "generate")
    cascade = cascade_of(args)
    if args.finetuned:
        cascade, _ = load_finetuned(cascade, args.finetuned, store_of(args))
    write_outputs(args, generate(args.prompt, resolve(request, cascade.config), cascade, progress=progress(args)))
    return 0
