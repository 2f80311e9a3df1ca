"""The `dreamix` command: edit, generate, finetune, animate, subject, info, demo, eval, pretrain, batch, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .config import EDIT_TYPES
from .errors import UserError

FIT_HELP = ("how the input is fitted to each stage's size: 'crop' resizes keeping the aspect ratio until "
            "the frame is covered, then center-crops; 'pad' resizes until it fits, then pads with black")


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, hub warnings) drowns the command's own progress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging
    from diffusers.utils import logging as df_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    df_logging.set_verbosity_error()
    df_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=None, metavar="DIR",
                       help="cascade directory (default: the embedded shapes-world cascade)")
        p.add_argument("--device", default="auto",
                       help="where the networks run: auto (a CUDA GPU if there is one), cpu, cuda, cuda:N, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", required=True, help="the edit prompt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same video")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                   help="sampling steps: one value for every stage, or one per stage in cascade order (default: each stage's own)")
    p.add_argument("--eta", type=float, default=None, help="DDIM stochasticity in [0, 1] (default: per stage)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1 = off, as the paper)")
    p.add_argument("--motion-guidance", type=float, default=1.0, metavar="W",
                   help="weight in [0, 1] of the cascade's motion guidance, which imposes the prompt's direction "
                        "of travel at high noise (0 = off; cascades without a fitted motion prior ignore it)")
    p.add_argument("--sr-strength", type=float, default=None, metavar="S",
                   help="noise the pixel SR stages start from, in (0, 1]: 1 = pure noise (the paper), lower keeps "
                        "the base's look (default: the cascade's tuned value, else 1)")
    p.add_argument("--no-sr-consistency", dest="sr_consistency", action="store_false",
                   help="let the TSR redraw the base's frames (default: it keeps them as its keyframes)")
    p.add_argument("--frames", type=int, default=None, help="base-stage frames (default: the base's length)")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop", help=FIT_HELP)
    _common(p)


def _finetune_args(p: argparse.ArgumentParser, preset_flag: bool = True) -> None:
    if preset_flag:
        p.add_argument("--preset", choices=("video", "mixed", "frames"), default="mixed",
                       help="paper recipe: video (alpha 1, 64 steps), mixed (0.35, 250), frames (0, 100)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the video loss in [0, 1]")
    p.add_argument("--ft-steps", "--finetune-steps", dest="ft_steps", type=int, default=None,
                   help="finetuning steps per stage")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the cascade's, else 6e-6)")
    p.add_argument("--stages", nargs="+", default=None, help="stages to finetune (default: the cascade's)")
    p.add_argument("--token", default=None, help="rare token naming the finetuned video (default: naia)")
    p.add_argument("--store", default=None, metavar="DIR|s3://...",
                   help="artifact store (default: $DREAMIX_STORE or ~/.cache/dreamix_ray/artifacts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamix", description="Dreamix text-guided video editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit a video from a text prompt (paper Sec. 4.1)")
    p.add_argument("input", help="video file (mp4, webm, mov, avi, gif) or a folder of frames")
    _edit_args(p)
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="noise strength s in [0, 1] (default: the cascade's strength for --edit-type, "
                        "else 0.7, or 0.95 after finetuning)")
    p.add_argument("--edit-type", default=None, choices=EDIT_TYPES,
                   help="what the prompt changes; picks the cascade's tuned strength for it (motion edits need "
                        "more noise than style edits); motion also implies --motion-from-input")
    p.add_argument("--motion-from-input", action="store_true",
                   help="a motion edit: motion guidance moves the input's middle frame the prompt's way, so the "
                        "object keeps its look and place (default: the model's own estimate)")
    p.add_argument("--preview", default=None, metavar="PREVIEW.mp4",
                   help="also write original | edit side by side (mp4 and a contact-sheet PNG)")
    p.add_argument("--keep-audio", action="store_true", help="copy the input's audio into the output")
    p.add_argument("--finetune", nargs="?", const="mixed", default=None, choices=("video", "mixed", "frames"),
                   help="finetune on the input first (or reuse the stored artifact) with this preset")
    p.add_argument("--finetuned", default=None, metavar="ID", help="use a stored finetuned artifact")
    _finetune_args(p, preset_flag=False)

    p = sub.add_parser("generate", help="text-to-video with no input video")
    _edit_args(p)
    p.add_argument("--finetuned", default=None, metavar="ID", help="a finetuned artifact (e.g. a subject)")
    p.add_argument("--store", default=None, metavar="DIR|s3://...", help="artifact store")

    p = sub.add_parser("finetune", help="finetune once on a video; prints the artifact id")
    p.add_argument("input")
    _finetune_args(p)
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
    p.add_argument("--deepspeed-config", default=None, metavar="JSON",
                   help="DeepSpeed config over the defaults with --workers (e.g. infra/deepspeed_zero3.json)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="clips per worker per micro-step with --workers (gradient accumulation)")
    _common(p)

    p = sub.add_parser("animate", help="animate an image (paper Sec. 5)")
    p.add_argument("image")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--camera", default="static",
                   choices=("static", "pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out"))
    p.add_argument("--finetune", nargs="?", const="frames", default=None, choices=("frames",),
                   help="frame-only finetune on the image first (paper Sec. 5)")
    p.add_argument("--strength", "-s", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--ft-steps", dest="ft_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    _common(p)

    p = sub.add_parser("subject", help="learn a subject from a folder of images; prints the artifact id")
    p.add_argument("images_dir")
    p.add_argument("--token", required=True, help="the word that will name the subject in prompts")
    p.add_argument("--store", default=None)
    p.add_argument("--ft-steps", dest="ft_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    _common(p)

    p = sub.add_parser("info", help="list the cascade's stages")
    _common(p)

    from . import cli_extra

    cli_extra.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from . import cli_commands

    try:
        return cli_commands.run(args)
    except UserError as exc:
        print(f"dreamix: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dreamix: error: {exc.filename or exc}: no such file or directory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamix: interrupted; finished outputs and the last finetune checkpoint are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
