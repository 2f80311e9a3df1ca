"""`dreamix edit` of this checkout against an earlier release's, side by side in one run (issue 24, item 1).

    git worktree add /tmp/rel 3e8940c && python -m venv /tmp/rel/.venv
    /tmp/rel/.venv/bin/pip install torch==2.13.0 && /tmp/rel/.venv/bin/pip install -e /tmp/rel
    python jobs/bench_vs_release.py --release /tmp/rel [--repeats 3] [--threads 1] [--variant fp32 --variant bf16]

Each round runs the release's `dreamix edit` and this checkout's (once per variant: extra flags such as
`--precision bf16`) on the same clip, prompt and seed, in an order that rotates every round, so a noisy
shared machine slows all of them alike. Reports each run's wall time (the whole command, as a user waits
for it), the median of the per-round ratios release / variant, and how far each variant's output is from the
release's (PSNR of the decoded frames; inf = the same pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.video import read_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "tests" / "data" / "car-turn.mp4"
PROMPT = "a red circle moving left on a blue background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run(dreamix: Path, out: Path, flags: list[str], env: dict) -> float:
    cmd = [str(dreamix), "edit", str(CLIP), "-p", PROMPT, "-o", str(out), "--seed", "0", "--quiet", *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", type=Path, required=True, help="the release's checkout, with its own .venv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's)")
    p.add_argument("--variant", action="append", default=None,
                   help="flags of this checkout's edit, quoted as one string (repeatable; default: '' and "
                        "'--precision bf16')")
    args = p.parse_args()
    variants = args.variant if args.variant is not None else ["--precision fp32", "--precision bf16"]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    runners = [("release", args.release / ".venv" / "bin" / "dreamix", [])]
    runners += [(f"this {v}".strip(), REPO / ".venv" / "bin" / "dreamix", v.split()) for v in variants]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in runners}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / f"{i}.mp4" for i, (name, _, _) in enumerate(runners)}
        for r in range(args.repeats):
            order = runners[r % len(runners):] + runners[:r % len(runners)]
            for name, exe, flags in order:
                walls[name].append(run(exe, outs[name], flags, env))
                print(f"round {r}: {name}: {walls[name][-1]:.1f} s", file=sys.stderr, flush=True)
        frames = {name: read_video(str(path)).frames for name, path in outs.items()}
    release = walls["release"]
    results = {"clip": CLIP.name, "prompt": PROMPT, "threads": args.threads or "torch default",
               "load_average_end": round(os.getloadavg()[0], 1), "runs": {}}
    for name, _, _ in runners:
        ratios = [a / b for a, b in zip(release, walls[name])]
        results["runs"][name] = {"median_s": round(statistics.median(walls[name]), 1),
                                 "walls_s": [round(w, 1) for w in walls[name]],
                                 "speedup_vs_release_median": round(statistics.median(ratios), 2),
                                 "psnr_vs_release_db": round(psnr(frames[name], frames["release"]), 1)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
