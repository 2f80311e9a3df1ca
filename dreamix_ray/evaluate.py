"""Automatic evaluation on the shapes world, reproducing the paper's Tables 1 and 2 (Sec. 6, App. B).

People scored quality, fidelity and alignment; here the pixel analyzer does. Each score is in
[0, 1] and passes at a fixed bar; an edit succeeds when all three pass (the paper: mean > 2 on all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import EDIT_TYPES
from .degrade import downsample_to_stage
from .errors import UserError
from .edit import StageRun, blank_input, run_cascade
from .finetune import finetune, finetune_preset, finetuned_prompt
from .models.cascade import load_cascade
from .models.frame_mode import frame_mode
from .pretrain import held_out
from .request import EditPlan, EditRequest, resolve
from .video import Video, contact_sheet
from .world.analyze import analyze, object_found_fraction, trajectory_smoothness
from .world.captions import canonical_caption
from .world.render import render
from .world.scene import BACKGROUND_COLOURS, COLOURS, MOTIONS, OBJECT_COLOURS, SHAPES, STYLES, sample_scene

METHODS = ("text-to-video", "per-frame", "dreamix", "dreamix+video-ft", "dreamix+mixed-ft")
DREAMIX_VARIANTS = METHODS[2:]
VARIANT_PRESET = {"dreamix": "none", "dreamix+video-ft": "video", "dreamix+mixed-ft": "mixed"}
PRESET_VARIANT = {preset: variant for variant, preset in VARIANT_PRESET.items()}
CHECKED = ("background", "colour", "shape", "style", "motion")
EDITED_ATTRIBUTE = {"motion": "motion", "style": "style", "object": "shape", "background": "background",
                    "colour": "colour"}
SMOOTH_BAR = 0.05  # mean |second difference| of the centroid, in frame widths
FOUND_BAR = 0.9
LAYOUT_BAR = 0.1  # mean centroid distance to the ideal edit's track, in frame widths
EVAL_SOURCES = 12  # held-out source videos, one edit of each type per source: 12 per type (issue 21)
FLICKER_BAR = 6.0  # median |frame-to-frame change| of a pixel (uint8 levels); a still background is ~0


@dataclass(frozen=True)
class EvalSettings:
    """Strengths and finetuning recipes used for the tables (chosen on tuning videos, not these)."""

    # {"none" | "video" | "mixed": {edit type: s}}; None = the cascade's `edit_strengths` (a tuner's candidates
    # go here; strengths no table gives follow request.resolve's rule, as for every entry point)
    edit_strengths: dict | None = None
    finetune_steps: int = 60
    finetune_lr: float | None = None  # None: the cascade's finetune_lr
    finetune_stages: tuple[str, ...] = ("base",)
    steps: tuple[int, ...] = ()  # per-stage sampling steps; empty = the cascade's
    # motion edits move the source's middle frame at high noise (EditConfig.motion_from_input)
    motion_from_input: bool = True
    precision: str | None = None  # the networks' arithmetic (config.PRECISIONS); None = request.DEFAULT_PRECISION

    def plan_for(self, method: str, edit_type: str, cascade) -> EditPlan:
        """The case's plan under the one rule (request.resolve); per-frame uses Dreamix's no-finetuning
        strengths, so it differs only in frame mode."""
        config = cascade.config if self.edit_strengths is None else dataclasses.replace(
            cascade.config, edit_strengths=self.edit_strengths)
        preset = VARIANT_PRESET.get(method, "none")
        request = EditRequest(prompt="", task="generate" if method == "text-to-video" else "edit",
                              edit_type=edit_type, finetune=None if preset == "none" else preset, steps=self.steps,
                              precision=self.precision,
                              motion_from_input=None if self.motion_from_input else False)  # False: the ablation
        return resolve(request, config)

    def planned_strength(self, method: str, edit_type: str, cascade) -> float:
        """The strength `plan_for` resolves (request.resolve; no table lookup of its own)."""
        return self.plan_for(method, edit_type, cascade).config.strength


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
    layout: bool  # the object's track follows the ideal edit's (where it is, not only what it is)
    passed: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(self.passed.values())


def eval_sources(n: int, seed: int = 2024, held: bool = True):
    """Source scenes, single plain object: held-out combinations (never seen in pretraining) for the
    tables, or training combinations (held=False) for tuning the finetuning presets."""
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
    if edit_type == "colour":
        options = [c for c in OBJECT_COLOURS if c not in (obj.colour, scene.background)]
        return scene.replace_object(0, colour=str(rng.choice(options)))
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

    def dilate(mask):  # one pixel: anti-aliased edges mix object and background, so neither side keeps them
        t = torch.from_numpy(mask).float()[:, None]
        return F.max_pool2d(t, 3, stride=1, padding=1)[:, 0].numpy() > 0

    src_obj, tgt_obj = fg(source, case.source.background), fg(target, case.target.background)
    if case.edit_type == "background":
        mask = ~dilate(~(src_obj & tgt_obj))  # the object's interior, in both videos
    else:
        mask = ~dilate(src_obj | tgt_obj)
    if mask.sum() == 0:
        return float("nan"), float("nan")
    diff = (source.astype(np.float64) - edited.astype(np.float64))[mask]
    psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-10))
    gray = lambda v: torch.from_numpy(v.mean(-1, keepdims=True) / 255.0).float().permute(0, 3, 1, 2)  # noqa
    ssim_map = _ssim(gray(source), gray(edited))[:, 0].numpy()
    return float(psnr), float(ssim_map[mask].mean())


def layout_kept(centroids: np.ndarray, target: np.ndarray) -> bool:
    """Mean distance of the edited object's centroid track to the ideal edit's (the target render:
    the source's start, the target's motion) within LAYOUT_BAR frame widths."""
    ideal = analyze(target).objects
    if not ideal or len(ideal[0].centroids) != len(centroids):
        return False
    dist = np.linalg.norm(centroids - ideal[0].centroids, axis=-1)
    return bool(np.isfinite(dist).any() and np.nanmean(dist) <= LAYOUT_BAR)


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
    # Fidelity is "preserves the original" (paper Sec. 6): every kept attribute and the layout. With
    # captions that name every attribute, text-to-video could keep all attributes without the video.
    layout = obj is not None and layout_kept(obj.centroids, target)
    facets = [found[a] == src[a] for a in kept] + [layout]
    fidelity = float(np.mean(facets))
    smooth = trajectory_smoothness(edited)
    found_frac = object_found_fraction(edited)
    flicker = float(np.median(np.abs(np.diff(edited.astype(np.int16), axis=0)))) if len(edited) > 1 else 0.0
    quality = float(np.mean([found_frac >= FOUND_BAR, np.isfinite(smooth) and smooth <= SMOOTH_BAR,
                             flicker <= FLICKER_BAR]))
    psnr, ssim = unedited_region_fidelity(source, edited, target, case)
    passed = {"alignment": alignment == 1.0, "fidelity": fidelity >= (len(facets) - 1) / len(facets),
              "quality": quality == 1.0}
    return Scores(alignment, fidelity, quality, psnr, ssim, layout, passed)


def _render(scene, cascade) -> Video:
    last = cascade.stages[-1].config
    return Video(render(scene, last.frames, last.height, last.fps), last.fps)


def _run_rows(model, sources: list[Video] | None, prompts: list[str], seeds: list[int],
              plan: EditPlan) -> list[np.ndarray]:
    """One batch through the cascade (no sources = text-to-video); rows are independent (per-row seeds)."""
    if sources is None:
        x0 = blank_input(plan, model, len(prompts))
    else:
        x0 = torch.cat([downsample_to_stage(v, model.base.config) for v in sources])
    return list(run_cascade(StageRun.of(model, plan, prompts, seeds), x0))


def run_method(method: str, cases: list[Case], source: Video, cascade, tuned: dict,
               s: EvalSettings) -> list[np.ndarray]:
    """One method's outputs for cases of one source (`source`, rendered once by the caller), batched by
    plan; `tuned` maps variant -> (finetuned cascade, FinetuneConfig) for that source."""
    model, prompts = cascade, [c.prompt for c in cases]
    if method in tuned:
        model, ft_cfg = tuned[method]
        prompts = [finetuned_prompt(p, ft_cfg) for p in prompts]
    outputs: list = [None] * len(cases)
    batches = defaultdict(list)
    for i, case in enumerate(cases):
        batches[s.plan_for(method, case.edit_type, cascade)].append(i)
    for plan, rows in batches.items():
        sources = None if method == "text-to-video" else [source] * len(rows)
        # per-frame: an image editor run frame by frame, every stage in frame mode
        with frame_mode() if method == "per-frame" else contextlib.nullcontext():
            outs = _run_rows(model, sources, [prompts[i] for i in rows], [cases[i].seed for i in rows], plan)
        for i, out in zip(rows, outs):
            outputs[i] = out
    return outputs


def finetune_variants(source_video: Video, cascade, s: EvalSettings, seed: int,
                      presets: tuple[str, ...] = ("video", "mixed")) -> dict:
    """The finetuned variants of one source: {variant: (cascade, FinetuneConfig)}."""
    tuned = {}
    for preset in presets:
        variant = PRESET_VARIANT[preset]
        ft_cfg = finetune_preset(preset, steps=s.finetune_steps, lr=s.finetune_lr, stages=s.finetune_stages,
                                 seed=seed)
        tuned[variant] = (finetune(source_video, ft_cfg, cascade), ft_cfg)
    return tuned


def run_eval(cascade, quick: bool = False, settings: EvalSettings = EvalSettings(), progress: bool = True,
             sheets_dir: Path | None = None, n_sources: int | None = None):
    """Every method on every case; returns {method: [(case, Scores)]}."""
    cases = eval_cases(n_sources or (1 if quick else EVAL_SOURCES))
    results: dict[str, list] = defaultdict(list)
    by_source = defaultdict(list)
    for case in cases:
        by_source[id(case.source)].append(case)
    bar = tqdm(total=len(cases) * len(METHODS), desc="eval", disable=not progress, unit="edit")
    for group in by_source.values():
        source_video = _render(group[0].source, cascade)
        tuned = finetune_variants(source_video, cascade, settings, group[0].seed)
        targets = [_render(case.target, cascade).frames for case in group]
        for method in METHODS:
            outs = run_method(method, group, source_video, cascade, tuned, settings)
            for case, out, target in zip(group, outs, targets):
                results[method].append((case, score(case, source_video.frames, out, target)))
                if sheets_dir is not None and len(results[method]) <= len(EDIT_TYPES):
                    sheets_dir.mkdir(parents=True, exist_ok=True)
                    sheet = sheets_dir / f"{method}-{case.edit_type}.png"
                    contact_sheet(source_video, Video(out, source_video.fps), sheet, prompt=case.prompt)
            bar.update(len(group))
    bar.close()
    return dict(results)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% at z=1.96): unlike hits/n +- z*se it stays in
    [0, 1] and is honest at 0/n and n/n, which small tables hit often."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes) -> str:
    """A success rate with its Wilson 95% interval: "71% (57-82)"."""
    hits, n = int(sum(successes)), len(successes)
    lo, hi = wilson_interval(hits, n)
    return f"{hits / max(n, 1):.0%} ({lo * 100:.0f}-{hi * 100:.0f})"


def tables(results) -> tuple[str, str, list[bool]]:
    """Markdown for Table 1 (success by edit type and variant) and Table 2 (scores by method), and the
    successes of Dreamix with its best variant per edit type."""
    t1 = ["| edit type | edits | " + " | ".join(METHODS) + " | best Dreamix variant |",
          "|---" * (len(METHODS) + 3) + "|"]
    best_successes: list[bool] = []
    for et in EDIT_TYPES:
        rates = {m: [s.success for c, s in results[m] if c.edit_type == et] for m in METHODS}
        n = len(rates[METHODS[0]])
        best = max(DREAMIX_VARIANTS, key=lambda m: np.mean(rates[m]))
        best_successes += rates[best]
        t1.append(f"| {et} | {n} | " + " | ".join(rate(rates[m]) for m in METHODS)
                  + f" | {best} |")
    t2 = ["| method | quality | fidelity | alignment | success | layout kept | PSNR unedited (dB) | SSIM unedited |",
          "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rows = [s for _, s in results[m]]
        t2.append(f"| {m} | {np.mean([s.quality for s in rows]):.2f} | {np.mean([s.fidelity for s in rows]):.2f}"
                  f" | {np.mean([s.alignment for s in rows]):.2f} | {rate([s.success for s in rows])}"
                  f" | {np.mean([s.layout for s in rows]):.0%}"
                  f" | {np.nanmean([s.psnr for s in rows]):.1f} | {np.nanmean([s.ssim for s in rows]):.3f} |")
    return "\n".join(t1), "\n".join(t2), best_successes


def run_eval_cli(args) -> int:
    cascade = load_cascade(args.model)
    out = Path(args.output)
    sheets = out.parent / (out.stem.lower() + "_sheets")
    start = time.perf_counter()
    if args.sources is not None and args.sources < 1:
        raise UserError(f"--sources must be >= 1, got {args.sources}")
    settings = EvalSettings(precision=getattr(args, "precision", None))
    results = run_eval(cascade, quick=args.quick, settings=settings, progress=not args.quiet, sheets_dir=sheets,
                       n_sources=args.sources)
    minutes = (time.perf_counter() - start) / 60
    t1, t2, best = tables(results)
    command = " ".join(["dreamix eval"] + (["--quick"] if args.quick else [])
                       + ([f"--sources {args.sources}"] if args.sources else [])
                       + ([f"--model {args.model}"] if args.model else [])
                       + ([f"--precision {settings.precision}"] if settings.precision else []))
    sheet_lines = "\n".join(f"- {m}: " + ", ".join(f"[{et}]({sheets.name}/{m}-{et}.png)" for et in EDIT_TYPES)
                            for m in METHODS)
    strengths = ", ".join(f"{et} {settings.planned_strength('dreamix', et, cascade):g} / "
                          f"{settings.planned_strength('dreamix+mixed-ft', et, cascade):g}" for et in EDIT_TYPES)
    out.write_text(EVAL_TEMPLATE.format(command=command, strengths=strengths, minutes=minutes,
                                        cascade=cascade.config.name, t1=t1, motion_note=MOTION_NOTE
                                        if settings.motion_from_input and cascade.config.motion_prior else "",
                                        t2=t2, best=rate(best), sheets=sheet_lines, n=len(results[METHODS[0]])))
    print(t1, t2, f"Dreamix, best variant per edit type: {rate(best)} success", f"wrote {out}", sep="\n\n")
    return 0


MOTION_NOTE = """ Motion edits (Dreamix and
per-frame) move the source's middle frame the prompt's way at high noise (EditConfig.motion_from_input)."""

EVAL_TEMPLATE = """# Evaluation on the shapes world (paper Tables 1 and 2, scored automatically)

