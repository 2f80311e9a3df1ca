"""The embedded default cascade's architecture (trained on the shapes world by `dreamix pretrain`)."""

from __future__ import annotations

from pathlib import Path

from ..config import CascadeConfig, StageConfig
from ..errors import UserError

# Here, not in cascade.py, so code that only reads a cascade's config (the batch pipeline's file steps) needs no
# diffusers.
CASCADE_FILE = "cascade.json"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "default_cascade"


class CascadeError(UserError):
    """A cascade directory is missing or malformed; the message says what to do."""


EMBEDDED_NAME = "dreamix-shapes-64"
EMBEDDED_DESCRIPTION = (
    "Tiny cascade trained only on the procedural shapes world (coloured circles, squares and "
    "triangles moving over plain backgrounds). It knows nothing else: real footage comes out as "
    "shapes-world-like colour blobs."
)

# base 8x16x16 @4fps -> TSR 2x -> 16x16x16 @8fps -> SSR 4x -> 16x64x64 @8fps (2 s clips). The SSR (trained with
# DDIM's schedule) samples with DPM-Solver++ in 6 steps: the same success on tuning edits as stochastic DDIM in 12,
# in half the SSR's time (BENCHMARKS.md, "Fewer SSR steps with DPM-Solver++").
EMBEDDED_STAGES = (
    StageConfig("base", "base", frames=8, height=16, width=16, fps=4.0, steps=32, eta=0.5, finetune=True),
    StageConfig("tsr", "tsr", frames=16, height=16, width=16, fps=8.0, factor=2, steps=12, eta=0.5),
    StageConfig("ssr", "ssr", frames=16, height=64, width=64, fps=8.0, factor=4, steps=6, eta=0.5,
                finetune=True, sampler="dpm++"),
)

EMBEDDED_DENOISERS = {
    "base": dict(block_out_channels=(32, 64, 64), position_frames=8,
                 down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")),
    # Temporal SR at 16x16: cross-attention only at 8x8 and below keeps it cheap.
    "tsr": dict(block_out_channels=(32, 64, 64), position_frames=16,
                down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D")),
    # Spatial SR at 64x64 is local work: no attention at full resolution, no frame position
    # (it runs on frame chunks whose position in the clip varies).
    "ssr": dict(block_out_channels=(32, 48, 64), frame_position=False,
                down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"),
                up_block_types=("CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D")),
}


# Finetuning learning rate found on tuning videos (BENCHMARKS.md, "Finetuning"): a 7M-parameter cascade
# needs a far larger step than the paper's 6e-6 for a billion parameters.
EMBEDDED_FINETUNE_LR = 3e-5

# Strength per edit type found on tuning videos (`python research/tune_strengths.py --sources 8 --strengths
# 0.6 0.8 0.9 0.95 1.0 --base-only`, BENCHMARKS.md): object edits land at 0.6, style at 0.9, a new
# background at 0.95; a new motion only at 1.0 (below it the source's motion survives). Finetuning at
# the tuned lr and 60 steps did not move any choice. A new colour for the object only (`--types colour
# --sources 12 --strengths 0.6 0.7 0.8 0.9 1.0`) lands from 0.8 (0.6: 8 of 12) but keeps the source's
# motion only at 1.0, where motion guidance reads it from the prompt: 83% there, 67% at 0.8-0.9
# (finetuned: 50% video, 42% mixed, also at 1.0).
_TUNED = {"background": 0.95, "colour": 1.0, "motion": 1.0, "object": 0.6, "style": 0.9}
EMBEDDED_EDIT_STRENGTHS = {"none": dict(_TUNED), "video": dict(_TUNED), "mixed": dict(_TUNED)}


def embedded_config(text_encoder_spec: dict) -> CascadeConfig:
    return CascadeConfig(EMBEDDED_STAGES, dict(text_encoder_spec), EMBEDDED_NAME, EMBEDDED_DESCRIPTION,
                         finetune_lr=EMBEDDED_FINETUNE_LR, edit_strengths=EMBEDDED_EDIT_STRENGTHS)
