"""Automatic evaluation on the shapes world, reproducing the paper's Tables 1 and 2 (Sec. 6, App. B).

People scored quality, fidelity and alignment; here the pixel analyzer does. Each score is in
[0, 1] and passes at a fixed bar; an edit succeeds when all three pass (the paper: mean > 2 on all).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import EditConfig
from .edit import edit, generate
from .finetune import finetune, finetune_preset, finetuned_prompt
from .models.frame_mode import frame_mode
from .video import Video, contact_sheet
from .world.analyze import analyze, object_found_fraction, trajectory_smoothness
from .world.captions import canonical_caption
from .world.render import render
from .world.scene import BACKGROUND_COLOURS, COLOURS, MOTIONS, SHAPES, STYLES, sample_scene

EDIT_TYPES = ("motion", "style", "object", "background")
METHODS = ("text-to-video", "per-frame", "dreamix", "dreamix+video-ft", "dreamix+mixed-ft")
DREAMIX_VARIANTS = METHODS[2:]
CHECKED = ("background", "colour", "shape", "style", "motion")
EDITED_ATTRIBUTE = {"motion": "motion", "style": "style", "object": "shape", "background": "background"}
SMOOTH_BAR = 0.05  # mean |second difference| of the centroid, in frame widths
FOUND_BAR = 0.9
FLICKER_BAR = 6.0  # median |frame-to-frame change| of a pixel (uint8 levels); a still background is ~0


@dataclass(frozen=True)
class EvalSettings:
    """Strengths and finetuning recipes used for the tables (chosen on tuning videos, not these)."""

    strength: float = 0.8
    strength_finetuned: float = 0.9
    finetune_steps: int = 60
    finetune_lr: float | None = None  # None: the cascade's finetune_lr
    finetune_stages: tuple[str, ...] = ("base",)
    steps: tuple[int, ...] = ()  # per-stage sampling steps; empty = the cascade's


@dataclass
class Case:
    source: object  # Scene
    target: object
    edit_type: str
    prompt: str
    seed: int


@dataclass
class Scores:
    alignment: float
    fidelity: float
    quality: float
    psnr: float
    ssim: float
    passed: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(self.passed.values())


def eval_sources(n: int, seed: int = 2024, held: bool = True):
    """Source scenes, single plain object: held-out combinations (never seen in pretraining) for the
    tables, or training combinations (held=False) for tuning the finetuning presets."""
    from .pretrain import held_out

    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        s = sample_scene(rng, n_objects=1, texture="plain", style="solid", size="large",
                         motion=str(rng.choice(["left", "right", "up", "down"])))
        if held_out(s) == held:
            scenes.append(s)
    return scenes


def edit_target(scene, edit_type: str, rng: np.random.Generator):
    """The source with one attribute changed, per the paper's edit categories."""
    obj = scene.objects[0]
    if edit_type == "motion":
        return scene.replace_object(0, motion=str(rng.choice([m for m in MOTIONS[:4] if m != obj.motion])))
    if edit_type == "style":
        return scene.replace_object(0, style=str(rng.choice([s for s in STYLES if s != obj.style])))
    if edit_type == "object":
        return scene.replace_object(0, shape=str(rng.choice([s for s in SHAPES if s != obj.shape])))
    options = [b for b in BACKGROUND_COLOURS if b not in (scene.background, obj.colour)]
    return scene.replace(background=str(rng.choice(options)))


