"""What the `dreamix` commands share: their common flags, and turning flags into an EditRequest, a loaded
cascade, a store and written outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import CFG_MODES, EDIT_TYPES, PRECISIONS
from ..devices import resolve_device
from ..finetune import ADAPTERS, FinetuneConfig, finetune_preset
from ..models.adapters import LORA_TARGETS
from ..models.cascade import Cascade, load_cascade
from ..request import DEFAULT_PRECISION, EditRequest
from ..storage import ArtifactStore
from ..video import Video, write_preview, write_video
from ..world.captions import names_the_world

FIT_HELP = ("how the input is fitted to each stage's size: 'crop' resizes keeping the aspect ratio until "
            "the frame is covered, then center-crops; 'pad' resizes until it fits, then pads with black")


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=None, metavar="DIR",
                       help="cascade directory (default: the embedded shapes-world cascade)")
        p.add_argument("--device", default="auto",
                       help="where the networks run: auto (a CUDA GPU if there is one), cpu, cuda, cuda:N, mps")
    # SUPPRESS: given here or before the command (`dreamix --quiet edit ...`), never reset by the default
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", required=True, help="the edit prompt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same video")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                   help="sampling steps: one value for every stage, or one per stage in cascade order "
                        "(default: each stage's own)")
    p.add_argument("--eta", type=float, default=None,
                   help="sampler stochasticity in [0, 1]: DDIM's eta, or its flow counterpart for Wan stages "
                        "(0 = deterministic; default: per stage)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1 = off, as the paper; default: the cascade's, else 1)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="what guidance steers away from (default: the empty prompt)")
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=None,
                   help="guidance as one forward at batch 2B (batched, faster) or two at batch B (sequential, less "
                        "memory); default: batched for Wan stages, sequential for DDIM stages")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the networks' arithmetic: fp32, or bf16 / fp16 autocast (faster on CPUs with AVX512-BF16 "
                        "and on GPUs; results differ slightly from fp32); default: " + DEFAULT_PRECISION)
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
    add_common(p)


def add_strength_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="noise strength s in [0, 1] (default: the cascade's strength for --edit-type, "
                        "else 0.95 after finetuning, else 0.7)")
    p.add_argument("--edit-type", default=None, choices=EDIT_TYPES,
                   help="what the prompt changes; picks the cascade's tuned strength for it (motion edits need "
                        "more noise than style edits); motion also implies --motion-from-input")


def add_finetune_args(p: argparse.ArgumentParser, preset_flag: bool = True) -> None:
    if preset_flag:
        p.add_argument("--preset", choices=("video", "mixed", "frames"), default="mixed",
                       help="paper recipe: video (alpha 1, 64 steps), mixed (0.35, 250), frames (0, 100)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the video loss in [0, 1]")
    p.add_argument("--ft-steps", "--finetune-steps", dest="ft_steps", type=int, default=None,
                   help="finetuning steps per stage")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-4 for LoRA; with --adapter full the cascade's, else 6e-6)")
    p.add_argument("--adapter", choices=ADAPTERS, default=None,
                   help="lora (default): the artifact holds a LoRA adapter per finetuned stage; full: every weight")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 4)")
    p.add_argument("--lora-targets", choices=LORA_TARGETS, default=None,
                   help="attention layers that carry the LoRA (default: attention = spatial + temporal)")
    p.add_argument("--stages", nargs="+", default=None, help="stages to finetune (default: the cascade's)")
    p.add_argument("--token", default=None, help="rare token naming the finetuned video (default: naia)")
    p.add_argument("--store", default=None, metavar="DIR|s3://...",
                   help="artifact store (default: $DREAMIX_STORE or ~/.cache/dreamix_ray/artifacts)")


def progress(args) -> bool:
    return not getattr(args, "quiet", False)


def cascade_of(args) -> Cascade:
    device = resolve_device(getattr(args, "device", "auto"))  # before loading: a bad device fails fast
    return load_cascade(getattr(args, "model", None)).to(device)


def store_of(args) -> ArtifactStore:
    return ArtifactStore(getattr(args, "store", None))


def edit_request(args, task: str = "edit") -> EditRequest:
    """The command's flags as an EditRequest: bad values fail here, before any model loads."""
    return EditRequest(prompt=args.prompt, task=task, strength=getattr(args, "strength", None),
                       edit_type=getattr(args, "edit_type", None), finetune=getattr(args, "finetune", None),
                       seed=args.seed, steps=tuple(getattr(args, "steps", None) or ()), eta=getattr(args, "eta", None),
                       guidance_scale=getattr(args, "guidance", None), num_frames=getattr(args, "frames", None),
                       fit=getattr(args, "fit", "crop"), motion_guidance=getattr(args, "motion_guidance", 1.0),
                       motion_from_input=getattr(args, "motion_from_input", False) or None,  # unsaid: the rule
                       sr_strength=getattr(args, "sr_strength", None),
                       sr_consistency=getattr(args, "sr_consistency", True),
                       negative_prompt=getattr(args, "negative_prompt", ""), cfg_mode=getattr(args, "cfg_mode", None),
                       precision=getattr(args, "precision", None))


def finetune_config(args, preset: str) -> FinetuneConfig:
    return finetune_preset(preset, alpha=getattr(args, "alpha", None), steps=getattr(args, "ft_steps", None),
                           lr=getattr(args, "lr", None), token=getattr(args, "token", None),
                           stages=tuple(args.stages) if getattr(args, "stages", None) else None,
                           fit=getattr(args, "fit", None), seed=getattr(args, "seed", None),
                           batch_size=getattr(args, "batch_size", None), adapter=getattr(args, "adapter", None),
                           lora_rank=getattr(args, "lora_rank", None), lora_targets=getattr(args, "lora_targets", None))


def write_outputs(args, video: Video, original: Video | None = None, audio_from=None,
                  prompt: str | None = None) -> None:
    """The output, and with --preview original | edit side by side, its contact sheet labelled with `prompt`."""
    write_video(args.output, video, audio_from=audio_from)
    print(f"wrote {args.output} ({video.num_frames} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    if original is not None and getattr(args, "preview", None):
        mp4, png = write_preview(original, video, args.preview, prompt=prompt)
        print(f"wrote preview {mp4} and {png}")


def file_bytes(path: str) -> bytes:
    """The input's bytes for the artifact key; a folder of frames hashes its files in order."""
    p = Path(path)
    if p.is_dir():
        return b"".join(f.read_bytes() for f in sorted(p.iterdir()) if f.is_file())
    return p.read_bytes()


def note(text: str) -> None:
    print(text, file=sys.stderr)


def note_if_out_of_world(args, prompt: str) -> None:
    """One line when the embedded model is asked for what it never saw: it knows only the shapes world."""
    if getattr(args, "model", None) is None and not names_the_world(prompt):
        note(f"note: the embedded model knows only the shapes world (circles, squares and triangles moving over "
             f"plain or checkered backgrounds); {prompt!r} names none of it, so expect shapes-world colour "
             f"blobs. Real models: --model DIR (docs/REAL_MODELS.md)")
