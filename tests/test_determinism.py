"""Same inputs and seed, same output bytes: through the encoder, the CLI in fresh processes and a batch rerun.

The nondeterminism issue 22 found was in the encoder, not the model: the uint8 frames of four CLI runs
were identical, their mp4s were not. x264's AVX-512 macroblock-tree kernel read memory it never wrote
(dreamix_ray/video.py, _x264_params), so the bytes depended on what the process had allocated before.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, sample_clip

from dreamix_ray.video import read_video, side_by_side, write_video

PROMPT = "a shiny silver robotic wolf"


def _dirty_heap(rng: np.random.Generator, blocks: int = 3000) -> None:
    """Leave random bytes in freed heap chunks, as a process that has decoded and sampled before writing
    does: memory a library reads without writing it first then holds garbage, not fresh zero pages."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    pointers = []
    for size in np.exp(rng.uniform(np.log(16), np.log(1 << 16), blocks)).astype(int).tolist():
        p = libc.malloc(size)
        ctypes.memmove(p, rng.bytes(size), size)
        pointers.append(p)
    for p in pointers:
        libc.free(p)


@pytest.fixture(scope="module")
def edited():
    """The CLI test's edit, made here: the embedded cascade's 64x64 output (not a multiple of 128 px wide,
    where x264's AVX-512 kernel over-read). Its blobs trigger the over-read in most encodes; the wolf clip
    itself resized to 64x64, flat shapes-world clips or pure noise hardly ever do."""
    from dreamix_ray.config import EditConfig
    from dreamix_ray.edit import edit
    from dreamix_ray.models.cascade import load_cascade

    return edit(read_video(sample_clip("wolf.mp4")), PROMPT, EditConfig(strength=0.7, seed=3, steps=(2, 2, 2)),
                load_cascade())


def test_encoded_bytes_depend_on_the_frames_alone(edited, tmp_path):
    """Before the fix, 6 of 6 encodes of these frames after _dirty_heap were different files."""
    preview = side_by_side(edited, edited)  # 136 px wide: the preview mp4 goes through the same writer
    rng = np.random.default_rng(0)
    for name, video in (("edit", edited), ("preview", preview)):
        outputs = set()
        for i in range(6):
            _dirty_heap(rng)
            outputs.add(write_video(tmp_path / f"{name}{i}.mp4", video).read_bytes())
        assert len(outputs) == 1, f"{name}: {len(outputs)} different mp4s from the same frames"
        assert read_video(tmp_path / f"{name}0.mp4").frames.shape == video.frames.shape


def _cli_edit(out_dir: Path) -> subprocess.Popen:
    """`dreamix edit` as the issue ran it, with the embedded cascade (2 steps a stage: the encoder, not the
    sampler, was the cause, and a full edit would cost 10 s more per process)."""
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "dreamix_ray.cli", "edit", str(sample_clip("wolf.mp4")), "-p", PROMPT,
           "--strength", "0.7", "--seed", "3", "--steps", "2", "2", "2", "--quiet",
           "-o", str(out_dir / "out.mp4"), "--preview", str(out_dir / "preview.mp4")]
    env = dict(os.environ, PYTHONHASHSEED="random")  # fresh processes differ in everything a user's would
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_cli_processes_write_the_same_bytes(tmp_path):
    """Before the fix, four such runs gave four different out.mp4 (the frames before encoding were equal)."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    procs = [_cli_edit(d) for d in dirs]  # at the same time: thread scheduling differs between them too
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    for name in ("out.mp4", "preview.mp4", "preview.png"):
        a, b = ((d / name).read_bytes() for d in dirs)
        assert a == b, f"{name} differs between two runs of the same command"


def test_a_batch_rerun_of_a_row_writes_the_same_bytes(tmp_path):
    """The batch pipeline's own stages (decode ... encode, no Ray) on one row, run, then run again into a
    fresh prefix as a rerun after a lost output does: the same mp4 and preview bytes."""
    from dreamix_ray.cluster.pipeline import pipeline_steps, run_in_process
    from dreamix_ray.cluster.io_steps import cascade_config
    from dreamix_ray.manifest import read_manifest, work_items
    from dreamix_ray.request import EditRequest

    row = {"id": "wolf", "video": str(sample_clip("wolf.mp4")), "prompt": PROMPT, "seed": 3, "strength": 0.7}
    (tmp_path / "m.jsonl").write_text(json.dumps(row))
    config = cascade_config(None)  # the embedded cascade: 64x64 output, where the encoder went wrong
    job = EditRequest(prompt="", steps=(2, 2, 2))
    runs = []
    for run in ("first", "rerun"):
        items = work_items(read_manifest(str(tmp_path / "m.jsonl")), str(tmp_path / run), job, "embedded",
                           config)
        done = run_in_process(items, pipeline_steps(config, None, None, None, False))
        assert [r["status"] for r in done] == ["ok"], done
        runs.append([Path(done[0][k]).read_bytes() for k in ("output", "preview")])
    assert runs[0] == runs[1]
