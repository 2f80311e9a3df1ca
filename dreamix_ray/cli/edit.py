"""`dreamix edit INPUT -p PROMPT -o OUT.mp4`: one edit (paper Sec. 4.1), optionally finetuned first (Sec. 4.2)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from ..edit import edit
from ..finetune import finetune_or_load, finetuned_prompt, load_finetuned
from ..request import resolve
from ..video import read_video
from .common import (add_edit_args, add_finetune_args, add_strength_args, cascade_of, edit_request, file_bytes,
                     finetune_config, note, note_if_out_of_world, progress, store_of, write_outputs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file (mp4, webm, mov, avi, gif) or a folder of frames")
    add_edit_args(p)
    add_strength_args(p)
    p.add_argument("--motion-from-input", action="store_true",
                   help="a motion edit: motion guidance moves the input's middle frame the prompt's way, so the "
                        "object keeps its look and place (default: the model's own estimate)")
    p.add_argument("--preview", default=None, metavar="PREVIEW.mp4",
                   help="also write original | edit side by side (mp4 and a contact-sheet PNG)")
    p.add_argument("--keep-audio", action="store_true", help="copy the input's audio into the output")
    p.add_argument("--finetune", nargs="?", const="mixed", default=None, choices=("video", "mixed", "frames"),
                   help="finetune on the input first (or reuse the stored artifact) with this preset")
    p.add_argument("--finetuned", default=None, metavar="ID", help="use a stored finetuned artifact")
    add_finetune_args(p, preset_flag=False)


def run(args) -> int:
    note_if_out_of_world(args, args.prompt)
    request = edit_request(args)  # before decoding, loading or training
    video = read_video(args.input)
    cascade, prompt = cascade_of(args), args.prompt
    if args.finetuned:
        cascade, ft_cfg = load_finetuned(cascade, args.finetuned, store_of(args))
        prompt, request = finetuned_prompt(prompt, ft_cfg), dataclasses.replace(request, finetune=ft_cfg.preset)
    elif args.finetune:
        ft_cfg = finetune_config(args, args.finetune)
        cascade, key = finetune_or_load(video, ft_cfg, cascade, store_of(args), progress(args),
                                        source_bytes=file_bytes(args.input))
        note(f"finetuned artifact {key}")
        prompt = finetuned_prompt(prompt, ft_cfg)
    plan = resolve(request, cascade.config)
    start = time.perf_counter()
    out = edit(video, prompt, plan, cascade, progress=progress(args))
    print(f"edited in {time.perf_counter() - start:.1f} s with prompt {prompt!r} at strength {plan.config.strength:g}")
    write_outputs(args, out, original=video, audio_from=args.input if args.keep_audio else None, prompt=prompt)
    return 0
