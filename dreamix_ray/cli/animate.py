"""`dreamix animate IMAGE -p PROMPT -o OUT.mp4`: image -> coarse video -> Dreamix edit (paper Sec. 5)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..animate import CAMERAS, clip_shape, image_to_video
from ..edit import edit
from ..finetune import finetune_or_load, finetune_preset, finetuned_prompt
from ..request import resolve
from ..video import read_image
from .common import add_common, cascade_of, edit_request, note, note_if_out_of_world, progress, store_of, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--camera", default="static", choices=CAMERAS)
    p.add_argument("--finetune", nargs="?", const="frames", default=None, choices=("frames",),
                   help="frame-only finetune on the image first (paper Sec. 5)")
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="noise strength (default 0.8, or 0.95 after finetuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--ft-steps", dest="ft_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    add_common(p)


def run(args) -> int:
    note_if_out_of_world(args, args.prompt)
    request = edit_request(args, "animate")
    cascade = cascade_of(args)
    frames, fps = clip_shape(cascade)
    coarse = image_to_video(read_image(args.image), args.camera, frames, fps)
    prompt = args.prompt
    if args.finetune:
        cfg = finetune_preset("frames", steps=args.ft_steps, lr=args.lr)
        cascade, key = finetune_or_load(coarse, cfg, cascade, store_of(args), progress(args),
                                        source_bytes=Path(args.image).read_bytes() + args.camera.encode())
        note(f"finetuned artifact {key}")
        prompt = finetuned_prompt(prompt, cfg)
    out = edit(coarse, prompt, resolve(request, cascade.config), cascade, progress=progress(args))
    write_outputs(args, out, original=coarse, prompt=prompt)
    return 0
