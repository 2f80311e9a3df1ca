"""`dreamix demo`: render a shapes-world clip, edit its colour and motion, judge the edit by pixels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .edit import edit
from .evaluate import LAYOUT_BAR, layout_kept
from .models.cascade import load_cascade
from .request import EditRequest, resolve
from .video import Video, write_preview, write_video
from .world.analyze import analyze
from .world.captions import canonical_caption, parse_caption
from .world.render import render
from .world.scene import sample_scene

VERDICT_ATTRIBUTES = ("background", "colour", "shape", "motion")


def demo_scene(seed: int):
    return sample_scene(np.random.default_rng(seed), colour="red", shape="circle", motion="right",
                        background="white", texture="plain", style="solid", size="large")


def verdict(frames: np.ndarray, prompt: str) -> dict[str, tuple[str, str | None]]:
    """(wanted, found) per attribute the prompt names."""
    want, found = parse_caption(prompt), analyze(frames)
    obj = found.objects[0] if found.objects else None
    got = {"background": found.background}
    got.update({k: getattr(obj, k) if obj else None for k in ("colour", "shape", "motion")})
    return {k: (want.get(k), got.get(k)) for k in VERDICT_ATTRIBUTES if want.get(k)}


def run_demo(args) -> int:
    cascade = load_cascade(args.model)
    last = cascade.stages[-1].config
    scene = demo_scene(args.seed)
    source = Video(render(scene, last.frames, last.height, last.fps), last.fps)
    target = scene.replace_object(0, colour="yellow", motion="left")
    prompt = args.prompt or canonical_caption(target)
    # The default prompt changes the colour and the motion: a motion edit, which moves the input's own object.
    plan = resolve(EditRequest(prompt=prompt, edit_type="motion", strength=args.strength, seed=args.seed),
                   cascade.config)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"source: {canonical_caption(scene)}")
    print(f"prompt: {prompt}  (strength {plan.config.strength:g}, seed {args.seed})")
    start = time.perf_counter()
    edited = edit(source, prompt, plan, cascade, progress=not args.quiet)
    print(f"edited in {time.perf_counter() - start:.1f} s")
    write_video(out_dir / "original.mp4", source)
    write_video(out_dir / "edit.mp4", edited)
    mp4, png = write_preview(source, edited, out_dir / "side_by_side.mp4", prompt=prompt)
    print(f"wrote {out_dir / 'original.mp4'}, {out_dir / 'edit.mp4'}, {mp4} and {png}")
    print("analyzer verdict (wanted -> found in the edit's pixels):")
    checks = verdict(edited.frames, prompt)
    for name, (want, got) in checks.items():
        print(f"  {name:<11} {want!s:<8} -> {got!s:<8} {'ok' if want == got else 'MISSED'}")
    hits = sum(w == g for w, g in checks.values())
    print(f"{hits}/{len(checks)} attributes of the prompt found")
    # What Dreamix is for: the edit keeps what the prompt does not change. The ideal edit starts where the
    # source's object starts, with its size and shape, and moves the new way (as `dreamix eval` scores it).
    found = analyze(edited.frames).objects
    ideal = render(target, last.frames, last.height, last.fps)
    kept = bool(found) and layout_kept(found[0].centroids, ideal)
    print(f"  {'layout':<11} {'kept':<8} -> {'kept' if kept else 'moved':<8} {'ok' if kept else 'MISSED'}"
          f"  (the object's track within {LAYOUT_BAR:g} frame widths of the ideal edit's)")
    return 0


