"""The system on a multi-node Ray cluster (issue 23): a head and three 1-GPU nodes shaped like infra/'s KubeRay
worker groups. `dreamix batch --pin-stages --stage-gpus base=1,tsr=1,ssr=1`: each stage on its own node, stages
pipelined across nodes, a node lost mid-job and replaced, a node lost for good; `dreamix serve --address`: a
stage per GPU node, a stage's node lost and replaced; `dreamix finetune --workers 2`: two nodes, one lost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time

import psutil
import pytest
import ray

pytest.register_assert_rewrite("conftest_batch", "conftest_cluster")
from conftest_batch import BIN, KEYS, free_port, shapes_clip  # noqa: E402
from conftest_cluster import STAGE_NODES  # noqa: E402

pytest_plugins = ["conftest_batch", "conftest_cluster"]
from dreamix_ray.manifest import read_results  # noqa: E402

STAGES = ("base", "tsr", "ssr")
PIN = ["--pin-stages", "--stage-gpus", "base=1,tsr=1,ssr=1", "--batch-size", "1", "--ssr-chunk-frames", "3",
       "--quiet"]


@pytest.fixture(scope="module")
def inputs(s3_client, tmp_path_factory):
    """Eight tiny clips on S3; `manifest(name, n)` writes a manifest of n rows over them (each its own seed)."""
    tmp = tmp_path_factory.mktemp("multinode")
    s3_client.create_bucket(Bucket="multi")
    for i in range(8):
        s3_client.upload_file(str(shapes_clip(tmp / f"clip{i}.mp4", seed=i)), "multi", f"in/clip{i}.mp4")

    def manifest(name: str, n: int) -> str:
        rows = [{"id": f"{name}{i}", "video": f"s3://multi/in/clip{i % 8}.mp4", "prompt": "a green circle", "seed": i}
                for i in range(n)]
        s3_client.put_object(Bucket="multi", Key=f"{name}.jsonl", Body="\n".join(map(json.dumps, rows)).encode())
        return f"s3://multi/{name}.jsonl"

    return manifest


def batch_cmd(cluster, s3_server, tiny_dir, manifest: str, prefix: str, *extra: str) -> list[str]:
    return [str(BIN / "dreamix"), "batch", manifest, "--output-prefix", prefix, "--model", str(tiny_dir),
            "--address", cluster.address, "--endpoint-url", s3_server[0], *PIN, *extra]


def driver_env() -> dict:
    """The driver's environment: the S3 test keys (a user's own credentials), no token auth on loopback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(env, RAY_AUTH_MODE="disabled", AWS_ACCESS_KEY_ID=KEYS["access_key"],
                AWS_SECRET_ACCESS_KEY=KEYS["secret_key"], AWS_DEFAULT_REGION=KEYS["region"])


def still_running(job: subprocess.Popen, deadline: float, what: str) -> None:
    """Fail with the command's own output when it ends, or outlives `deadline`, before the test's next step."""
    if job.poll() is None and time.monotonic() < deadline:
        return
    job.kill()
    out, err = job.communicate()
    pytest.fail(f"{what}: exit {job.returncode}\n{out[-2000:]}\n{err[-4000:]}")


def stage_nodes(cluster) -> dict[str, str]:
    """stage kind -> node id of the live node with its stage_<kind> resource."""
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        return {k[len("stage_"):]: n["NodeID"] for n in ray.nodes() if n["Alive"] for k in n["Resources"]
                if k.startswith("stage_")}
    finally:
        ray.shutdown()


def _outputs(s3_client, prefix: str) -> int:
    listing = s3_client.list_objects_v2(Bucket="multi", Prefix=prefix)
    return sum(o["Key"].endswith(".mp4") and not o["Key"].endswith(".preview.mp4") for o in listing.get("Contents", []))


ROWS = 12  # of the node-loss job


