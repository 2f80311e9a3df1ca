"""Monitor base-stage pretraining: text-to-video at the base resolution on held-out captions, judged
by the shapes-world analyzer, with motion accuracy per direction.

    python research/eval_base.py --weights runs/pretrain/base/ema --n 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dreamix_ray.config import EditConfig  # noqa: E402
from dreamix_ray.degrade import tensor_to_frames  # noqa: E402
from dreamix_ray.edit import StageRun, run_stage  # noqa: E402
from dreamix_ray.models.cascade import Cascade, Stage  # noqa: E402
from dreamix_ray.models.embedded import EMBEDDED_STAGES, embedded_config  # noqa: E402
from dreamix_ray.models.stage import StageDenoiser  # noqa: E402
from dreamix_ray.models.text import TextEncoder  # noqa: E402
from dreamix_ray.pretrain import OPPOSITE, held_out  # noqa: E402
from dreamix_ray.sampling import make_scheduler  # noqa: E402
from dreamix_ray.world.analyze import analyze, compare  # noqa: E402
from dreamix_ray.world.captions import canonical_caption  # noqa: E402
from dreamix_ray.world.scene import sample_scene  # noqa: E402


def held_out_scenes(n: int, seed: int = 1234, held: bool = True):
    """Single-object scenes whose combination was held out of pretraining (or, held=False, trained on)."""
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        s = sample_scene(rng, n_objects=1)
        if held_out(s) == held:
            scenes.append(s)
    return scenes


def translating_pairs(n: int, seed: int):
    """n held-out translating scenes, their captions, and the same captions with the opposite direction word."""
    scenes = [s for s in held_out_scenes(4 * n, seed) if s.objects[0].motion in OPPOSITE][:n]
    opposite = [canonical_caption(s.replace_object(0, motion=OPPOSITE[s.objects[0].motion])) for s in scenes]
    return scenes, [canonical_caption(s) for s in scenes], opposite


def seen_motions(cascade: Cascade, prompts: list[str], cfg: EditConfig) -> list[str]:
    """What the analyzer sees in the base's text-to-video for each prompt; row i uses seed i."""
    sc = cascade.stages[0].config
    x0 = torch.zeros(len(prompts), 3, sc.frames, sc.height, sc.width)
    out = tensor_to_frames(run_stage(StageRun.of(cascade, cfg, prompts, list(range(len(prompts)))), 0, x0))
    seen = [analyze(frames) for frames in out]
    return [est.objects[0].motion if est.objects else "none" for est in seen]


def direction_probe(cascade: Cascade, n: int, seed: int, cfg: EditConfig) -> str:
    """Does the direction word decide the direction? Each held-out translating caption and its twin
    with the opposite direction word are sampled from the same noise (same seed). A base that ignores
    the word moves both the same way; one that follows it moves each the way its caption says."""
    scenes, prompts, twins = translating_pairs(n, seed)
    said = [s.objects[0].motion for s in scenes]
    seen, seen_twin = seen_motions(cascade, prompts, cfg), seen_motions(cascade, twins, cfg)
    both_follow = sum(a == m and b == OPPOSITE[m] for m, a, b in zip(said, seen, seen_twin))
    same_way = sum(a == b for a, b in zip(seen, seen_twin))
    return (f"direction probe, {len(scenes)} caption pairs differing only in the direction word, same noise: "
            f"both follow their word {both_follow}, both move the same way {same_way}")


