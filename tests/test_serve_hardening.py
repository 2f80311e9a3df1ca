"""`dreamix serve` and `dreamix batch` as a user runs them, on a machine where `ray start --head` already runs.

They start a private Ray anyway (one line says so, no traceback); the server's whole process tree
listens on loopback only; slow clients are cut off (headers, body, idle keep-alive) and a stalled
upload frees its key's slot; jobs stored under the old unsalted owner ids are moved to the HMAC ones.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
httpx = pytest.importorskip("httpx")
pytest.register_assert_rewrite("conftest_batch")
from conftest_batch import BIN, free_port, shapes_clip  # noqa: E402

pytest_plugins = ["conftest_batch"]  # the session's Ray head (ray_cluster), the cluster these commands must not join

KEY = "hardening-key"
TIMEOUTS = ["--header-timeout", "2", "--body-timeout", "2", "--body-min-rate", "1000", "--idle-timeout", "3"]
LEGACY_JOB = "ed-" + "a" * 24


@pytest.fixture(scope="module")
def head(ray_cluster):
    """A running `ray start --head` cluster (the session's, conftest_batch.ray_cluster) that `ray.init()` in the
    commands under test would find and join.

    `ray start` records its address in its temp dir; the commands get RAY_TMPDIR pointing there (instead of
    /tmp/ray), so other Ray users of this machine never see this cluster.
    """
    address, _, temp = ray_cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    tmpdir = tempfile.mkdtemp(prefix="dxh")
    os.symlink(temp, Path(tmpdir, "ray"))
    assert Path(tmpdir, "ray", "ray_current_cluster").is_file()
    env.update(RAY_TMPDIR=tmpdir, DREAMIX_API_KEYS=KEY, DS_ACCELERATOR="cpu")
    yield {"port": ":" + address.rsplit(":", 1)[1], "env": env}  # ray start records the node's IP, not 127.0.0.1
    shutil.rmtree(tmpdir, ignore_errors=True)


def ray_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ray: ")]


def test_batch_without_address_starts_a_private_cluster(head, tmp_path, tiny_dir):
    clip = shapes_clip(tmp_path / "clip.mp4", seed=0)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"id": "r0", "video": str(clip), "prompt": "a blue circle", "seed": 1}) + "\n")
    cmd = [str(BIN / "dreamix"), "batch", str(manifest), "--output-prefix", str(tmp_path / "out"),
           "--model", str(tiny_dir), "--quiet"]  # the default layout, fused: one actor runs the cascade
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=head["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(fused): 1 outputs: 1 done" in done.stdout, done.stdout
    lines = ray_lines(done.stderr)
    assert len(lines) == 1 and "private local cluster" in lines[0] and head["port"] in lines[0], lines
    assert "Traceback" not in done.stderr


def _legacy_store(root: Path) -> None:
    """A store as the pre-HMAC service left it: one finished edit owned by sha256(key)[:15]."""
    legacy = "k" + hashlib.sha256(KEY.encode()).hexdigest()[:15]
    now = time.time() - 60
    job = {"id": LEGACY_JOB, "kind": "edit", "owner": legacy, "status": "done", "stage": "done", "progress": 1.0,
           "timings": {}, "created_at": now, "updated_at": now, "started_at": now, "finished_at": now,
           "heartbeat": now, "attempts": 1, "runner": None, "error": None, "params": {"prompt": "old"},
           "inputs": [], "result": {}}
    Path(root, "jobs", LEGACY_JOB).mkdir(parents=True)
    Path(root, "jobs", LEGACY_JOB, "job.json").write_text(json.dumps(job))


@pytest.fixture(scope="module")
def server(head, tiny_dir, tmp_path_factory):
    """`dreamix serve --host 127.0.0.1` in its own session, with short timeouts; stopped with SIGTERM."""
    store, port = tmp_path_factory.mktemp("store"), free_port()
    _legacy_store(store)
    logs = tmp_path_factory.mktemp("logs")
    out, err = open(logs / "out", "w"), open(logs / "err", "w")
    cmd = [str(BIN / "dreamix"), "serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_dir),
           "--store", str(store), *TIMEOUTS]
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=head["env"], start_new_session=True)
    deadline = time.monotonic() + 600
    while "dreamix serving on" not in (logs / "out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"dreamix serve did not start: {(logs / 'err').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "store": store, "logs": logs}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_serve_starts_a_private_cluster_next_to_a_running_one(server, head):
    err = (server["logs"] / "err").read_text()
    lines = ray_lines(err)
    assert len(lines) == 1 and "private local cluster" in lines[0] and head["port"] in lines[0], lines
    assert "Traceback" not in err
    assert httpx.get(server["url"] + "/healthz", timeout=30).json()["status"] == "ok"


def test_every_socket_of_the_server_process_tree_is_on_loopback(server):
    root = psutil.Process(server["proc"].pid)
    tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    names = {tree[c.pid].name() for c in listening}
    # Ray's GCS and raylet, the Serve replicas' gRPC servers and the HTTP proxy are all in the tree.
    assert {"gcs_server", "raylet"} <= names and any(c.laddr.port == server["port"] for c in listening), names

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    wide = [(tree[c.pid].name(), c.laddr.ip, c.laddr.port) for c in listening if not loopback(c.laddr.ip)]
    assert wide == [], wide


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_unfinished_headers_and_idle_connections_are_closed(server):
    start = time.monotonic()
    with _connect(server["port"]) as half:
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        answer = _read_all(half)
    assert answer.startswith(b"HTTP/1.1 408") and b'"error": "timeout"' in answer, answer
    assert 1.5 < time.monotonic() - start < 8
    start = time.monotonic()
    with _connect(server["port"]) as silent:
        assert _read_all(silent) == b""  # a connection that sends nothing is closed without an answer
    assert 1.5 < time.monotonic() - start < 8
    with _connect(server["port"]) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = idle.recv(65536)
        start = time.monotonic()
        assert first.startswith(b"HTTP/1.1 200") and _read_all(idle).count(b"HTTP/1.1") == 0
    assert 2 < time.monotonic() - start < 9  # --idle-timeout 3


def _stalled_upload(port: int) -> socket.socket:
    """A multipart edit upload that sends its headers and the first bytes of its body, then stops."""
    body = (b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na red circle\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="video"; filename="a.mp4"\r\n\r\n\0\0\0\x18ftypmp42')
    sock = _connect(port)
    sock.sendall(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n" + body)
    return sock


def test_trickled_and_stalled_uploads_are_cut_off_and_free_their_slots(server):
    h = httpx.Client(base_url=server["url"], timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    stalled = [_stalled_upload(server["port"]) for _ in range(4)]  # the default concurrency_per_key
    try:
        # 30 s for the proxy to take the four uploads in (a loaded run needed more than 10); they hold their
        # slots for --body-timeout 2 plus 1 s per 1000 declared bytes, far longer
        deadline = time.monotonic() + 30
        while (r := h.post("/v1/generations", json={"prompt": ""})).status_code != 429:
            assert time.monotonic() < deadline, f"the stalled uploads never took the key's slots: {r.text}"
            time.sleep(0.2)
        answers = [_read_all(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") and b"too slowly" in a for a in answers), answers[0][:300]
    r = h.post("/v1/generations", json={"prompt": ""})
    assert r.status_code == 422, r.text  # admitted again (and refused for its empty prompt)

    start = time.monotonic()
    with _stalled_upload(server["port"]) as trickle:  # 3 bytes a second
        trickle.settimeout(1 / 3)
        answer = b""
        while time.monotonic() - start < 60:
            try:
                trickle.sendall(b"\0")
                chunk = trickle.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - start < 15  # --body-timeout 2 plus 1 s per 1000 bytes


def test_jobs_of_the_old_owner_ids_are_migrated(server):
    store = server["store"]
    secret = (store / "service" / "owner-secret").read_bytes().strip()
    assert len(secret) == 64  # generated on first start and kept in the store
    h = httpx.Client(base_url=server["url"], timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    r = h.get(f"/v1/edits/{LEGACY_JOB}")
    assert r.status_code == 200 and r.json()["params"]["prompt"] == "old", r.text
    stored = json.loads((store / "jobs" / LEGACY_JOB / "job.json").read_text())
    assert stored["owner"] == "o" + hmac.new(secret, KEY.encode(), hashlib.sha256).hexdigest()[:24]
    assert LEGACY_JOB in [j["id"] for j in h.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
