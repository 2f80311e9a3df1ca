"""Shared fixtures: tiny real models (seconds on CPU) and the real sample clips."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# scripts/test.sh runs the suite in pytest-xdist workers that share the machine's cores: each worker, and every
# command its tests start (OMP_NUM_THREADS is inherited), takes its share of threads. Oversubscribed OpenMP
# threads wait at barriers for descheduled ones and slow a forward several times (BENCHMARKS.md, "Faster edits").
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "tests" / "data"


def sample_clip(name: str = "wolf.mp4") -> Path:
    """A real clip shipped under tests/data (SOURCES.md): the same bytes on every machine, so tests that
    check sizes, frame counts or output bytes never depend on where they run, and a fresh clone skips none."""
    path = CLIPS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the test clips ship with the repository (tests/data/make_clips.py)")
    return path


@pytest.fixture(scope="session")
def text_encoder():
    from dreamix_ray.models.text import TextEncoder

    return TextEncoder("minilm")


@pytest.fixture(scope="session")
def tiny(text_encoder):
    """base 4x8x8 -> TSR 2x -> SSR 2x: 8 frames of 16x16, random weights with no zero layers."""
    from dreamix_ray.models.cascade import tiny_cascade

    return tiny_cascade(text_encoder, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    return tiny.save_pretrained(tmp_path_factory.mktemp("tiny_cascade"))


@pytest.fixture()
def moving_video():
    """A real 2 s shapes-world clip (a red circle moving left on blue) at 32x32, 8 fps."""
    from dreamix_ray.video import Video
    from dreamix_ray.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), colour="red", shape="circle", motion="left",
                         background="blue")
    return Video(render(scene, num_frames=16, size=32, fps=8.0), 8.0)


def pytest_configure(config):
    # Registered here so test modules can use it at import time (added for tests/test_batch.py).
    config.addinivalue_line("markers", "slow: starts Ray clusters or jobs (tens of seconds); still in the default run")


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    # A full run ended "316 passed" and then segfaulted (exit 139) in the interpreter's teardown: native threads
    # left by Ray's core worker, gRPC and OpenMP in this process crash module cleanup. The run's result is the
    # status pytest computed, so leave with it once every report is written, skipping that cleanup.
    # Not in an xdist worker: it reports to the controller over a channel that must close in order.
    if _EXIT_STATUS and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


LONGEST_FILES = ("tests/test_cluster.py", "tests/test_batch.py")  # about 10 and 8 minutes on 2 cores


def pytest_collection_modifyitems(session, config, items):
    # xdist hands files out in collection order: the longest go first, so the other worker's files fill the time
    # beside them instead of one long file running alone at the end.
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)