Produced by `{command}` in {minutes:.1f} minutes on the cascade `{cascade}`; {n} edits per method.
Source videos are held-out combinations of colour, shape, motion and background (never seen in
pretraining); each gets one edit per type: motion (new direction), style (solid -> striped /
outlined), object (new shape), background (new colour) and colour (the object's colour only).
Every rate has its Wilson 95% interval in brackets.

Scores come from the pixel analyzer (dreamix_ray/world/analyze.py), in [0, 1]:
- alignment: the edited attribute has the prompt's value;
- fidelity: the other attributes (background, colour, shape, style, motion) keep the source's
  values and the layout is kept (the object's track within 0.1 frame widths of the ideal edit's);
  passes with at most one of these missed. PSNR / SSIM are over the region the edit should keep
  (the background, or the object for background edits), against the source;
- quality: the object is found in >= 90% of frames, its track is smooth, and the median pixel
  does not flicker between frames (temporal consistency);
- success: all three pass (the paper: mean score > 2 on all three).

Strengths (no finetuning / after finetuning) per edit type: {strengths}.{motion_note}
The strengths and the finetuning recipe were chosen on tuning videos (training combinations), never
on these.

## Table 1: success by edit type and variant

{t1}

## Table 2: scores by method

{t2}

Dreamix with the best variant per edit type: **{best}** success (Wilson 95% interval).

## Examples (source row above, edit row below)

{sheets}
"""
