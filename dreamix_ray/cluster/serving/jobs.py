"""Durable job records in the artifact store: jobs/{id}/job.json, inputs, stage outputs, results.

Any replica reads any job from the store, so a status call never depends on which replica
accepted the job; `jobs-active/{owner}/{id}` markers list unfinished jobs for recovery and
for the per-key concurrency limit; `jobs-by-owner/{owner}/{newest-first key}` list a key's jobs.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from pyarrow import fs as pafs

from ...storage import ArtifactStore, StorageError, filesystem

JOBS, ACTIVE, BY_OWNER = "jobs", "jobs-active", "jobs-by-owner"
# Finetune jobs are "fn-": "ft-" names the finetuned artifacts they produce.
KINDS = {"edit": "ed", "animation": "an", "generation": "gn", "finetune": "fn", "subject": "sj"}
STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
JOB_ID = re.compile(r"(ed|an|gn|fn|sj)-[0-9a-f]{24}")  # always fullmatch: `$` would let "...\n" through
# A listing entry: 10**13 - created ms (so names sort newest first), then the job id.
ENTRY = re.compile(r"[0-9]{13}-(ed|an|gn|fn|sj)-[0-9a-f]{24}")
JOB_FILE, CANCEL_FILE = "job.json", "cancel"
MIGRATED = "owners-migrated"


def shown(job_id: str, limit: int = 40) -> str:
    """A requested id as quoted in an error: bounded, so a 10 kB id is not echoed back."""
    text = str(job_id)
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
    view["placement"] = job.get("placement", {})  # unit label -> the Ray node ids that ran it
    view["params"] = {k: v for k, v in job["params"].items() if k != "finetune_weight"}
    view["result"] = {k: v for k, v in result.items() if k not in ("video", "preview", "preview_png")}
    return view


class JobStore:
    """Job records, their files and the active-job markers, on an ArtifactStore."""

    def __init__(self, store: ArtifactStore):
        self.store = store

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None

    def _key(self, job_id: str) -> str:
        if not self.valid_id(job_id):  # ids reach store paths: never let "../" or "/" through
            raise StorageError(f"{shown(job_id)} is not a job id")
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

    def cancel(self, job: dict) -> None:
        """Mark a job cancelled: its record, a cancel file its runner (on any replica) watches, no active marker."""
        self.put(job["id"], CANCEL_FILE, b"")
        job.update(status="cancelled", stage="cancelled", error="cancelled by the caller", finished_at=time.time())
        self.save(job)
        self.deactivate(job["owner"], job["id"])

    def cancelled(self, job_id: str) -> bool:
        return self.has(job_id, CANCEL_FILE)

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

    # -------------------------------------------------------------- listing by owner

    def index(self, owner: str, job: dict) -> None:
        entry = f"{10**13 - int(job['created_at'] * 1000):013d}-{job['id']}"
        self.store.put(f"{BY_OWNER}/{owner}", entry, b"")

    def page(self, owner: str, limit: int, cursor: str | None = None) -> tuple[list[str], str | None]:
        """Up to `limit` job ids of `owner`, newest first, after `cursor`; and the next page's cursor (or None)."""
        fs, path = filesystem(self.store.uri(f"{BY_OWNER}/{owner}"), self.store.s3)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(n for n in (i.base_name for i in infos if i.type == pafs.FileType.File) if ENTRY.fullmatch(n))
        if cursor:
            names = [n for n in names if n > cursor]
        return [n[14:] for n in names[:limit]], (names[limit - 1] if len(names) > limit else None)

    def job_ids(self) -> list[str]:
        fs, path = filesystem(self.store.uri(JOBS), self.store.s3)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and self.valid_id(i.base_name))

    def migrate_owners(self, legacy: dict[str, str]) -> int:
        """Once per store: jobs of an old owner id (`legacy`: old -> new) move to the new one, with their active
        markers, and every job gets its listing entry. Returns the number of jobs moved."""
        if self.store.has("service", MIGRATED):
            return 0
        moved = 0
        for job_id in self.job_ids():
            job = self.load(job_id)
            if job is None:
                continue
            if job["owner"] in legacy:
                old, job["owner"] = job["owner"], legacy[job["owner"]]
                self.save(job)
                if self.store.has(f"{ACTIVE}/{old}", job_id):
                    self.activate(job["owner"], job_id)
                    self.deactivate(old, job_id)
                moved += 1
            self.index(job["owner"], job)
        self.store.put("service", MIGRATED, json.dumps({"moved": moved, "at": time.time()}).encode())
        return moved
