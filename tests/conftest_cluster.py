"""A multi-node Ray cluster on loopback: one `ray start --head` and worker nodes from `ray start --address`.

Each worker node is shaped like a KubeRay worker group of infra/: 1 CPU, 1 logical GPU (Ray does the
accounting; torch finds no CUDA and runs on CPU) and a custom resource such as `{"stage_base": 1}`.
Every node has its own ports and temp dir, and the cluster remembers the process trees it started:
`kill(node)` SIGKILLs one node's processes (a lost machine), `stop()` stops exactly these nodes and no
other Ray on the machine.

Loaded with `pytest_plugins = ["conftest_cluster"]`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest_batch import BIN, KEYS, free_port, kill_session

NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port")
HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")
# The head notices a lost node after period x threshold (Ray's defaults: 3 s x 5); tests lose nodes on purpose.
FAST_HEALTH = dict(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4",
                   RAY_health_check_initial_delay_ms="1000")


@dataclass
class Node:
    """One `ray start --block` process (its session leader) and what it was started with."""

    name: str
    proc: subprocess.Popen
    temp: str
    resources: dict
    pids: set[int] = field(default_factory=set)  # every process of this node seen so far

    def tree(self) -> list[psutil.Process]:
        """This node's live processes: `ray start` and its descendants (raylet, agents, workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        self.pids.update(p.pid for p in procs)
        return procs

    @property
    def log(self) -> str:
        path = Path(self.temp, "ray-start.log")
        return path.read_text(errors="replace") if path.exists() else ""


class LocalCluster:
    """A head node and worker nodes on 127.0.0.1; `add_node` can be called again to replace a lost node."""

    def __init__(self, env: dict, head_cpus: int = 2, dashboard: bool = False, start_timeout: float = 180):
        self.env, self.start_timeout = env, start_timeout
        self.nodes: list[Node] = []
        ports = {name: free_port() for name in HEAD_PORTS}
        self.address = f"127.0.0.1:{ports['port']}"
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}" if dashboard else None
        # the dashboard only serves `ray job submit`; without it the head starts in half the time
        head_args = (["--head", f"--num-cpus={head_cpus}", "--num-gpus=0",
                      f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1"]
                     + [f"--{k}={v}" for k, v in ports.items()])
        self.head = self._ready(self._launch("head", head_args, {}), lambda: self._launch("head", head_args, {}))

    def add_node(self, resources: dict, num_cpus: int = 1, num_gpus: int = 1) -> Node:
        """A worker node with `resources` (e.g. {"stage_base": 1}), as a KubeRay worker group's pod."""
        return self.add_nodes([resources], num_cpus, num_gpus)[0]

    def add_nodes(self, shapes: list[dict], num_cpus: int = 1, num_gpus: int = 1) -> list[Node]:
        """Worker nodes started side by side (each `ray start` spends most of its time waiting on Python)."""
        def launch(r: dict) -> Node:
            return self._launch("-".join(r) or f"node{len(self.nodes)}",
                                [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                                 f"--resources={json.dumps(r)}"], r)

        started = [launch(r) for r in shapes]
        return [self._ready(node, lambda r=node.resources: launch(r)) for node in started]

    def _ready(self, node: Node, relaunch) -> Node:
        """`node` once up; started once more if it missed Ray's fixed raylet start window (a starved machine)."""
        try:
            return self._wait(node)
        except RuntimeError as exc:
            if "timed out during startup" not in str(exc):
                raise
            self.nodes.remove(node)
            shutil.rmtree(node.temp, ignore_errors=True)
            return self._wait(relaunch())

    def _launch(self, name: str, args: list[str], resources: dict) -> Node:
        temp = tempfile.mkdtemp(prefix="dxc-")  # short: Ray's socket paths must stay under ~107 characters
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               "--disable-usage-stats", "--object-store-memory=100000000",
               # workers take any free port: two raylets on one host must not hand out the same range
               "--min-worker-port=0", "--max-worker-port=0", *args]
        cmd += [f"--{port}={free_port()}" for port in NODE_PORTS]
        log = open(Path(temp, "ray-start.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = Node(name, proc, temp, resources)
        self.nodes.append(node)
        return node

    def _wait(self, node: Node) -> Node:
        deadline = time.monotonic() + self.start_timeout
        # `--block` prints this once every process of the node is up (ports alone open before the raylet).
        while "block forever" not in node.log:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start of {node.name} failed: {node.log[-800:]}")
            time.sleep(0.3)
        node.tree()
        return node

    def kill(self, node: Node) -> None:
        """Lose a node: SIGKILL its whole process tree at once, as when a machine goes away."""
        procs = node.tree()
        for p in procs:
            with _gone():
                p.kill()
        psutil.wait_procs(procs, timeout=30)

    def stop(self) -> None:
        """Stop every node this cluster started: its process tree and process group killed, as `kill` loses one
        (Ray's graceful stop took ~30 s and tests nothing); never another Ray on the machine."""
        for node in self.nodes:
            kill_session(node.proc)
            shutil.rmtree(node.temp, ignore_errors=True)

    def live_pids(self) -> list[int]:
        return [p.pid for node in self.nodes for p in node.tree()]


class _gone:
    """Ignore processes that exited between listing and signalling."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (psutil.NoSuchProcess, ProcessLookupError))


def cluster_env() -> dict:
    """The nodes' environment: S3 test keys (as real workers get theirs), no token auth on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(AWS_ACCESS_KEY_ID=KEYS["access_key"], AWS_SECRET_ACCESS_KEY=KEYS["secret_key"],
               AWS_DEFAULT_REGION=KEYS["region"], RAY_DASHBOARD_STARTUP_TIMEOUT_S="600", RAY_AUTH_MODE="disabled",
               **FAST_HEALTH)
    return env


STAGE_NODES = ({"stage_base": 1}, {"stage_tsr": 1}, {"stage_ssr": 1})


@pytest.fixture(scope="module")
def gpu_cluster(s3_server):
    """Head (2 CPUs, no GPU) + three 1-CPU, 1-GPU nodes with stage_base / stage_tsr / stage_ssr: the KubeRay
    worker groups of infra/raycluster-batch.yaml, one pod each."""
    cluster = LocalCluster(cluster_env())
    try:
        cluster.add_nodes(list(STAGE_NODES))
        yield cluster
    finally:
        cluster.stop()