def eval_cases(n_sources: int, held: bool = True) -> list[Case]:
    rng, cases = np.random.default_rng(7), []
    for i, source in enumerate(eval_sources(n_sources, held=held)):
        for edit_type in EDIT_TYPES:
            target = edit_target(source, edit_type, rng)
            cases.append(Case(source, target, edit_type, canonical_caption(target), seed=100 + i))
    return cases


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM map of two [N,1,H,W] images in [0,1] (Gaussian window 7, sigma 1.5)."""
    g = torch.exp(-(torch.arange(7) - 3.0) ** 2 / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 7, 7)
    mu_a, mu_b = F.conv2d(a, w, padding=3), F.conv2d(b, w, padding=3)
    var_a = F.conv2d(a * a, w, padding=3) - mu_a**2
    var_b = F.conv2d(b * b, w, padding=3) - mu_b**2
    cov = F.conv2d(a * b, w, padding=3) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def unedited_region_fidelity(source: np.ndarray, edited: np.ndarray, target: np.ndarray, case: Case):
    """PSNR and SSIM over pixels the edit should leave alone (the background, or the object for
    background edits), located from the source and target renders."""
    def fg(frames, background):
        return np.abs(frames.astype(int) - np.array(COLOURS[background])).sum(-1) > 60

    obj = fg(source, case.source.background) | fg(target, case.target.background)
    mask = obj if case.edit_type == "background" else ~obj
    if mask.sum() == 0:
        return float("nan"), float("nan")
    diff = (source.astype(np.float64) - edited.astype(np.float64))[mask]
    psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-10))
    gray = lambda v: torch.from_numpy(v.mean(-1, keepdims=True) / 255.0).float().permute(0, 3, 1, 2)  # noqa
    ssim_map = _ssim(gray(source), gray(edited))[:, 0].numpy()
    return float(psnr), float(ssim_map[mask].mean())


def score(case: Case, source: np.ndarray, edited: np.ndarray, target: np.ndarray) -> Scores:
    """Alignment (the edited attribute is there), fidelity (the rest kept), quality (a clean track)."""
    est = analyze(edited)
    obj = est.objects[0] if est.objects else None
    found = {"background": est.background}
    found.update({k: getattr(obj, k) if obj else None for k in CHECKED[1:]})
    edited_attr = EDITED_ATTRIBUTE[case.edit_type]
    want_target = case.target if edited_attr == "background" else case.target.objects[0]
    alignment = float(found[edited_attr] == getattr(want_target, edited_attr))
    kept = [a for a in CHECKED if a != edited_attr]
    src = {"background": case.source.background, **{a: getattr(case.source.objects[0], a) for a in CHECKED[1:]}}
    fidelity = float(np.mean([found[a] == src[a] for a in kept]))
    smooth = trajectory_smoothness(edited)
    found_frac = object_found_fraction(edited)
    flicker = float(np.median(np.abs(np.diff(edited.astype(np.int16), axis=0)))) if len(edited) > 1 else 0.0
    quality = float(np.mean([found_frac >= FOUND_BAR, np.isfinite(smooth) and smooth <= SMOOTH_BAR,
                             flicker <= FLICKER_BAR]))
    psnr, ssim = unedited_region_fidelity(source, edited, target, case)
    passed = {"alignment": alignment == 1.0, "fidelity": fidelity >= (len(kept) - 1) / len(kept),
              "quality": quality == 1.0}
    return Scores(alignment, fidelity, quality, psnr, ssim, passed)


def _render(scene, cascade) -> Video:
    last = cascade.stages[-1].config
    return Video(render(scene, last.frames, last.height, last.fps), last.fps)


def run_method(method: str, case: Case, cascade, tuned: dict, s: EvalSettings) -> Video:
    """One method's output for one case; `tuned` maps variant -> (cascade, FinetuneConfig) per source."""
    source = _render(case.source, cascade)
    cfg = EditConfig(strength=s.strength, seed=case.seed, steps=s.steps)
    if method == "text-to-video":
        return generate(case.prompt, cfg, cascade)
    if method == "per-frame":  # an image editor run frame by frame: every stage in frame mode
        with frame_mode():
            return edit(source, case.prompt, cfg, cascade)
    if method == "dreamix":
        return edit(source, case.prompt, cfg, cascade)
    model, ft_cfg = tuned[method]
    ft = EditConfig(strength=s.strength_finetuned, seed=case.seed, steps=s.steps)
    return edit(source, finetuned_prompt(case.prompt, ft_cfg), ft, model)


def run_eval(cascade, quick: bool = False, settings: EvalSettings = EvalSettings(), progress: bool = True,
             sheets_dir: Path | None = None):
    """Every method on every case; returns {method: [(case, Scores)]}."""
    from tqdm.auto import tqdm

    cases = eval_cases(1 if quick else 4)
    results: dict[str, list] = defaultdict(list)
    by_source = defaultdict(list)
    for case in cases:
        by_source[id(case.source)].append(case)
    bar = tqdm(total=len(cases) * len(METHODS), desc="eval", disable=not progress, unit="edit")
    for group in by_source.values():
        source_video = _render(group[0].source, cascade)
        tuned = {}
        for variant, preset in (("dreamix+video-ft", "video"), ("dreamix+mixed-ft", "mixed")):
            ft_cfg = finetune_preset(preset, steps=settings.finetune_steps, lr=settings.finetune_lr,
                                     stages=settings.finetune_stages, seed=group[0].seed)
            tuned[variant] = (finetune(source_video, ft_cfg, cascade), ft_cfg)
        for case in group:
            target = _render(case.target, cascade).frames
            for method in METHODS:
                out = run_method(method, case, cascade, tuned, settings)
                results[method].append((case, score(case, source_video.frames, out.frames, target)))
                if sheets_dir is not None and len(results[method]) <= len(EDIT_TYPES):
                    sheets_dir.mkdir(parents=True, exist_ok=True)
                    contact_sheet(source_video, out, sheets_dir / f"{method}-{case.edit_type}.png")
                bar.update()
    bar.close()
    return dict(results)


