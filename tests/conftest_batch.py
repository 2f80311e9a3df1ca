"""Batch-test fixtures: a real S3 server (moto) and a `ray start --head` cluster of our own, on loopback.

Loaded by test modules with `pytest_plugins = ["conftest_batch"]` (tests/conftest.py belongs to the lead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEYS = dict(access_key="testing", secret_key="testing", region="us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: (endpoint URL, S3Settings with test keys)."""
    from moto.server import ThreadedMotoServer

    from dreamix_ray.storage import S3Settings

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    yield endpoint, S3Settings(endpoint_url=endpoint, **KEYS)
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server[0], aws_access_key_id=KEYS["access_key"],
                        aws_secret_access_key=KEYS["secret_key"], region_name=KEYS["region"])


def _start_head(env: dict, attempt_timeout: float) -> tuple[subprocess.Popen, dict, str]:
    """One `ray start --head --block` with fresh ports and temp dir; returns once the node is fully up."""
    names = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "node-manager-port", "object-manager-port", "metrics-export-port",
             "runtime-env-agent-port")
    ports = {name: free_port() for name in names}
    temp = tempfile.mkdtemp(prefix="dxray-")  # short: Ray's socket paths must stay under ~107 characters
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp}",
           "--disable-usage-stats", "--object-store-memory=300000000"]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    log_path = Path(temp, "ray-start.log")
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + attempt_timeout
    # `--block` prints this once every process of the node is up (ports alone open before the raylet).
    while "block forever" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_head(proc, temp)
            raise RuntimeError(f"ray start failed: {log_path.read_text()[-500:] if log_path.exists() else ''}")
        time.sleep(0.5)
    return proc, ports, temp


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` started with start_new_session and everything it started: its process
    tree and its process group, at once. A test cluster's teardown: nothing in it needs Ray's graceful stop
    (SIGTERM), which took ~30 s per cluster, a minute of every suite run."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # any of its processes that left the tree (reparented to init)
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    kill_session(proc)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A `ray start --head` cluster with its own ports and temp dir; killing its session stops exactly this cluster.

    Yields (GCS address, dashboard URL, temp dir). Its workers get the S3 test keys through their environment,
    as a real cluster's workers get theirs. On an overloaded machine the raylet can miss Ray's fixed
    30 s registration window, so a failed start is retried.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Auth off on this loopback-only cluster: a driver connecting by address does not send Ray's token
    # unless its own process is in token mode, and these tests must not change the pytest process's mode.
    env.update(AWS_ACCESS_KEY_ID=KEYS["access_key"], AWS_SECRET_ACCESS_KEY=KEYS["secret_key"],
               AWS_DEFAULT_REGION=KEYS["region"], RAY_DASHBOARD_STARTUP_TIMEOUT_S="600", RAY_AUTH_MODE="disabled")
    errors = []
    for _ in range(3):
        try:
            proc, ports, temp = _start_head(env, attempt_timeout=600)
            break
        except RuntimeError as exc:
            errors.append(str(exc))
    else:
        raise RuntimeError("could not start a Ray head node: " + " | ".join(errors))
    try:
        wait_port(ports["dashboard-port"], proc, 600, "the Ray dashboard")
        yield f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}", temp
    finally:
        _stop_head(proc, temp)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This process as a Ray driver on the test cluster."""
    import ray

    ray.init(address=ray_cluster[0], log_to_driver=False)
    yield ray_cluster
    ray.shutdown()


def shapes_clip(path: Path, seed: int, colour: str = "red", motion: str = "left") -> Path:
    """A real mp4 of a shapes-world clip (2 s, 32x32, 8 fps)."""
    from dreamix_ray.video import Video, write_video
    from dreamix_ray.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(seed), colour=colour, shape="circle", motion=motion,
                         background="blue")
    return write_video(path, Video(render(scene, num_frames=16, size=32, fps=8.0), 8.0))