@pytest.mark.slow
def test_each_stage_runs_on_its_own_gpu_node_and_a_lost_node_is_replaced(gpu_cluster, inputs, s3_server, s3_client,
                                                                        tiny_dir):
    """`dreamix batch --pin-stages --stage-gpus base=1,tsr=1,ssr=1`: each stage runs only on its own GPU node and
    rows flow through the stages concurrently. (The issue's hang: decode's actor landed on a stage's 1-CPU node,
    Ray Data spreads actors, and that stage's actor waited for the CPU forever.) Mid-job the SSR node's processes
    are killed (the slowest stage: rows wait for it) and a node with the same resources starts, as an autoscaler
    would: Ray restarts the SSR actor there and retries its rows; none lost, none twice."""
    nodes = stage_nodes(gpu_cluster)
    manifest = inputs("loss", ROWS)
    cmd = batch_cmd(gpu_cluster, s3_server, tiny_dir, manifest, "s3://multi/loss", "--run-id", "loss")
    begun = time.monotonic()
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env())
    try:
        deadline = time.monotonic() + 400
        # mid-job: the first row done, the rest not (a tiny row takes a fraction of a second once the stages
        # are up: waiting for two, polling each second, once saw all 8 done before the kill)
        while _outputs(s3_client, "loss/videos/") < 1:
            still_running(job, deadline, "the job ended (or hung) before the node loss")
            time.sleep(0.1)
        ssr = next(n for n in gpu_cluster.nodes if n.resources == {"stage_ssr": 1} and n.proc.poll() is None)
        pids = [p.pid for p in ssr.tree()]
        gpu_cluster.kill(ssr)
        lost = time.monotonic()
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids)
        done_at_loss = _outputs(s3_client, "loss/videos/")
        time.sleep(5)  # the head declares the node dead (fast health checks), the SSR actor waits for a node
        gpu_cluster.add_node({"stage_ssr": 1})
        joined = time.monotonic()
        out, err = job.communicate(timeout=600)
        print(f"node lost at {lost - begun:.0f} s, replaced at {joined - begun:.0f} s, "
              f"job done at {time.monotonic() - begun:.0f} s")
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert done_at_loss < ROWS, "the node was lost after the job had finished"
    assert f"{ROWS} outputs: {ROWS} done, 0 failed, 0 skipped" in out, out + err[-2000:]
    rows = read_results("s3://multi/loss", s3_server[1], run_id="loss").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"loss{i}" for i in range(ROWS))  # each row once
    assert {r["status"] for r in rows} == {"ok"}
    assert len({r["ssr_node"] for r in rows}) == 2  # the lost node and its replacement both ran SSR rows
    replacement = stage_nodes(gpu_cluster)["ssr"]
    for stage in STAGES:  # each stage only on its own node(s): the SSR on the lost one and its replacement
        own = {nodes[stage], replacement} if stage == "ssr" else {nodes[stage]}
        assert {r[f"{stage}_node"] for r in rows} <= own, stage
        assert {(r[f"{stage}_device"], r[f"{stage}_gpus"]) for r in rows} == {("cpu", "0")}  # Ray's logical GPU
    for stage in ("base", "tsr"):  # the summary's one line per stage names the same node
        line = re.search(rf"^placement {stage}: (.*)$", out, re.M)
        assert line and line.group(1).startswith(f"{ROWS} on node {nodes[stage][:8]} (") and ";" not in line.group(1)
    # No assertion that rows overlapped across stages: the lost node's rows are redone after the base has
    # finished every row, and the results keep the redone attempt's times (a loaded machine showed no overlap).
    # No rerun either: with each row recorded once and ok (above), the skip is test_batch's rerun test.


def live_stage_nodes(cluster) -> None:
    """Start a node for every stage_<kind> group that has no live one (a test before may have lost it)."""
    for resources in STAGE_NODES:
        if not any(n.resources == resources and n.proc.poll() is None for n in cluster.nodes):
            cluster.add_node(resources)


def node_of(cluster, node_id: str):
    """The LocalCluster node behind a Ray node id (matched by its stage_<kind> resource)."""
    kind = next(k for k, n in stage_nodes(cluster).items() if n == node_id)
    return next(n for n in cluster.nodes if n.resources == {f"stage_{kind}": 1} and n.proc.poll() is None)


