"""The real Serve app on 127.0.0.1 (tiny cascade, 1 replica per deployment, job store on a loopback S3),
called over HTTP: round trips, every bad input's 4xx, replicas killed mid-job, the web page in Chromium."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic notes from inside Ray
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
pytest.importorskip("moto")

from dreamix_ray.config import EDIT_TYPES  # noqa: E402
from dreamix_ray.video import Video, read_video, write_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY, OTHER_KEY = "test-key-alpha", "test-key-beta"
S3_CLIP = "s3://inputs/clips/clip.mp4"
LIMITS = dict(max_upload_mb=1.0, max_width=64, max_height=64, max_duration_s=10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def clip_bytes(frames: int = 16, size: int = 32, fps: float = 8.0) -> bytes:
    """A real shapes-world clip (red circle moving left on blue) as mp4 bytes."""
    from dreamix_ray.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), colour="red", shape="circle", motion="left", background="blue")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "clip.mp4")
        write_video(path, Video(render(scene, num_frames=frames, size=size, fps=fps), fps))
        return path.read_bytes()


def png_bytes(colour=(0, 200, 0), size: int = 24) -> bytes:
    from PIL import Image

    image = np.full((size, size, 3), 30, np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colour
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


class Served:
    """The running app: an HTTP client, and the Ray handles a test needs to kill replicas."""

    def __init__(self, url: str, metrics_port: int, model: Path):
        self.url, self.metrics_port, self.model = url, metrics_port, model
        self.http = httpx.Client(base_url=url, timeout=90)

    def wait(self, route: str, job_id: str, key: str = KEY, timeout: float = 240, on_poll=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.http.get(f"{route}/{job_id}", headers=auth(key)).json()
            if on_poll:
                on_poll(job)
            if job["status"] in ("done", "failed"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"{job_id} still {job['status']} after {timeout} s: {job}")

    @staticmethod
    def kill_replica(deployment: str) -> str:
        """Hard-kill the (one) replica actor of `deployment`, as a crash would."""
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in actor["name"]:
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                return actor["name"]
        raise AssertionError(f"no replica of {deployment}")


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto) on loopback with the job-store and input buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for bucket in ("dreamix-jobs", "inputs", "private"):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket="inputs", Key="clips/clip.mp4", Body=clip_bytes())
    yield client
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


_FAILED: list[str] = []


def start_ray(temp: str, metrics_port: int, attempts: int = 3) -> None:
    """A private Ray; retried because on a starved machine the raylet can miss Ray's fixed 30 s start window."""
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=8, include_dashboard=False, _temp_dir=temp, logging_level="ERROR",
                     log_to_driver=False, _metrics_export_port=metrics_port,
                     # No idle workers prestarted: they only compete with startup; 1 s metric reports for the test.
                     _system_config={"metrics_report_interval_ms": 1000, "enable_worker_prestart": False,
                                     "prestart_worker_first_driver": False})
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def served(s3, tiny_dir):
    """The whole application on a private Ray instance; keys from DREAMIX_API_KEYS like in production."""
    from ray import serve

    from dreamix_ray.cluster.serving.app import APP_NAME, build_app

    saved_keys = os.environ.get("DREAMIX_API_KEYS")
    os.environ["DREAMIX_API_KEYS"] = f"{KEY},{OTHER_KEY}"  # replicas inherit the driver's environment
    if ray.is_initialized():
        ray.shutdown()
    if _FAILED:
        pytest.fail(f"the Serve app did not start for an earlier test: {_FAILED[0]}")
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    http_port, metrics_port = free_port(), free_port()
    model = Path(temp, "model")  # the tiny cascade with a tuned strength table, as the embedded one has
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "cascade.json").read_text())
    (model / "cascade.json").write_text(json.dumps({**config, "edit_strengths": {"none": {"motion": 0.9}}}))
    try:
        start_ray(temp, metrics_port)
    except Exception as exc:
        _FAILED.append(str(exc).splitlines()[0])  # one slow start is enough; later tests fail at once
        raise
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    args = dict(model=str(model), store="s3://dreamix-jobs/serve", allowed_buckets=["inputs"], max_replicas=1,
                torch_threads=1, heartbeat_s=1.0, lease_s=4.0, recover_every_s=1.0, concurrency_per_key=3, **LIMITS)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    yield Served(f"http://127.0.0.1:{http_port}", metrics_port, model)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    os.environ.pop("DREAMIX_API_KEYS") if saved_keys is None else os.environ.__setitem__("DREAMIX_API_KEYS", saved_keys)


