"""Does a Ray actor process make the batch steps cost more CPU? The bench's one-process baseline (every stage
after the other, 1 torch thread), run here and inside a plain Ray actor on the same videos.

    python research/probe_actor_cpu.py --videos 4

Each side runs once to warm up (model load, first calls) and is then measured; prints process CPU, calling-thread
CPU and wall seconds per video. jobs/bench_batch.py found a video at 1.37x the CPU-seconds inside the pipeline's
actors; this separates the actor process from the Ray Data path. Ray Data calls a map actor on a thread pool's
thread, not the main thread: two more runs here call the steps on such a thread, in a process with glibc's
default arenas and in one with host_memory.worker_env() (one arena).
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()  # thread: the caller's
        bench_batch.run_sequential(manifest, Path(tmp, "out"), args, 1)
        return (time.process_time() - cpu) / n, (time.thread_time() - thread) / n, (time.perf_counter() - wall) / n


def on_pool_thread(n: int, env: dict[str, str]) -> str:
    """per_video on a ThreadPoolExecutor's thread, in a fresh process with `env` added (malloc reads it at start)."""
    code = ("import sys; sys.path[:0] = %r; from concurrent.futures import ThreadPoolExecutor; "
            "from probe_actor_cpu import per_video; "
            "print('%%.2f CPU-s, %%.2f calling-thread CPU-s, %%.2f s wall per video' %% "
            "ThreadPoolExecutor(1).submit(per_video, %d).result())" % ([str(ROOT / "research")], n))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=4)
    n = p.parse_args().videos
    import ray

    from dreamix_ray.host_memory import worker_env

    print("in this process: %.2f CPU-s, %.2f main-thread CPU-s, %.2f s wall per video" % per_video(n), flush=True)
    print("on a pool thread, glibc's arenas:", on_pool_thread(n, {}), flush=True)
    print(f"on a pool thread, {worker_env()}:", on_pool_thread(n, worker_env()), flush=True)
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