@torch.no_grad()
def caption_loss_probe(denoiser: StageDenoiser, text_encoder: TextEncoder, n: int, seed: int) -> list[str]:
    """The base's v-loss on rendered translating clips at several noise levels, with the true caption,
    the caption with the opposite direction word, and the empty caption. A base that uses the word has a
    lower loss with the true caption wherever the noise hides the direction."""
    from dreamix_ray.degrade import frames_to_tensor
    from dreamix_ray.world.render import render

    sc = EMBEDDED_STAGES[0]
    scenes, true, opposite = translating_pairs(n, seed)
    x0 = torch.cat([frames_to_tensor(render(s, sc.frames, sc.height, sc.fps)) for s in scenes])
    captions = {"true": true, "opposite": opposite, "empty": [""] * len(scenes)}
    scheduler, gen, lines = make_scheduler(), torch.Generator().manual_seed(seed), []
    for t in (999, 950, 900, 800, 700, 500, 300):
        noise = torch.randn(x0.shape, generator=gen)
        t_b = torch.full((len(scenes),), t)
        x_t, target = scheduler.add_noise(x0, noise, t_b), scheduler.get_velocity(x0, noise, t_b)
        losses = {k: float(((denoiser(x_t, t_b, *text_encoder(c)) - target) ** 2).mean()) for k, c in captions.items()}
        lines.append(f"t={t}: v-loss " + ", ".join(f"{k} caption {v:.4f}" for k, v in losses.items()))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default="runs/pretrain/base/ema")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--steps", type=int, nargs="+", default=[32], help="sampling step counts to compare")
    p.add_argument("--eta", type=float, nargs="+", default=[0.5], help="DDIM eta values to compare")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", nargs="+", default=["fp32"], help="network precisions to compare (fp32 bf16 fp16)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                   help="classifier-free guidance scales to compare (the unconditional model is the '' prompt)")
    p.add_argument("--motion-guidance", type=float, nargs="+", default=[1.0],
                   help="motion guidance weights to compare (0 = off; motion_guidance.py)")
    p.add_argument("--motion-prior-from", default="dreamix_ray/default_cascade",
                   help="cascade directory whose cascade.json holds the fitted motion prior")
    p.add_argument("--seed", type=int, default=1234, help="which held-out scenes")
    p.add_argument("--direction-probe", action="store_true",
                   help="only test whether the direction word decides the direction (same noise, opposite words)")
    p.add_argument("--caption-loss", action="store_true",
                   help="only print the v-loss per noise level with the true / opposite-direction / empty caption")
    p.add_argument("--checkered-translations", action="store_true",
                   help="only scenes with a checkered background and a translating object")
    p.add_argument("--trained-combos", action="store_true",
                   help="captions of combinations seen in pretraining instead of held-out ones (a diagnostic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    te = TextEncoder("minilm")
    base = Stage(EMBEDDED_STAGES[0], StageDenoiser.from_pretrained(args.weights).eval(), make_scheduler())
    prior = json.loads((Path(args.motion_prior_from) / "cascade.json").read_text()).get("motion_prior")
    config = dataclasses.replace(embedded_config(te.spec()), motion_prior=prior)
    cascade = Cascade(config, te, [base])
    if args.caption_loss:
        print(f"{args.weights}, {args.n} held-out translating clips:")
        print("\n".join(caption_loss_probe(base.denoiser, te, args.n, args.seed)), flush=True)
        return 0
    if args.direction_probe:
        cfg = EditConfig(strength=1.0, steps=(args.steps[0],), guidance_scale=args.guidance[0], eta=args.eta[0],
                         motion_guidance=args.motion_guidance[0])
        print(args.weights, direction_probe(cascade, args.n, args.seed, cfg), flush=True)
        return 0
    scenes = held_out_scenes(args.n * (8 if args.checkered_translations else 1), args.seed,
                             held=not args.trained_combos)
    if args.checkered_translations:  # where motion guidance could drag the texture along with the object
        scenes = [s for s in scenes if s.texture == "checkered" and s.objects[0].motion in OPPOSITE][:args.n]
    prompts = [canonical_caption(s) for s in scenes]
    sc = base.config
    x0 = torch.zeros(len(scenes), 3, sc.frames, sc.height, sc.width)
    settings = [(g, n, e, m, pr) for g in args.guidance for n in args.steps for e in args.eta
                for m in args.motion_guidance for pr in args.precision]
    for scale, steps, eta, motion, precision in settings:
        cfg = EditConfig(strength=1.0, steps=(steps,), guidance_scale=scale, eta=eta, motion_guidance=motion,
                         precision=precision)
        out = tensor_to_frames(run_stage(StageRun.of(cascade, cfg, prompts, list(range(len(scenes)))), 0, x0))
        totals, by_motion, confusion = Counter(), defaultdict(Counter), defaultdict(Counter)
        for scene, frames in zip(scenes, out):
            est = analyze(frames)
            res = compare(scene, est)
            totals.update({k: int(v) for k, v in res.items()})
            totals["texture"] += int(est.texture == scene.texture)
            by_motion[scene.objects[0].motion].update(ok=int(res["motion"]), n=1)
            if not res["motion"]:  # what the analyzer saw instead (no object found counts as "none")
                confusion[scene.objects[0].motion][est.objects[0].motion if est.objects else "none"] += 1
        print(f"{args.weights} guidance {scale:g} steps {steps} eta {eta:g} motion guidance {motion:g} {precision}: "
              f"n={len(scenes)} "
              + " ".join(f"{k}={v / len(scenes):.0%}" for k, v in totals.items()))
        print("  motion by direction: " + " ".join(f"{m}={c['ok']}/{c['n']}" for m, c in sorted(by_motion.items())),
              flush=True)
        print("  missed motions seen as: " + "; ".join(
            f"{m} -> " + ", ".join(f"{k} {v}" for k, v in c.most_common()) for m, c in sorted(confusion.items())),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
