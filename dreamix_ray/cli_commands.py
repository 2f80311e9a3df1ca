"""What each `dreamix` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from .animate import clip_shape, image_to_video
from .devices import resolve_device
from .edit import edit, generate
from .finetune import finetune_or_load, finetune_preset, finetuned_prompt, load_finetuned
from .models.cascade import load_cascade
from .request import EditRequest, resolve
from .storage import ArtifactStore
from .subject import finetune_subject
from .video import read_image, read_video, write_preview, write_video


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _cascade(args):
    device = resolve_device(getattr(args, "device", "auto"))  # before loading: a bad device fails fast
    return load_cascade(getattr(args, "model", None)).to(device)


def _store(args):
    return ArtifactStore(getattr(args, "store", None))


def edit_request(args, task: str = "edit") -> EditRequest:
    """The command's flags as an EditRequest: bad values fail here, before any model loads."""
    return EditRequest(prompt=args.prompt, task=task, strength=getattr(args, "strength", None),
                       edit_type=getattr(args, "edit_type", None), finetune=getattr(args, "finetune", None),
                       seed=args.seed, steps=tuple(getattr(args, "steps", None) or ()), eta=getattr(args, "eta", None),
                       guidance_scale=getattr(args, "guidance", 1.0), num_frames=getattr(args, "frames", None),
                       fit=getattr(args, "fit", "crop"), motion_guidance=getattr(args, "motion_guidance", 1.0),
                       motion_from_input=getattr(args, "motion_from_input", False),
                       sr_strength=getattr(args, "sr_strength", None),
                       sr_consistency=getattr(args, "sr_consistency", True))


def _finetune_config(args, preset: str):
    return finetune_preset(preset, alpha=getattr(args, "alpha", None), steps=getattr(args, "ft_steps", None),
                           lr=getattr(args, "lr", None), token=getattr(args, "token", None),
                           stages=tuple(args.stages) if getattr(args, "stages", None) else None,
                           fit=getattr(args, "fit", None), seed=getattr(args, "seed", None),
                           batch_size=getattr(args, "batch_size", None))


def _write(args, video, original=None, audio_from=None) -> None:
    write_video(args.output, video, audio_from=audio_from)
    print(f"wrote {args.output} ({video.num_frames} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    if original is not None and getattr(args, "preview", None):
        mp4, png = write_preview(original, video, args.preview)
        print(f"wrote preview {mp4} and {png}")


def cmd_edit(args) -> int:
    request = edit_request(args)  # before decoding, loading or training
    video = read_video(args.input)
    cascade, prompt = _cascade(args), args.prompt
    if args.finetuned:
        cascade, ft_cfg = load_finetuned(cascade, args.finetuned, _store(args))
        prompt, request = finetuned_prompt(prompt, ft_cfg), dataclasses.replace(request, finetune=ft_cfg.preset)
    elif args.finetune:
        ft_cfg = _finetune_config(args, args.finetune)
        cascade, key = finetune_or_load(video, ft_cfg, cascade, _store(args), _progress(args),
                                        source_bytes=_file_bytes(args.input))
        print(f"finetuned artifact {key}", file=sys.stderr)
        prompt = finetuned_prompt(prompt, ft_cfg)
    plan = resolve(request, cascade.config)
    start = time.perf_counter()
    out = edit(video, prompt, plan, cascade, progress=_progress(args))
    print(f"edited in {time.perf_counter() - start:.1f} s with prompt {prompt!r} at strength {plan.config.strength:g}")
    _write(args, out, original=video, audio_from=args.input if args.keep_audio else None)
    return 0


def _file_bytes(path: str) -> bytes:
    """The input's bytes for the artifact key; a folder of frames hashes its files in order."""
    p = Path(path)
    if p.is_dir():
        return b"".join(f.read_bytes() for f in sorted(p.iterdir()) if f.is_file())
    return p.read_bytes()


def cmd_generate(args) -> int:
    request = edit_request(args, "generate")
    cascade = _cascade(args)
    if args.finetuned:
        cascade, _ = load_finetuned(cascade, args.finetuned, _store(args))
    out = generate(args.prompt, resolve(request, cascade.config), cascade, progress=_progress(args))
    _write(args, out)
    return 0


def cmd_finetune(args) -> int:
    cfg = _finetune_config(args, args.preset)
    video = read_video(args.input)
    if args.workers:
        from .cluster.train import distributed_finetune  # Ray Train + DeepSpeed (optional extra)

        key = distributed_finetune(args, video, cfg, _file_bytes(args.input))
    else:
        _, key = finetune_or_load(video, cfg, _cascade(args), _store(args), _progress(args),
                                  source_bytes=_file_bytes(args.input))
    print(key)  # alone on the last line of stdout, for scripts
    return 0


def cmd_animate(args) -> int:
    request = edit_request(args, "animate")
    cascade = _cascade(args)
    frames, fps = clip_shape(cascade)
    coarse = image_to_video(read_image(args.image), args.camera, frames, fps)
    prompt = args.prompt
    if args.finetune:
        cfg = finetune_preset("frames", steps=args.ft_steps, lr=args.lr)
        cascade, key = finetune_or_load(coarse, cfg, cascade, _store(args), _progress(args),
                                        source_bytes=Path(args.image).read_bytes() + args.camera.encode())
        print(f"finetuned artifact {key}", file=sys.stderr)
        prompt = finetuned_prompt(prompt, cfg)
    out = edit(coarse, prompt, resolve(request, cascade.config), cascade, progress=_progress(args))
    _write(args, out, original=coarse)
    return 0


def cmd_subject(args) -> int:
    cfg = finetune_preset("frames", token=args.token, steps=args.ft_steps, lr=args.lr)
    key = finetune_subject(args.images_dir, args.token, _cascade(args), _store(args), cfg, _progress(args))
    print(key)
    return 0


def cmd_info(args) -> int:
    cascade = _cascade(args)
    print(f"cascade {cascade.config.name} ({cascade.source}); text encoder {cascade.text_encoder.kind} "
          f"(hidden {cascade.text_encoder.hidden_size})")
    if cascade.config.description:
        print(cascade.config.description)
    print(f"{'stage':<8}{'kind':<6}{'factor':>7}{'frames':>8}{'size':>10}{'fps':>7}{'steps':>7}{'params':>11}")
    for row in cascade.info():
        print(f"{row['name']:<8}{row['kind']:<6}{row['factor']:>7}{row['frames']:>8}"
              f"{str(row['height']) + 'x' + str(row['width']):>10}{row['fps']:>7g}{row['steps']:>7}"
              f"{row['parameters']:>11,}")
    return 0


COMMANDS = {"edit": cmd_edit, "generate": cmd_generate, "finetune": cmd_finetune, "animate": cmd_animate,
            "subject": cmd_subject, "info": cmd_info}


def run(args) -> int:
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    from . import cli_extra

    return cli_extra.run(args)