def tables(results) -> tuple[str, str, float]:
    """Markdown for Table 1 (success by edit type and variant) and Table 2 (scores by method)."""
    t1 = ["| edit type | edits | " + " | ".join(METHODS) + " | best Dreamix variant |",
          "|---" * (len(METHODS) + 3) + "|"]
    best_hits, total = 0, 0
    for et in EDIT_TYPES:
        rates = {m: [s.success for c, s in results[m] if c.edit_type == et] for m in METHODS}
        n = len(rates[METHODS[0]])
        best = max(DREAMIX_VARIANTS, key=lambda m: np.mean(rates[m]))
        best_hits += sum(rates[best])
        total += n
        t1.append(f"| {et} | {n} | " + " | ".join(f"{np.mean(rates[m]):.0%}" for m in METHODS)
                  + f" | {best} |")
    t2 = ["| method | quality | fidelity | alignment | success | PSNR unedited (dB) | SSIM unedited |",
          "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rows = [s for _, s in results[m]]
        t2.append(f"| {m} | {np.mean([s.quality for s in rows]):.2f} | {np.mean([s.fidelity for s in rows]):.2f}"
                  f" | {np.mean([s.alignment for s in rows]):.2f} | {np.mean([s.success for s in rows]):.0%}"
                  f" | {np.nanmean([s.psnr for s in rows]):.1f} | {np.nanmean([s.ssim for s in rows]):.3f} |")
    return "\n".join(t1), "\n".join(t2), best_hits / max(total, 1)


def run_eval_cli(args) -> int:
    from .models.cascade import load_cascade

    cascade = load_cascade(args.model)
    out = Path(args.output)
    sheets = out.parent / (out.stem.lower() + "_sheets")
    start = time.perf_counter()
    results = run_eval(cascade, quick=args.quick, progress=not args.quiet, sheets_dir=sheets)
    minutes = (time.perf_counter() - start) / 60
    t1, t2, best = tables(results)
    command = "dreamix eval" + (" --quick" if args.quick else "") + (f" --model {args.model}" if args.model else "")
    sheet_lines = "\n".join(f"- {m}: " + ", ".join(f"[{et}]({sheets.name}/{m}-{et}.png)" for et in EDIT_TYPES)
                            for m in METHODS)
    out.write_text(EVAL_TEMPLATE.format(command=command, minutes=minutes, cascade=cascade.config.name, t1=t1,
                                        t2=t2, best=best, sheets=sheet_lines, n=len(results[METHODS[0]])))
    print(t1, t2, f"Dreamix, best variant per edit type: {best:.0%} success", f"wrote {out}", sep="\n\n")
    return 0


EVAL_TEMPLATE = """# Evaluation on the shapes world (paper Tables 1 and 2, scored automatically)

Produced by `{command}` in {minutes:.1f} minutes on the cascade `{cascade}`; {n} edits per method.
Source videos are held-out combinations of colour, shape, motion and background (never seen in
pretraining); each gets one edit per type: motion (new direction), style (solid -> striped /
outlined), object (new shape) and background (new colour).

Scores come from the pixel analyzer (dreamix_ray/world/analyze.py), in [0, 1]:
- alignment: the edited attribute has the prompt's value;
- fidelity: the other attributes (background, colour, shape, style, motion) keep the source's
  values; passes with at most one changed. PSNR / SSIM are over the region the edit should keep
  (the background, or the object for background edits), against the source;
- quality: the object is found in >= 90% of frames, its track is smooth, and the median pixel
  does not flicker between frames (temporal consistency);
- success: all three pass (the paper: mean score > 2 on all three).

## Table 1: success by edit type and variant

{t1}

## Table 2: scores by method

{t2}

Dreamix with the best variant per edit type: **{best:.0%}** success.

## Examples (source row above, edit row below)

{sheets}
"""
