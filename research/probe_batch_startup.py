"""Where a batch job's start-up goes: a timeline of one fused `run_batch` over N videos, from Ray's task events.

    python research/probe_batch_startup.py --videos 8

jobs/bench_batch.py reports the pipeline at 86-88% of its ideal once its rows flow but 67-73% end to end, the
difference being start-up (actor processes, imports, model loads). This probe splits that start-up: for every
actor, when Ray created its creation task, when the task started (a worker process was up) and when its
__init__ ended; then the first row's decode and first stage. Times are seconds after run_batch was called.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--model", default=None)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--import-times", type=int, default=0, metavar="N",
                   help="also print each worker's N slowest imports (cumulative, python -X importtime)")
    args = p.parse_args(argv)

    import ray
    from ray.util.state import list_tasks

    from bench_batch import epoch, make_inputs
    from dreamix_ray.cluster.batch import BatchOptions, run_batch
    from dreamix_ray.manifest import read_results
    from dreamix_ray.request import EditRequest

    with tempfile.TemporaryDirectory(prefix="probe-startup-") as tmp:
        manifest = make_inputs(Path(tmp), args.videos)
        # the dashboard: Ray's state API (list_tasks) is served by it
        env = {"env_vars": {"PYTHONPROFILEIMPORTTIME": "1"}} if args.import_times else None
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=True, log_to_driver=False,
                 runtime_env=env)
        logs = Path(ray._private.worker._global_node.get_session_dir_path(), "logs")
        try:
            opts = BatchOptions(manifest=str(manifest), output_prefix=str(Path(tmp, "out")), model=args.model,
                                request=EditRequest(prompt="", ssr_chunk_frames=8), batch_size=2, progress=False)
            t0 = time.time()
            summary = run_batch(opts)
            rows = [r for r in read_results(opts.output_prefix, None, run_id=summary.run_id).to_pylist()
                    if r["status"] == "ok"]
            tasks = list_tasks(filters=[("type", "=", "ACTOR_CREATION_TASK")], detail=True, limit=1000)
            imports = {t.func_or_class_name: slowest_imports(logs, t.worker_pid, args.import_times)
                       for t in tasks} if args.import_times else {}
        finally:
            ray.shutdown()

    def rel(ms) -> str:
        return f"{ms / 1000 - t0:7.1f}" if ms else "      -"

    print(f"{summary.ok} videos in {summary.seconds:.1f} s (layout {summary.layout})")
    print("actor creation tasks: created / started (worker up) / __init__ done")
    for t in sorted(tasks, key=lambda t: t.creation_time_ms or 0):
        print(f"  {t.func_or_class_name:40s} {rel(t.creation_time_ms)} {rel(t.start_time_ms)} {rel(t.end_time_ms)}")
        for seconds, module in imports.get(t.func_or_class_name, []):
            print(f"      {seconds:5.2f} s  import {module}")
    first = min(rows, key=lambda r: epoch(r["decoded_at"]))
    stage = summary.stages[0]
    print(f"first decode done        {epoch(first['decoded_at']) - t0:7.1f}")
    print(f"first {stage} started     {min(epoch(r[f'{stage}_started_at']) for r in rows) - t0:7.1f}")
    print(f"first upload             {min(epoch(r['finished_at']) for r in rows) - t0:7.1f}")
    print(f"last upload              {max(epoch(r['finished_at']) for r in rows) - t0:7.1f}")
    return 0


def slowest_imports(logs: Path, pid: int | None, n: int) -> list[tuple[float, str]]:
    """The top-level imports (and their n slowest) of worker `pid`, from `-X importtime`'s lines in its stderr."""
    found = []
    for err in logs.glob(f"worker-*-{pid}.err"):
        for line in err.read_text(errors="replace").splitlines():
            if line.startswith("import time:") and "|" in line and "cumulative" not in line:
                _, cumulative, name = line.split("|", 2)
                found.append((int(cumulative) / 1e6, name.strip()))
    return sorted(found, reverse=True)[:n]


if __name__ == "__main__":
    sys.exit(main())
