"""Durable job records in the artifact store: jobs/{id}/job.json, inputs, stage outputs, results.

Any replica reads any job from the store, so a status call never depends on which replica
accepted the job; `jobs-active/{owner}/{id}` markers list unfinished jobs for recovery and
for the per-key concurrency limit.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from pyarrow import fs as pafs

from ...storage import ArtifactStore, StorageError, filesystem

JOBS, ACTIVE = "jobs", "jobs-active"
# Finetune jobs are "fn-": "ft-" names the finetuned artifacts they produce.
KINDS = {"edit": "ed", "animation": "an", "generation": "gn", "finetune": "fn", "subject": "sj"}
STATUSES = ("queued", "running", "done", "failed")
JOB_ID = re.compile(r"^(ed|an|gn|fn|sj)-[0-9a-f]{24}$")
JOB_FILE = "job.json"


def new_job(kind: str, owner: str, params: dict, inputs: list[dict]) -> dict:
    """A fresh queued job record; `inputs` name the files stored beside it."""
    now = time.time()
    return {"id": f"{KINDS[kind]}-{uuid.uuid4().hex[:24]}", "kind": kind, "owner": owner, "status": "queued",
            "stage": "queued", "progress": 0.0, "timings": {}, "created_at": now, "updated_at": now,
            "started_at": None, "finished_at": None, "heartbeat": now, "attempts": 0, "runner": None,
            "error": None, "params": params, "inputs": inputs, "result": {}}


def public_view(job: dict, base_url: str) -> dict:
    """What a client sees: no owner, runner or heartbeat internals."""
    route = f"{base_url}/v1/{job['kind']}s/{job['id']}"
    view = {k: job[k] for k in ("id", "kind", "status", "stage", "progress", "timings", "created_at", "updated_at",
                                "started_at", "finished_at", "attempts", "error", "params")}
    result = dict(job.get("result") or {})
    if job["status"] == "done" and "video" in result:
        result["video_url"] = f"{route}/video"
        if "preview" in result:
            result["preview_url"] = f"{route}/preview"
            result["preview_png_url"] = f"{route}/preview?format=png"
    view["params"] = {k: v for k, v in job["params"].items() if k != "finetune_weight"}
    view["result"] = {k: v for k, v in result.items() if k not in ("video", "preview", "preview_png")}
    return view


class JobStore:
    """Job records, their files and the active-job markers, on an ArtifactStore."""

    def __init__(self, store: ArtifactStore):
        self.store = store

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return bool(JOB_ID.match(job_id or ""))

    def _key(self, job_id: str) -> str:
        if not self.valid_id(job_id):  # ids reach store paths: never let "../" or "/" through
            raise StorageError(f"{job_id!r} is not a job id")
        return f"{JOBS}/{job_id}"

    def load(self, job_id: str) -> dict | None:
        """The job record, None if there is none; a store that cannot be read raises (OSError)."""
        if not self.valid_id(job_id):
            return None
        fs, path = filesystem(self.uri(job_id, JOB_FILE), self.store.s3)
        for attempt in range(4):
            try:
                with fs.open_input_stream(path) as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            try:
                return json.loads(data)
            except ValueError:
                # pyarrow reads S3 by size-then-range: a record replaced mid-read comes back cut; read again.
                time.sleep(0.05 * (attempt + 1))
        raise OSError(f"job {job_id}'s record keeps changing while it is read")

    def save(self, job: dict) -> None:
        job["updated_at"] = time.time()
        self.store.put(self._key(job["id"]), JOB_FILE, json.dumps(job, indent=1).encode())

    def put(self, job_id: str, name: str, data: bytes) -> None:
        self.store.put(self._key(job_id), name, data)

    def get(self, job_id: str, name: str) -> bytes:
        return self.store.get(self._key(job_id), name)

    def has(self, job_id: str, name: str) -> bool:
        return self.store.has(self._key(job_id), name)

    def uri(self, job_id: str, name: str) -> str:
        return self.store.uri(self._key(job_id), name)

    # -------------------------------------------------------------- active markers

    def activate(self, owner: str, job_id: str) -> None:
        self.store.put(f"{ACTIVE}/{owner}", job_id, b"")

    def deactivate(self, owner: str, job_id: str) -> None:
        fs, path = filesystem(self.store.uri(f"{ACTIVE}/{owner}", job_id), self.store.s3)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    def active(self, owner: str | None = None) -> list[tuple[str, str, float]]:
        """(owner, job id, marker mtime) of unfinished jobs, of one owner or of all."""
        root = self.store.uri(f"{ACTIVE}/{owner}") if owner else self.store.uri(ACTIVE)
        fs, path = filesystem(root, self.store.s3)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            parts = info.path.rstrip("/").split("/")
            if len(parts) >= 2 and self.valid_id(parts[-1]):
                mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
                out.append((parts[-2], parts[-1], mtime))
        return out
