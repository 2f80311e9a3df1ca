"""Bounded load test of the serving endpoint on loopback: N concurrent clients, a fixed number of jobs each.

    python jobs/bench_serve.py --clients 8 --jobs-per-client 4 --keys 2 [--write BENCHMARKS.md]

Starts its own Ray and the Serve app (tiny cascade unless --model; or --url for a running server),
then every client submits its jobs (a 429 counts as rejected, not retried), polls each accepted job
until it is done or failed, and times every status call. Reports p50/p95 latencies, accepted /
rejected counts and whether every accepted job completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

KEYS = [f"bench-key-{i}" for i in range(16)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def clip_bytes() -> bytes:
    from dreamix_ray.video import Video, write_video
    from dreamix_ray.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), colour="red", shape="circle", motion="left", background="blue")
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp, "c.mp4"), Video(render(scene, num_frames=16, size=32, fps=8.0), 8.0))
        return Path(tmp, "c.mp4").read_bytes()


def start_s3() -> str:
    """A loopback S3 server (moto) holding the job store: status calls then pay real S3 round trips."""
    import atexit
    import subprocess

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its own process: an in-process server would share the GIL with the clients being timed.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")  # inherited by the replicas
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return "s3://bench/serve"


def start_local(args) -> str:
    """A private Ray instance and the app on a free loopback port; returns its URL."""
    import ray
    from ray import serve

    from dreamix_ray.cluster.serving.app import APP_NAME, build_app

    model = args.model
    if args.s3:
        args.store = start_s3()
    if not model:
        from dreamix_ray.models.cascade import tiny_cascade

        model = str(tiny_cascade().save_pretrained(tempfile.mkdtemp(prefix="bench-model-")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["DREAMIX_API_KEYS"] = ",".join(KEYS[: args.keys])
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = dict(model=model, store=args.store or tempfile.mkdtemp(prefix="bench-store-"), torch_threads=1,
                    max_replicas=args.max_replicas, concurrency_per_key=args.concurrency_per_key)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def client(index: int, url: str, args, video: bytes, stats: dict) -> None:
    key = args.key_list[index % args.keys]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as http:
        for _ in range(args.jobs_per_client):
            start = time.perf_counter()
            r = await http.post("/v1/edits", headers=headers, files={"video": ("clip.mp4", video, "video/mp4")},
                                data={"prompt": "a green square moving right", "steps": str(args.steps)})
            stats["submit_ms"].append(1000 * (time.perf_counter() - start))
            if r.status_code == 429:
                stats["rejected"] += 1
                await asyncio.sleep(args.backoff)
                continue
            if r.status_code != 202:
                stats["errors"].append(f"{r.status_code} {r.text[:120]}")
                continue
            stats["accepted"] += 1
            job_id, deadline = r.json()["id"], time.time() + args.timeout
            while time.time() < deadline:
                start = time.perf_counter()
                reply = await http.get(f"/v1/edits/{job_id}", headers=headers)
                stats["status_ms"].append(1000 * (time.perf_counter() - start))
                if reply.status_code != 200:
                    stats["errors"].append(f"status {reply.status_code} {reply.text[:160]}")
                    await asyncio.sleep(args.poll)
                    continue
                job = reply.json()
                if job["status"] in ("done", "failed"):
                    stats[job["status"]] += 1
                    stats["job_s"].append(job["timings"].get("total_s", float("nan")))
                    break
                await asyncio.sleep(args.poll)
            else:
                stats["lost"].append(job_id)


async def run_load(url: str, args) -> dict:
    video = clip_bytes()
    stats = {"accepted": 0, "rejected": 0, "done": 0, "failed": 0, "errors": [], "lost": [],
             "status_ms": [], "submit_ms": [], "job_s": []}
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    await asyncio.gather(*(client(i, url, args, video, stats) for i in range(args.clients)))
    wall = time.perf_counter() - start
    return {
        "clients": args.clients, "jobs_per_client": args.jobs_per_client, "keys": args.keys,
        "store": "s3 (moto, loopback)" if args.s3 else ("given" if args.store or args.url else "local dir"),
        "concurrency_per_key": args.concurrency_per_key, "steps": args.steps, "wall_s": round(wall, 1),
        "requests": args.clients * args.jobs_per_client, "accepted": stats["accepted"],
        "rejected_429": stats["rejected"],
        "other_errors": len(stats["errors"]), "done": stats["done"], "failed": stats["failed"],
        "not_finished": len(stats["lost"]), "all_accepted_completed": stats["done"] == stats["accepted"],
        "status_calls": len(stats["status_ms"]),
        "status_p50_ms": round(percentile(stats["status_ms"], 50), 1),
        "status_p95_ms": round(percentile(stats["status_ms"], 95), 1),
        "submit_p50_ms": round(percentile(stats["submit_ms"], 50), 1),
        "submit_p95_ms": round(percentile(stats["submit_ms"], 95), 1),
        "job_p50_s": round(statistics.median(stats["job_s"]), 2) if stats["job_s"] else None,
        "cpus": os.cpu_count(), "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "error_samples": stats["errors"][:3],
    }


def markdown(result: dict, command: str) -> str:
    r = result
    return (f"\n### {time.strftime('%Y-%m-%d %H:%M')} - {r['clients']} clients x {r['jobs_per_client']} edits, "
            f"{r['keys']} keys (limit {r['concurrency_per_key']} unfinished jobs per key), job store: {r['store']}\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {r['cpus']} CPUs, 1-minute load average {r['load_avg_1m'][0]} before and "
            f"{r['load_avg_1m'][1]} after (other processes share the cores).\n\n"
            "| requests | accepted | rejected (429) | other errors | done | failed | every accepted job completed |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {r['requests']} | {r['accepted']} | {r['rejected_429']} | {r['other_errors']} | {r['done']} | "
            f"{r['failed']} | {'yes' if r['all_accepted_completed'] else 'NO'} |\n\n"
            "| status calls | status p50 | status p95 | submit p50 | submit p95 | job p50 (accepted -> done) | wall |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {r['status_calls']} | {r['status_p50_ms']} ms | {r['status_p95_ms']} ms | {r['submit_p50_ms']} ms | "
            f"{r['submit_p95_ms']} ms | {r['job_p50_s']} s | {r['wall_s']} s |\n")


def append_section(path: Path, text: str) -> None:
    """Append under '## Serving' (created if missing), leaving every other section untouched."""
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    if "\n## Serving" not in body:
        intro = "Load tests of the Serve endpoint (`jobs/bench_serve.py`) on loopback.\n"
        body = body.rstrip("\n") + "\n\n## Serving\n\n" + intro
    head, _, rest = body.partition("\n## Serving")
    section, sep, after = rest.partition("\n## ")
    path.write_text(head + "\n## Serving" + section.rstrip("\n") + "\n" + text + (sep + after if sep else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (keys from DREAMIX_API_KEYS); default: start one")
    p.add_argument("--model", default=None, help="cascade dir (default: the tiny test cascade: serving overhead)")
    p.add_argument("--store", default=None, help="job store (default: a temp dir)")
    p.add_argument("--s3", action="store_true", help="keep the job store on a loopback S3 server (moto)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs-per-client", type=int, default=4)
    p.add_argument("--keys", type=int, default=2, help="API keys the clients share round-robin")
    p.add_argument("--concurrency-per-key", type=int, default=4)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="sampling steps per stage of each edit")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between status calls")
    p.add_argument("--backoff", type=float, default=0.5, help="seconds a client waits after a 429")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--write", default=None, metavar="BENCHMARKS.md", help="append the result under '## Serving'")
    args = p.parse_args(argv)
    if not 1 <= args.keys <= len(KEYS) or args.clients < 1 or args.clients * args.jobs_per_client > 2000:
        p.error("use 1-16 keys, >= 1 client and at most 2000 jobs in total (the test is bounded)")
    # A running server has its own keys; a local one gets ours.
    args.key_list = [k for k in os.environ.get("DREAMIX_API_KEYS", "").split(",") if k] if args.url else KEYS
    url = args.url or start_local(args)
    result = asyncio.run(run_load(url, args))
    print(json.dumps(result, indent=1))
    if args.write:
        append_section(Path(args.write), markdown(result, "python " + " ".join(sys.argv)))
    if not args.url:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0 if result["all_accepted_completed"] and not result["other_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