def test_edit_round_trip(served):
    h = served.http
    assert h.get("/healthz").json()["status"] == "ok"  # the one route without a key
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes(), "video/mp4")},
               data={"prompt": "a green square moving right on a yellow background", "strength": "0.7", "seed": "3"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    stages = set()
    job = served.wait("/v1/edits", job_id, on_poll=lambda j: stages.add(j["stage"]))
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["params"]["strength"] == 0.7 and job["params"]["seed"] == 3
    assert {"prepare", "base", "tsr", "ssr", "encode"} <= set(job["timings"]), job["timings"]
    video = h.get(job["result"]["video_url"], headers=auth())
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "out.mp4").write_bytes(video.content)
        edited = read_video(Path(tmp, "out.mp4"))
        preview = h.get(job["result"]["preview_url"], headers=auth())
        Path(tmp, "preview.mp4").write_bytes(preview.content)
        side = read_video(Path(tmp, "preview.mp4"))
    assert (edited.num_frames, edited.height, edited.width) == (8, 16, 16)  # tiny cascade: 8 frames of 16x16
    assert side.width > 2 * edited.width - 1 and side.num_frames == 8  # original | gap | edit
    sheet = h.get(job["result"]["preview_png_url"], headers=auth())
    assert sheet.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Jobs belong to their key; another key cannot see or download them.
    assert h.get(f"/v1/edits/{job_id}", headers=auth(OTHER_KEY)).status_code == 404
    assert h.get(f"/v1/edits/{job_id}/video", headers=auth(OTHER_KEY)).status_code == 404
    spec = h.get("/openapi.json").json()
    assert {"/v1/edits", "/v1/edits/{job_id}", "/v1/finetunes", "/v1/animations", "/v1/subjects",
            "/v1/generations", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/edits"]["post"]["requestBody"]["content"]
    assert h.get("/docs").status_code == 200


def test_edit_from_an_allowed_bucket(served):
    r = served.http.post("/v1/edits", headers=auth(), json={"prompt": "a red circle", "video_uri": S3_CLIP})
    assert r.status_code == 202, r.text
    assert served.wait("/v1/edits", r.json()["id"])["status"] == "done"


def test_edit_type_picks_the_tuned_strength_and_motion_moves_the_input(served):
    body = {"prompt": "a red circle moving up", "video_uri": S3_CLIP, "edit_type": "motion"}
    jobs = [served.http.post("/v1/edits", headers=auth(), json=b) for b in
            (body, {**body, "strength": 0.6}, {**body, "edit_type": "style"})]
    assert all(r.status_code == 202 for r in jobs), [r.text for r in jobs]
    done = [served.wait("/v1/edits", r.json()["id"]) for r in jobs]
    assert all(j["status"] == "done" for j in done), done
    # the cascade's table for motion; an explicit strength wins; no table entry: the rule's 0.7
    assert [j["params"]["strength"] for j in done] == [0.9, 0.6, 0.7]
    assert [j["params"]["edit"]["motion_from_input"] for j in done] == [True, True, False]


def test_the_same_request_gives_the_cli_bytes(served, tmp_path, capsys):
    """One edit through the endpoint and through `dreamix edit` (request.resolve, edit.run_stage): same mp4."""
    from dreamix_ray.cli import main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clip_bytes())
    fields = {"prompt": "a red circle moving up", "edit_type": "motion", "steps": "3", "seed": "4"}
    r = served.http.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip.read_bytes(), "video/mp4")},
                         data=fields)
    assert r.status_code == 202, r.text
    job = served.wait("/v1/edits", r.json()["id"])
    assert job["status"] == "done", job
    code = main(["edit", str(clip), "-p", fields["prompt"], "--edit-type", "motion", "--steps", "3", "--seed", "4",
                 "-o", str(tmp_path / "cli.mp4"), "--model", str(served.model), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert served.http.get(job["result"]["video_url"], headers=auth()).content == (tmp_path / "cli.mp4").read_bytes()


MP4_HEAD = b"\0\0\0\x18ftypmp42"  # what an mp4 starts with: the cap, not the sniffer, must refuse these


def _streamed_upload(size: int):
    """A multipart body without Content-Length: the cap must hold while the bytes stream in."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
           b"Content-Type: video/mp4\r\n\r\n" + MP4_HEAD)
    for _ in range(0, size, 64_000):
        yield os.urandom(64_000)
    yield b"\r\n--xyz--\r\n"


# (case, headers, request kwargs (built lazily), expected status, words in the message)
BAD = [
    ("no key", {}, lambda: dict(json={"prompt": "x"}), 401, "missing API key"),
    ("wrong key", auth("nope"), lambda: dict(json={"prompt": "x"}), 401, "not valid"),
    ("text named .mp4", auth(), lambda: dict(files={"video": ("a.mp4", b"just some text, not a video", "video/mp4")},
                                             data={"prompt": "x"}), 415, "not a video"),
    ("image sent as video", auth(), lambda: dict(files={"video": ("a.mp4", png_bytes(), "video/mp4")},
                                                 data={"prompt": "x"}), 415, "animations"),
    ("oversized upload", auth(), lambda: dict(files={"video": ("big.mp4", MP4_HEAD + os.urandom(1_200_000))},
                                              data={"prompt": "x"}), 413, "MB limit"),
    ("oversized stream", auth(), lambda: dict(content=_streamed_upload(1_300_000),
                                              headers={"content-type": "multipart/form-data; boundary=xyz"}),
     413, "MB limit"),
    ("file:// URI", auth(), lambda: dict(json={"prompt": "x", "video_uri": "file:///etc/passwd"}), 400, "only s3://"),
    ("local path", auth(), lambda: dict(json={"prompt": "x", "video_uri": "/etc/passwd"}), 400, "only s3://"),
    ("../ path", auth(), lambda: dict(json={"prompt": "x", "video_uri": "../../etc/passwd"}), 400, "only s3://"),
    ("../ in an s3 key", auth(), lambda: dict(json={"prompt": "x", "video_uri": "s3://inputs/../private/x.mp4"}),
     400, "'..'"),
    ("unlisted bucket", auth(), lambda: dict(json={"prompt": "x", "video_uri": "s3://private/x.mp4"}), 403, "not one"),
    ("strength 5", auth(), lambda: dict(json={"prompt": "x", "strength": 5, "video_uri": S3_CLIP}), 422,
     "strength must be in [0, 1]"),
    ("unknown field", auth(), lambda: dict(json={"prompt": "x", "strenght": 0.5}), 422, "unknown field"),
    ("unknown edit type", auth(), lambda: dict(json={"prompt": "x", "edit_type": "color", "video_uri": S3_CLIP}), 422,
     "edit_type must be one of motion"),
    ("over the resolution limit", auth(), lambda: dict(files={"video": ("big.mp4", clip_bytes(size=96))},
                                                       data={"prompt": "x"}), 422, "resolution limit"),
    ("over the duration limit", auth(), lambda: dict(files={"video": ("long.mp4", clip_bytes(24, 16, 2.0))},
                                                     data={"prompt": "x"}), 422, "10 s limit"),
    ("steps over the cap", auth(), lambda: dict(json={"prompt": "x", "steps": 10_000, "video_uri": S3_CLIP}), 422,
     "at most"),
    ("JSON nested 1,000 deep", auth(), lambda: dict(content=b"[" * 1000 + b"]" * 1000,
                                                    headers={"content-type": "application/json"}), 400, "nested"),
    ("JSON nested 30,000 deep", auth(), lambda: dict(content=b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
                                                     headers={"content-type": "application/json"}), 400, "nested"),
    ("unknown job", auth(), "/v1/edits/ed-000000000000000000000000", 404, "no edit job"),
    ("job id with a newline", auth(), "/v1/edits/ed-000000000000000000000000%0A", 404, "no edit job"),
    ("10 kB job id", auth(), "/v1/edits/" + "e" * 10_000, 404, "eeee..."),
    ("cancel an unknown job", auth(), ("POST", "/v1/generations/gn-000000000000000000000000/cancel"), 404,
     "no generation job"),
    ("bad list cursor", auth(), "/v1/jobs?cursor=../../x", 400, "next_cursor"),
    ("list limit 0", auth(), "/v1/jobs?limit=0", 422, "limit"),
]


@pytest.mark.parametrize("case,headers,make,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(served, case, headers, make, status, words):
    if isinstance(make, (str, tuple)):
        method, route = make if isinstance(make, tuple) else ("GET", make)
        r = served.http.request(method, route, headers=headers)
    else:
        kwargs = make()
        r = served.http.post("/v1/edits", headers={**headers, **kwargs.pop("headers", {})}, **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert words in body["detail"], body
    assert "Traceback" not in r.text and "\n" not in body["detail"] and len(body["detail"]) < 400
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_replicas_killed_mid_job_never_lose_it(served):
    """Kill the TSR replica while it samples, then the ingress that runs the job: it still finishes."""
    h = served.http
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes())},
               data={"prompt": "a blue square", "strength": "1", "steps": "60"})
    assert r.status_code == 202, r.text
    job_id, killed = r.json()["id"], []
    replica_before = h.get("/healthz").json()["replica"]

    def on_poll(job):
        if job["status"] != "running":
            return
        if job["stage"] == "tsr" and not killed:
            killed.append(served.kill_replica("stage-tsr"))
        elif job["stage"] == "ssr" and len(killed) == 1:
            killed.append(served.kill_replica("ingress"))

    job = served.wait("/v1/edits", job_id, timeout=300, on_poll=on_poll)
    assert len(killed) == 2, f"the job finished before both kills: {killed}"
    assert job["status"] == "done", job  # retried on a fresh TSR replica, taken over by the new ingress
    assert job["attempts"] >= 2 and job["progress"] == 1.0
    assert h.get("/healthz").json()["replica"] != replica_before  # a different replica answers from the store
    assert h.get(job["result"]["video_url"], headers=auth()).status_code == 200


def test_per_key_concurrency_limit(served):
    """The 4th unfinished job of a key is 429; every accepted one still completes."""
    h, ids = served.http, []
    for _ in range(3):
        r = h.post("/v1/generations", headers=auth(OTHER_KEY), json={"prompt": "a red circle", "steps": 40})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    r = h.post("/v1/generations", headers=auth(OTHER_KEY), json={"prompt": "a red circle"})
    assert r.status_code == 429 and "limit is 3" in r.json()["detail"] and r.headers["retry-after"]
    other = h.post("/v1/generations", headers=auth(), json={"prompt": "x", "steps": 1})
    assert other.status_code == 202  # the limit is per key
    assert all(served.wait("/v1/generations", i, key=OTHER_KEY)["status"] == "done" for i in ids)
    assert served.wait("/v1/generations", other.json()["id"])["status"] == "done"


def test_cancel_stops_a_running_job_and_frees_its_slot(served):
    """Cancel a running job: it ends cancelled, its runner stops writing, and the key's slot is free again."""
    h, key = served.http, OTHER_KEY
    ids = []
    for _ in range(3):  # the fixture's concurrency_per_key
        r = h.post("/v1/generations", headers=auth(key), json={"prompt": "a red circle", "steps": 250})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert h.post("/v1/generations", headers=auth(key), json={"prompt": "x"}).status_code == 429
    deadline = time.time() + 120
    while h.get(f"/v1/generations/{ids[0]}", headers=auth(key)).json()["stage"] in ("queued", "starting"):
        assert time.time() < deadline, "the job never started running"
        time.sleep(0.3)
    r = h.post(f"/v1/generations/{ids[0]}/cancel", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert h.post(f"/v1/generations/{ids[0]}/cancel", headers=auth(key)).json()["status"] == "cancelled"  # again: ok
    first = h.get(f"/v1/generations/{ids[0]}", headers=auth(key)).json()
    time.sleep(3)  # > heartbeat_s: a runner still going would have rewritten the record by now
    assert h.get(f"/v1/generations/{ids[0]}", headers=auth(key)).json() == first
    assert first["status"] == "cancelled" and first["error"] == "cancelled by the caller" and first["progress"] < 1
    late = h.post("/v1/generations", headers=auth(key), json={"prompt": "x", "steps": 1})
    assert late.status_code == 202, late.text  # the cancelled job's slot is free
    for job_id in ids[1:]:
        assert h.post(f"/v1/generations/{job_id}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    assert served.wait("/v1/generations", late.json()["id"], key=key)["status"] == "done"
    r = h.post(f"/v1/generations/{late.json()['id']}/cancel", headers=auth(key))
    assert r.status_code == 409 and "already done" in r.json()["detail"]
    assert h.get(f"/v1/generations/{ids[0]}/video", headers=auth(key)).status_code == 409
    assert h.post(f"/v1/generations/{ids[1]}/cancel", headers=auth()).status_code == 404  # not this key's job
    paths = h.get("/openapi.json").json()["paths"]
    assert all(f"/v1/{kind}s/{{job_id}}/cancel" in paths for kind in
               ("edit", "animation", "generation", "finetune", "subject"))


def test_jobs_list_is_the_callers_own_newest_first_in_pages(served):
    h = served.http
    mine = [h.post("/v1/generations", headers=auth(), json={"prompt": "x", "steps": 1}).json()["id"]
            for _ in range(3)]
    theirs = h.post("/v1/generations", headers=auth(OTHER_KEY), json={"prompt": "x", "steps": 1}).json()["id"]
    seen, cursor = [], None
    for _ in range(50):
        page = h.get("/v1/jobs", headers=auth(), params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["jobs"]) <= 2
        seen += body["jobs"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [j["id"] for j in seen]
    assert len(ids) == len(set(ids)) and theirs not in ids
    assert ids[:3] == mine[::-1]  # newest first
    assert all(j["status"] in ("queued", "running", "done", "failed", "cancelled") for j in seen)
    assert "owner" not in seen[0] and seen[0]["kind"] == "generation"
    for job_id in mine:
        served.wait("/v1/generations", job_id)
    served.wait("/v1/generations", theirs, key=OTHER_KEY)


def test_page_and_docs_send_security_headers_and_load_nothing_from_outside(served):
    h = served.http
    for route in ("/", "/docs", "/web/app.js", "/v1/info"):
        r = h.get(route, headers=auth())
        assert r.status_code == 200, (route, r.text[:200])
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    docs = h.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        r = h.get(asset)
        assert r.status_code == 200 and len(r.content) > 50, asset
    assert "<script>" not in docs  # every script is a file: the CSP forbids inline ones
    assert b"SwaggerUIBundle" in h.get("/docs-assets/swagger-ui-bundle.js").content[:1000]


def test_finetune_animation_subject_generation(served):
    """Finetune once and edit by its id; animate an image; learn a subject and generate it."""
    h = served.http
    r = h.post("/v1/finetunes", headers=auth(), files={"video": ("clip.mp4", clip_bytes())},
               data={"preset": "video", "steps": "2"})
    assert r.status_code == 202, r.text
    finetune = served.wait("/v1/finetunes", r.json()["id"])
    assert finetune["status"] == "done" and finetune["result"]["finetune_id"].startswith("ft-"), finetune
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes())},
               data={"prompt": "a blue square", "finetune": finetune["id"], "strength": "0.95"})
    edit = served.wait("/v1/edits", r.json()["id"])
    assert edit["status"] == "done" and edit["params"]["finetune_id"] == finetune["result"]["finetune_id"]

    r = h.post("/v1/animations", headers=auth(), files={"image": ("still.png", png_bytes())},
               data={"prompt": "a green square", "camera": "pan-left"})
    animation = served.wait("/v1/animations", r.json()["id"])
    assert animation["status"] == "done" and "preview_url" in animation["result"], animation

    images = [("images", (f"{i}.png", png_bytes((200, 20 * i, 0)))) for i in range(2)]
    r = h.post("/v1/subjects", headers=auth(), files=images, data={"token": "zorp", "steps": "2"})
    subject = served.wait("/v1/subjects", r.json()["id"])
    assert subject["status"] == "done", subject
    r = h.post("/v1/generations", headers=auth(), json={"prompt": "a zorp on grass", "subject": subject["id"]})
    generation = served.wait("/v1/generations", r.json()["id"])
    assert generation["status"] == "done" and generation["params"]["finetune_token"] == "zorp"
    assert h.get(f"/v1/generations/{generation['id']}/preview", headers=auth()).status_code == 404


def chromium(tmp_path: Path):
    """Debian's headless Chromium through selenium; every page records its CSP violations in window.csp."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1300"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.csp = []; document.addEventListener('securitypolicyviolation', "
        "e => window.csp.push(e.violatedDirective + ' ' + e.blockedURI));")})
    return browser


def test_docs_render_from_local_assets_under_the_csp(served, tmp_path):
    """Swagger UI draws every route in Chromium, from this origin only, with no CSP violation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium(tmp_path)
    try:
        browser.get(served.url + "/docs")
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 20)
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        violations = browser.execute_script("return window.csp")
    finally:
        browser.quit()
    assert {"/v1/edits", "/v1/jobs", "/v1/edits/{job_id}/cancel"} <= {p.replace("\u200b", "") for p in paths}
    assert loaded and all(url.startswith(served.url + "/") for url in loaded), loaded
    assert violations == []


def test_web_page_in_headless_chromium(served, tmp_path):
    """Upload, watch progress, see original | edit, download: driven in Debian's Chromium."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium(tmp_path)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clip_bytes())
    try:
        browser.get(served.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#preset option"))
        edit_types = browser.execute_script("return [...document.querySelectorAll('#edit-type option')].map(o => o.value)")
        assert edit_types == ["", *EDIT_TYPES]  # the model's list, from /v1/info
        browser.find_element(By.ID, "file").send_keys(str(clip))
        browser.find_element(By.ID, "prompt").send_keys("a green square moving right")
        browser.find_element(By.ID, "run").click()
        state = WebDriverWait(browser, 180, poll_frequency=0.2).until(
            lambda b: b.execute_script("return document.body.dataset.state"))
        assert state == "done", browser.find_element(By.ID, "error").text
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
        link = browser.find_element(By.ID, "download")
        assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
        assert link.get_attribute("download").endswith(".mp4")
        # Both videos decoded in the browser: the upload on the left, the edit (16x16) on the right.
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return document.getElementById('edited').readyState >= 2 && "
            "document.getElementById('original-media').readyState >= 2"))
        assert browser.execute_script("return document.getElementById('edited').videoWidth") == 16
        browser.execute_script("for (const id of ['edited', 'original-media']) document.getElementById(id).pause()")
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        rects = {i: browser.find_element(By.ID, i).rect for i in ("original-media", "edited")}
        ratio = browser.execute_script("return window.devicePixelRatio")
        assert browser.execute_script("return window.csp") == []  # the page works under its CSP
    finally:
        browser.quit()
    from PIL import Image

    page = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def crop(rect):
        x, y, w, h = (int(rect[k] * ratio) for k in ("x", "y", "width", "height"))
        return page[y:y + h, x:x + w]

    original, edited = crop(rects["original-media"]), crop(rects["edited"])
    assert ((original[..., 2] > 120) & (original[..., 0] < 100)).mean() > 0.3  # the blue background is on screen
    assert edited.std() > 10 and edited.size > 100 * 100 * 3  # the edit is drawn (not a blank box), side by side
    assert rects["edited"]["x"] > rects["original-media"]["x"] + rects["original-media"]["width"] - 1


def test_prometheus_metrics_are_exported(served):
    """Serve's own metrics and the app's job counters reach the node's Prometheus endpoint."""
    r = served.http.post("/v1/generations", headers=auth(), json={"prompt": "a red circle", "steps": 1})
    assert served.wait("/v1/generations", r.json()["id"])["status"] == "done"
    assert served.http.post("/v1/generations", headers=auth(), json={"prompt": ""}).status_code == 422
    names = ("serve_num_http_requests", "dreamix_jobs_accepted", "dreamix_requests_rejected", "dreamix_jobs_finished")
    deadline, text = time.time() + 30, ""
    while time.time() < deadline and not all(n in text for n in names):
        time.sleep(1)  # metrics are reported to the node's exporter every second here
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
    assert [n for n in names if n not in text] == []


def test_serve_config_and_rayservice_manifest_are_valid():
    """serve/config.yaml and the RayService's serveConfigV2 parse as Serve configs naming our deployments."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    expected = {"ingress", "stage-base", "stage-tsr", "stage-ssr", "finetune"}
    local = ServeDeploySchema(**yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    docs = list(yaml.safe_load_all((REPO / "infra" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    cluster = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    for config in (local, cluster):
        app = config.applications[0]
        assert app.import_path == "dreamix_ray.cluster.serving.app:build_app"
        assert {d.name for d in app.deployments} == expected
        assert all(d.autoscaling_config and d.ray_actor_options for d in app.deployments)


@pytest.fixture()
def served_wan(served, tmp_path_factory):
    """The same application on the tiny Wan cascade, a second Serve app under /wan on the same Ray instance, with
    its own job store (the first app's recovery loop must never take its jobs); deleted after its test, so its
    replicas do not stay beside the apps of later tests."""
    from ray import serve
    from wan_repo import tiny_wan_cascade

    from dreamix_ray.cluster.serving.app import build_app

    model = tiny_wan_cascade(tmp_path_factory.mktemp("wan"))
    args = dict(model=str(model), store="s3://dreamix-jobs/serve-wan", allowed_buckets=["inputs"], max_replicas=1,
                torch_threads=1, heartbeat_s=1.0, lease_s=4.0, recover_every_s=1.0, stage_num_cpus=0.5,
                **LIMITS)
    serve.run(build_app(args), name="dreamix-wan", route_prefix="/wan")
    yield Served(served.url + "/wan", served.metrics_port, model)
    serve.delete("dreamix-wan")


def test_a_wan_cascade_serves_edits_and_finetunes(served_wan):
    """The same endpoint over the Wan cascade: an edit round trip, then finetune (LoRA, mixed) and edit by its id:
    the same request (the token in the prompt, so only the adapter differs) gives another video."""
    h = served_wan.http
    fields = {"prompt": "naia a red cat", "strength": "0.8", "seed": "3", "guidance": "3"}
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes())}, data=fields)
    assert r.status_code == 202, r.text
    plain = served_wan.wait("/v1/edits", r.json()["id"])
    assert plain["status"] == "done" and {"base", "encode"} <= set(plain["timings"]), plain
    r = h.post("/v1/finetunes", headers=auth(), files={"video": ("clip.mp4", clip_bytes())},
               data={"preset": "mixed", "steps": "6"})
    assert r.status_code == 202, r.text
    finetune = served_wan.wait("/v1/finetunes", r.json()["id"])
    assert finetune["status"] == "done" and finetune["result"]["finetune_id"].startswith("ft-"), finetune
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes())},
               data={**fields, "finetune": finetune["id"]})
    tuned = served_wan.wait("/v1/edits", r.json()["id"])
    assert tuned["status"] == "done" and tuned["params"]["finetune_id"] == finetune["result"]["finetune_id"]
    videos = []
    for job in (plain, tuned):
        got = h.get(job["result"]["video_url"], headers=auth())
        assert got.status_code == 200, (job["result"]["video_url"], got.status_code)
        videos.append(got.content)
    assert videos[0] != videos[1]  # x264 is deterministic here (tests/test_determinism.py): pixels differ
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "out.mp4").write_bytes(videos[1])
        assert read_video(Path(tmp, "out.mp4")).frames.shape == (5, 32, 32, 3)


@pytest.fixture(scope="module")
def served_ltx(served, tmp_path_factory):
    """The same application on the tiny LTX cascade (base 33 frames of 32x32 -> latent SSR to 64x64, whose two
    chunks of latent frames are units of their own), a Serve app under /ltx on the same Ray instance with its own
    job store."""
    from ltx_repo import tiny_ltx_cascade
    from ray import serve

    from dreamix_ray.cluster.serving.app import build_app

    model = tiny_ltx_cascade(tmp_path_factory.mktemp("ltx"), frames=33)
    args = dict(model=str(model), store="s3://dreamix-jobs/serve-ltx", allowed_buckets=["inputs"], max_replicas=1,
                torch_threads=1, heartbeat_s=1.0, lease_s=4.0, recover_every_s=1.0, stage_num_cpus=0.25,
                **LIMITS)
    serve.run(build_app(args), name="dreamix-ltx", route_prefix="/ltx")
    yield Served(served.url + "/ltx", served.metrics_port, model)
    serve.delete("dreamix-ltx")


def test_an_ltx_cascade_serves_edits_equal_to_edit_in_process(served_ltx, tmp_path):
    """Base -> latent SSR through the endpoint (latents in the job store between the stages, the SSR's chunks with
    their halo as separate units): the mp4 is edit()'s in this process, byte for byte."""
    import torch

    from dreamix_ray.edit import edit
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.request import EditPlan, EditRequest, resolve

    h = served_ltx.http
    r = h.post("/v1/edits", headers=auth(), files={"video": ("clip.mp4", clip_bytes(), "video/mp4")},
               data={"prompt": "a red cat moving left", "strength": "0.7", "seed": "3"})
    assert r.status_code == 202, r.text
    job = served_ltx.wait("/v1/edits", r.json()["id"])
    assert job["status"] == "done", job
    assert {"prepare", "base", "ssr", "encode"} <= set(job["timings"]) and "tsr" not in job["timings"], job
    got = h.get(f"/v1/edits/{job['id']}/video", headers=auth())
    assert got.status_code == 200, got.text
    cascade = Cascade.from_pretrained(served_ltx.model)
    plan = resolve(EditRequest(prompt="a red cat moving left", strength=0.7, seed=3), cascade.config)
    assert EditPlan.from_dict(job["params"]["edit"], cascade.config) == plan and len(plan.stages[-1].chunks) == 2  # guidance: the cascade's 3
    (tmp_path / "clip.mp4").write_bytes(clip_bytes())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas run (torch_threads=1)
    try:
        expected = edit(read_video(tmp_path / "clip.mp4"), "a red cat moving left", plan, cascade)
    finally:
        torch.set_num_threads(threads)
    assert expected.frames.shape == (33, 64, 64, 3)
    assert got.content == write_video(tmp_path / "expected.mp4", expected).read_bytes()
    # What passed between the replicas: the base's latents (8 channels x 9 latent frames x 2 x 2), and the SSR's two
    # chunks as pixel frames (1 + 7 x 4 and 4; each chunk decoded its halo frame too and dropped its pixels).
    from dreamix_ray.cluster.serving.jobs import JobStore
    from dreamix_ray.cluster.serving.workers import npy_load
    from dreamix_ray.storage import ArtifactStore

    store = JobStore(ArtifactStore("s3://dreamix-jobs/serve-ltx"))
    shapes = [npy_load(store.get(job["id"], name)).shape for name in ("base.npy", "ssr-c0.npy", "ssr-c1.npy")]
    assert shapes == [(1, 8, 9, 2, 2), (1, 29, 64, 64, 3), (1, 4, 64, 64, 3)], shapes
