"""Can a fresh base learn the direction word where it matters most? Train a new base only on timesteps
in [--t-min, 999] (where it must predict a clip's mean layout from the text alone), then judge it with
`python jobs/eval_base.py --weights OUT --caption-loss` (true vs opposite-direction caption).

    python jobs/probe_high_noise.py --out runs/fresh_b --steps 300 --coord-planes --motion-planes 2

A diagnostic for BENCHMARKS.md (session 6), not a way to train the shipped base: a few hundred steps
tell whether an architecture can pick up the direction at all before a 2-hour run is paid for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamix_ray.models.cascade import Stage  # noqa: E402
from dreamix_ray.models.embedded import EMBEDDED_STAGES  # noqa: E402
from dreamix_ray.models.stage import StageDenoiser  # noqa: E402
from dreamix_ray.models.text import TextEncoder  # noqa: E402
from dreamix_ray.pretrain import (  # noqa: E402
    PretrainConfig,
    fit_motion_projection,
    pretrain_batch,
    stage_denoisers,
)
from dreamix_ray.sampling import make_scheduler  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the trained base is saved")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--t-min", type=int, default=990, help="lowest training timestep (of 0..999)")
    p.add_argument("--high-share", type=float, default=1.0,
                   help="share of each batch's rows on [--t-min, 999]; the rest uniform on 0..999")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--coord-planes", action="store_true")
    p.add_argument("--motion-planes", type=int, default=0, help="fitted to the captions' directions, then frozen")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    text_encoder = TextEncoder("minilm")
    cfg = PretrainConfig(stage="base", seed=3, coord_planes=args.coord_planes, motion_planes=args.motion_planes)
    torch.manual_seed(0)
    model = StageDenoiser(**stage_denoisers(cfg)["base"]).train()
    if args.motion_planes:
        print(f"motion planes fitted (mse {fit_motion_projection(model, text_encoder, cfg, steps=100):.3f})")
        model.motion_from_text.requires_grad_(False)
    stage = Stage(EMBEDDED_STAGES[0], model, make_scheduler())
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    gen, losses = torch.Generator().manual_seed(5), []
    for step in range(args.steps):
        batch = pretrain_batch(stage, cfg, step, text_encoder)
        t_b = torch.randint(args.t_min, 1000, batch.t_b.shape, generator=gen)
        if args.high_share < 1.0:  # (only then: the default run draws what it drew before the option)
            high = torch.rand(batch.t_b.shape, generator=gen) < args.high_share
            t_b = torch.where(high, t_b, torch.randint(0, 1000, batch.t_b.shape, generator=gen))
        loss = dataclasses.replace(batch, frames_step=False, t_b=t_b).loss(stage)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {sum(losses[-50:]) / 50:.4f}", flush=True)
    model.eval().save_pretrained(args.out)
    print(f"saved {args.out}; judge it with: python jobs/eval_base.py --weights {args.out} --caption-loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