def wait_job(http, job_id: str, timeout: float = 400, until=lambda job: job["status"] in ("done", "failed")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/edits/{job_id}").json()
        if until(job) or job["status"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} still {job['status']} after {timeout} s: {job}")


@pytest.mark.slow
def test_serve_puts_each_stage_on_its_own_gpu_node_and_a_job_outlives_losing_one(gpu_cluster, tiny_dir, tmp_path):
    """`dreamix serve --address` on the 3-GPU cluster: one replica per stage, each asking for a GPU, so each stage on
    its own node (the job records where its units ran). Then the SSR's node is lost, a job comes in, and a node
    with the same resources joins once the job waits for its SSR: the job is done with its SSR there. (A replica
    lost in the middle of a call is retried the same way: tests/test_serve.py kills replicas mid-job.)"""
    httpx = pytest.importorskip("httpx")
    live_stage_nodes(gpu_cluster)
    port = free_port()
    deploy = subprocess.run([str(BIN / "dreamix"), "serve", "--address", gpu_cluster.address, "--model", str(tiny_dir),
                             "--store", str(tmp_path / "store"), "--no-auth", "--num-gpus", "1", "--proxies", "head",
                             "--host", "127.0.0.1", "--port", str(port)],
                            capture_output=True, text=True, timeout=400, env=driver_env())
    assert deploy.returncode == 0 and "deployed" in deploy.stdout, deploy.stdout[-2000:] + deploy.stderr[-3000:]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    clip = shapes_clip(tmp_path / "clip.mp4", seed=5).read_bytes()

    def submit(seed: int, steps: int) -> str:
        r = http.post("/v1/edits", files={"video": ("clip.mp4", clip, "video/mp4")},
                      data={"prompt": "a green circle", "seed": str(seed), "steps": str(steps)})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    try:
        first = wait_job(http, submit(1, 2))
        assert first["status"] == "done", first
        nodes = stage_nodes(gpu_cluster)
        placed = {stage: first["placement"][stage] for stage in STAGES}
        assert sorted(n for ids in placed.values() for n in ids) == sorted(nodes.values()), (placed, nodes)
        lost_node = placed["ssr"][0]
        lost = node_of(gpu_cluster, lost_node)  # Serve places by GPUs alone: any of the three stage_<kind> nodes
        gpu_cluster.kill(lost)
        job_id = submit(2, 2)
        # the job's base and TSR run on the nodes left; its SSR waits in Serve's queue for a replica
        job = wait_job(http, job_id, until=lambda j: "tsr" in j["timings"])
        assert job["status"] == "running" and "ssr" not in job["timings"], job
        gpu_cluster.add_node(lost.resources)  # as KubeRay recreates a lost pod
        job = wait_job(http, job_id)
        assert job["status"] == "done", job
        replacement = set(stage_nodes(gpu_cluster).values()) - set(nodes.values())
        assert job["placement"]["ssr"] == list(replacement), (job["placement"], lost_node, replacement)
        print(f"job timings {job['timings']}, placement {job['placement']}")
        video = http.get(f"/v1/edits/{job_id}/video")
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    finally:
        ray.init(address=gpu_cluster.address, log_to_driver=False)
        try:
            from ray import serve

            serve.shutdown()  # frees the GPUs for the tests after this one
        finally:
            ray.shutdown()


def train_worker_nodes(cluster) -> list:
    """The live worker nodes (not the head) running a Ray Train worker process."""
    def runs_worker(node) -> bool:
        for proc in node.tree():
            with contextlib.suppress(psutil.Error):
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    return True
        return False

    return [n for n in cluster.nodes if n is not cluster.head and n.proc.poll() is None and runs_worker(n)]


@pytest.mark.slow
def test_finetune_workers_on_two_nodes_resume_after_losing_one(gpu_cluster, tiny_dir, tmp_path):
    """`dreamix finetune --workers 2 --spread --max-failures 1`: the two Ray Train workers run on two nodes; one
    node is lost after the first checkpoint, and the worker group restarts from that checkpoint on the nodes left."""
    live_stage_nodes(gpu_cluster)
    clip, store = shapes_clip(tmp_path / "clip.mp4", seed=4), tmp_path / "store"
    cmd = [str(BIN / "dreamix"), "finetune", str(clip), "--model", str(tiny_dir), "--store", str(store),
           "--workers", "2", "--spread", "--max-failures", "1", "--address", gpu_cluster.address,
           "--ft-steps", "20", "--checkpoint-every", "5", "--run-name", "spread"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env())
    try:
        deadline = time.monotonic() + 400
        while not list((store / "_train" / "spread").glob("checkpoint_*")):  # the first one, at step 5
            still_running(job, deadline, "the run ended (or hung) before a checkpoint")
            time.sleep(0.5)
        nodes = train_worker_nodes(gpu_cluster)
        workers = len(nodes) + any("RayTrainWorker" in " ".join(p.cmdline()) for p in gpu_cluster.head.tree())
        assert workers == 2 and nodes, "the two workers should be on two nodes"
        gpu_cluster.kill(nodes[0])
        out, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert re.search(r"^resumed from a checkpoint: .*at step \d+", out, re.M), out
    assert re.search(r"^base: 20 steps", out, re.M), out
    assert (store / out.strip().splitlines()[-1]).is_dir()  # the artifact id, alone on the last line


@pytest.mark.slow
def test_a_lost_node_nobody_replaces_stops_the_job_naming_the_resource(gpu_cluster, inputs, s3_server, s3_client,
                                                                        tiny_dir):
    live_stage_nodes(gpu_cluster)  # a test before may have lost one
    manifest = inputs("gone", 8)
    # --node-wait alone: actors that start slowly on a loaded machine keep the default start timeout (CI failed
    # when one 20 s setting was both), and the lost node is named soon after the 15 s.
    cmd = batch_cmd(gpu_cluster, s3_server, tiny_dir, manifest, "s3://multi/gone", "--run-id", "gone",
                    "--node-wait", "15")
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env())
    try:
        deadline = time.monotonic() + 400
        while _outputs(s3_client, "gone/videos/") < 2:
            still_running(job, deadline, "the job ended (or hung) before the node loss")
            time.sleep(1)
        ssr = next(n for n in gpu_cluster.nodes if n.resources == {"stage_ssr": 1} and n.proc.poll() is None)
        gpu_cluster.kill(ssr)
        lost_at = time.monotonic()
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 3, out[-2000:] + err[-2000:]
    assert time.monotonic() - lost_at < 90
    stopped = [line for line in (out + err).splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1, out[-2000:] + err[-2000:]
    assert "no live node can hold a ssr actor (CPU: 1, GPU: 1, stage_ssr: 0.001) and none joined within 15 s" \
        in stopped[0]
    assert "Traceback" not in out + err
    rows = read_results("s3://multi/gone", s3_server[1], run_id="gone").to_pylist()
    assert len(rows) >= 1 and {r["status"] for r in rows} == {"ok"}  # the rows done before the loss are recorded
