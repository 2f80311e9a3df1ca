"""Does a Ray actor process make the batch steps cost more CPU? The bench's one-process baseline (every stage
after the other, 1 torch thread), run here and inside a plain Ray actor on the same videos.

    python research/probe_actor_cpu.py --videos 4

Each side runs once to warm up (model load, first calls) and is then measured; prints process CPU, main-thread
CPU and wall seconds per video. jobs/bench_batch.py found a video at 1.37x the CPU-seconds inside the pipeline's
actors; this separates the actor process from the Ray Data path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "jobs")]


def per_video(n: int) -> tuple[float, float, float]:
    import torch

    import bench_batch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = bench_batch.make_inputs(Path(tmp), n)
        args = argparse.Namespace(model=None, batch_size=2, ssr_chunk_frames=8)
        bench_batch.run_sequential(manifest, Path(tmp, "warm"), args, 1)
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        bench_batch.run_sequential(manifest, Path(tmp, "out"), args, 1)
        return (time.process_time() - cpu) / n, (time.thread_time() - thread) / n, (time.perf_counter() - wall) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=4)
    n = p.parse_args().videos
    import ray

    print("in this process: %.2f CPU-s, %.2f main-thread CPU-s, %.2f s wall per video" % per_video(n), flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Runner:  # a plain actor, as the pipeline's steps are (without Ray Data around it)
            def run(self):
                sys.path[:0] = [str(ROOT), str(ROOT / "jobs")]
                return per_video(n)

        print("in a Ray actor: %.2f CPU-s, %.2f main-thread CPU-s, %.2f s wall per video"
              % ray.get(Runner.remote().run.remote()), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
