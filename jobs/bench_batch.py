"""Batch throughput: N videos through the Ray Data pipeline, fused and staged (cluster/pipeline.py), against the
same steps one after another in one process.

    python jobs/bench_batch.py --videos 16 [--model DIR] [--layouts fused staged] [--write BENCHMARKS.md]

Reports videos/minute for each, the ratios, each layout against its ideal (cores / stage CPU-seconds a video),
per-step busy time from ds.stats() after execution, and the peak object-store use sampled during the run. Every
run starts cold (it loads the models itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run from a checkout

HEADING = "## Batch pipeline"


def make_inputs(folder: Path, n: int) -> Path:
    """n distinct shapes-world clips (2 s, 64x64, 8 fps) and a manifest with one prompt each."""
    from dreamix_ray.video import Video, write_video
    from dreamix_ray.world import render, sample_scene

    rows = []
    for i in range(n):
        scene = sample_scene(np.random.default_rng(i))
        path = write_video(folder / f"clip{i}.mp4", Video(render(scene, num_frames=16, size=64, fps=8.0), 8.0))
        rows.append({"id": f"clip{i}", "video": str(path), "prompt": "a yellow square moving right", "seed": i})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return manifest


class PeakObjectStore:
    """Samples the cluster's object-store bytes in use (Ray's memory summary) on a thread."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        # This driver's cluster by address: other Ray instances on the machine must not be sampled.
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(get_memory_info_reply(state).store_stats.object_store_bytes_used))
            except Exception:  # a sample may fail while the cluster is busy; the next one counts
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_sequential(manifest: Path, out: Path, args, threads: int) -> tuple[float, int, float]:
    from dreamix_ray.cluster.pipeline import pipeline_steps, run_in_process
    from dreamix_ray.cluster.io_steps import cascade_config
    from dreamix_ray.cluster.steps import model_tag
    from dreamix_ray.manifest import read_manifest, work_items
    from dreamix_ray.request import EditRequest

    start, cpu_start = time.perf_counter(), time.process_time()
    items = work_items(read_manifest(str(manifest)), str(out), EditRequest(prompt="", ssr_chunk_frames=args.ssr_chunk_frames),
                       model_tag(args.model), cascade_config(args.model))
    specs = pipeline_steps(cascade_config(args.model), args.model, None, None, False)
    stage_s: dict[str, float] = {}
    rows = run_in_process(items, specs, batch_size=args.batch_size, threads=threads,
                          on_stage=lambda name, secs: stage_s.__setitem__(name, secs))
    print(f"one process, {threads} thread(s), seconds per stage:", {k: round(v, 1) for k, v in stage_s.items()},
          flush=True)
    return time.perf_counter() - start, sum(r["status"] == "ok" for r in rows), time.process_time() - cpu_start


def run_pipeline(manifest: Path, out: Path, args, layout: str):
    import ray

    from dreamix_ray.cluster.batch import BatchOptions, local_cpus, resolve_layout, run_batch
    from dreamix_ray.cluster.batch_cli import parse_table
    from dreamix_ray.cluster.pipeline import pipeline_steps
    from dreamix_ray.cluster.io_steps import cascade_config
    from dreamix_ray.request import EditRequest

    staged = layout == "staged"  # the per-stage tables apply to the staged layout only
    opts = BatchOptions(manifest=str(manifest), output_prefix=str(out), model=args.model,
                        request=EditRequest(prompt="", ssr_chunk_frames=args.ssr_chunk_frames),
                        cpus=parse_table(args.stage_cpus if staged else args.fused_cpus, "--stage-cpus"),
                        actors=parse_table(args.stage_actors if staged else args.fused_actors, "--stage-actors",
                                           pair=True),
                        batch_size=args.batch_size, progress=False, layout=layout)
    # The cluster run_batch would start, started here so that its start-up is timed apart.
    config = cascade_config(args.model)
    specs = pipeline_steps(config, args.model, None, None, False, layout=resolve_layout(opts, config))
    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus or local_cpus(opts, specs), include_dashboard=False,
             log_to_driver=False)
    init_s = time.perf_counter() - start
    try:
        with PeakObjectStore() as peak:
            summary = run_batch(opts)
    finally:
        ray.shutdown()
    return summary, init_s, peak.peak, model_seconds(str(out), summary, config.stages[0].name)


def epoch(value) -> float:
    """Seconds since the epoch of a results *_at column (the results Parquet stores them as timestamps)."""
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def model_seconds(prefix: str, summary, first_stage: str) -> float:
    """From the first row's first stage starting to the last row's upload: the run without its start-up (actor
    processes, imports, model loads), which a long manifest amortizes."""
    from dreamix_ray.manifest import read_results

    rows = [r for r in read_results(prefix, None, run_id=summary.run_id).to_pylist() if r["status"] == "ok"]
    return max(epoch(r["finished_at"]) for r in rows) - min(epoch(r[f"{first_stage}_started_at"]) for r in rows)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section, leaving the others' sections as they are."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if HEADING in old:
        head, _, rest = old.partition(HEADING)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--model", default=None, help="cascade directory (default: the embedded cascade)")
    p.add_argument("--batch-size", type=int, default=2, help="rows per model call (both runs)")
    p.add_argument("--ssr-chunk-frames", type=int, default=8, help="last-SSR chunk (default 8: 2 chunks per video)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="local Ray cluster CPUs (default: enough for 1 actor/stage)")
    p.add_argument("--layouts", nargs="+", choices=("fused", "staged"), default=["fused", "staged"])
    p.add_argument("--stage-cpus", default="decode=0.5,base=1,tsr=1,ssr=1,encode=0.5", help="staged")
    # The last SSR is ~80% of the embedded cascade's work: two SSR actors share its rows.
    p.add_argument("--stage-actors", default="base=1,tsr=1,ssr=2", help="staged")
    p.add_argument("--fused-cpus", default="", help="fused, e.g. cascade=1 (default: the pipeline's)")
    p.add_argument("--fused-actors", default="", help="fused, e.g. cascade=2 (default: the pipeline's autoscaling)")
    p.add_argument("--baseline-threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="torch threads of the one-process baselines (default: 1 and every core)")
    p.add_argument("--write", default=None, metavar="BENCHMARKS.md", help="append/replace the section there")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        manifest = make_inputs(Path(tmp), args.videos)
        baselines = [(n, *run_sequential(manifest, Path(tmp, f"seq{n}"), args, n)) for n in args.baseline_threads]
        pipelines = {layout: run_pipeline(manifest, Path(tmp, layout), args, layout) for layout in args.layouts}
    cores = os.cpu_count() or 1
    seq_rows = "\n".join(
        f"| one process, stage after stage ({n} torch thread(s)) | {ok} | {secs:.1f} | {60 * ok / secs:.2f} | "
        f"{cpu:.1f} | {cpu / secs:.2f} |" for n, secs, ok, cpu in baselines)
    rows, verdicts, busy = [], [], []
    for layout, (summary, init_s, peak, steady_s) in pipelines.items():
        print(summary.stats, flush=True)
        ray_cpu = sum(summary.cpu_seconds.values())
        # The ideal: every core busy with step work, none lost between steps (cores / step CPU-seconds a video).
        ideal_vpm = 60 * cores * summary.ok / ray_cpu if ray_cpu else float("nan")
        rows.append(f"| Ray Data pipeline, {layout} (excl. {init_s:.1f} s `ray.init`) | {summary.ok} | "
                    f"{summary.seconds:.1f} | {summary.videos_per_minute:.2f} | {ray_cpu:.1f} (step tasks) | "
                    f"{ray_cpu / summary.seconds:.2f} |")
        ratios = ", ".join(f"**{secs / summary.seconds:.2f}x** against {n} thread(s)" for n, secs, _, _ in baselines)
        verdicts.append(f"- {layout}: {ratios}; against its ideal ({cores} cores / {ray_cpu / max(summary.ok, 1):.1f} "
                        f"step CPU-seconds a video = {ideal_vpm:.2f} videos/min): "
                        f"**{summary.videos_per_minute / ideal_vpm:.0%}**; without start-up (the first row's "
                        f"first stage to the last upload, {steady_s:.1f} s): "
                        f"**{60 * summary.ok / steady_s / ideal_vpm:.0%}**; peak object-store use "
                        f"{peak / 2**20:.1f} MiB.")
        busy += [f"| {layout} | {name} | {secs:.1f} | {summary.cpu_seconds.get(name, 0.0):.1f} |"
                 for name, secs in summary.busy_seconds.items()]
    command = "python jobs/bench_batch.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    nl = "\n"
    text = f"""{HEADING}

`{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, model: {args.model or 'embedded'};
the machine's load average at the end: {os.getloadavg()[0]:.1f})

| run | videos ok | seconds | videos/min | CPU seconds | cores used on average |
|---|---|---|---|---|---|
{seq_rows}
{nl.join(rows)}

Pipeline / one-process throughput, and each layout against its ideal:

{nl.join(verdicts)}

Per-step busy time (sum of task wall and CPU times, from ds.stats() after execution):

| layout | operator | busy seconds | CPU seconds |
|---|---|---|---|
{nl.join(busy)}
"""
    print(text)
    if args.write:
        write_section(Path(args.write), text)
    done = [summary.ok for summary, *_ in pipelines.values()] + [ok for _, _, ok, _ in baselines]
    return 0 if all(ok == args.videos for ok in done) else 1


if __name__ == "__main__":
    sys.exit(main())
