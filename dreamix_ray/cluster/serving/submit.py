"""Turning one POST into a durable queued job: fields, inputs checked and stored, then the record."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ...animate import CAMERAS
from ...config import CascadeConfig, ConfigError
from ...finetune import PRESETS
from ...request import resolve as resolve_plan
from .jobs import JobStore, new_job, shown
from .params import EDIT_PRESETS, ROUTES, TASKS, edit_request, finetune_choice, uris_of
from .settings import ServeSettings
from .uploads import ApiError, check_s3_uri, fetch_s3, inspect_media, read_form, read_json, scratch_dir, spool


def validate(model: type[BaseModel], raw: dict) -> BaseModel:
    """The fields as `model`, or a 422 naming the first bad field in one line."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; this route takes {', '.join(model.model_fields)}"
        raise ApiError(422, f"{where}: {msg}", "invalid_field") from None


async def read_request(request: Request, kind: str, settings: ServeSettings) -> tuple[BaseModel, list]:
    """(validated fields, sources): a multipart form with files, or a JSON body with s3:// URIs."""
    model, file_field, _, min_files, max_files = ROUTES[kind]
    max_files = settings.max_images if max_files is None else max_files
    ctype = request.headers.get("content-type", "").lower()
    uploads: list[UploadFile] = []
    if ctype.startswith("multipart/form-data"):
        raw: dict = {}
        for name, value in (await read_form(request, settings)).multi_items():
            if isinstance(value, str):
                raw[name] = value
            elif name == file_field:
                uploads.append(value)
            else:
                raise ApiError(400, f"unexpected file field {name!r}: this route takes its file(s) as {file_field!r}")
    elif ctype.startswith("application/json"):
        raw = await read_json(request, settings)
    else:
        raise ApiError(415, "send multipart/form-data (with a file) or application/json (with an s3:// URI)",
                       "unsupported_type")
    try:
        fields = validate(model, raw)
        uris = [check_s3_uri(u, settings.allowed_buckets) for u in uris_of(kind, fields)]
        if uploads and uris:
            raise ApiError(400, "send either a file or a URI, not both")
        count = len(uploads) + len(uris)
        if not min_files <= count <= max_files:
            what = f"'{file_field}' file(s) or URI(s)" if file_field else "files"
            want = f"exactly {min_files}" if min_files == max_files else f"{min_files} to {max_files}"
            raise ApiError(422, f"this route takes {want} {what}, got {count}", "invalid_field")
    except ApiError:
        for upload in uploads:
            await upload.close()
        raise
    return fields, uploads + uris


async def resolve(kind: str, fields: BaseModel, owner: str, settings: ServeSettings, jobs: JobStore,
                  cascade: CascadeConfig) -> dict:
    """The job's params: step caps checked, finetune / subject ids looked up, and for edits, animations and
    generations the resolved plan (request.resolve, the rule every entry point shares) stored as `edit`."""
    finetune_stages = sum(s.finetune for s in cascade.stages)
    params = fields.model_dump(exclude_none=True, exclude={"video_uri", "image_uri", "image_uris"})
    cap = settings.max_steps if kind in ("edit", "animation", "generation") else 4 * settings.max_steps
    if params.get("steps", 0) > cap:
        raise ApiError(422, f"steps: at most {cap} on this service, got {params['steps']}", "invalid_field")
    if kind in ("edit", "animation"):
        if params.get("preset") and params["preset"] not in EDIT_PRESETS:
            raise ApiError(422, f"preset: choose one of {', '.join(EDIT_PRESETS)}", "invalid_field")
        params.setdefault("finetune", EDIT_PRESETS.get(params.get("preset") or "", {}).get("finetune", "false"))
        try:
            choice, value = finetune_choice(params["finetune"])
        except ValueError as exc:
            raise ApiError(422, f"finetune: {exc}", "invalid_field") from None
        if choice == "preset":
            params.update(finetune_preset=value, finetune_weight=PRESETS[value][1] * max(1, finetune_stages))
        elif choice == "job":
            params.update(await _learned(value, owner, jobs, "finetune"))
    if kind == "animation" and params["camera"] not in CAMERAS:
        raise ApiError(422, f"camera: choose one of {', '.join(CAMERAS)}", "invalid_field")
    if kind == "generation" and params.get("subject"):
        params.update(await _learned(params["subject"], owner, jobs, "subject"))
    if kind == "finetune" and params["preset"] not in PRESETS:
        raise ApiError(422, f"preset: choose one of {', '.join(sorted(PRESETS))}", "invalid_field")
    if kind in TASKS:
        try:
            plan = resolve_plan(edit_request(kind, params), cascade)
        except ConfigError as exc:
            raise ApiError(422, str(exc), "invalid_field") from None
        params.update(strength=plan.config.strength, edit=plan.to_dict())
    return params


async def _learned(job_id: str, owner: str, jobs: JobStore, field: str) -> dict:
    """The artifact of a finished finetune / subject job of the same key."""
    job = await asyncio.to_thread(jobs.load, job_id)
    if job is None or job["owner"] != owner or job["kind"] not in ("finetune", "subject"):
        raise ApiError(422, f"{field}: no finetune or subject job {shown(job_id)} for this API key", "invalid_field")
    if job["status"] != "done":
        raise ApiError(409, f"{field}: job {job_id} is {job['status']}; use it once its status is done", "not_ready")
    return {"finetune_id": job["result"]["finetune_id"], "finetune_token": job["result"]["token"],
            "finetuned_with": job["params"].get("preset") or ("frames" if job["kind"] == "subject" else "custom")}


async def store_job(kind: str, owner: str, params: dict, sources: list, media: str | None,
                    settings: ServeSettings, jobs: JobStore) -> dict:
    """Check each input (type, header limits), then store inputs, marker and job.json, in that order."""
    scratch = scratch_dir()
    try:
        checked = []
        for i, source in enumerate(sources):
            dest = scratch / f"in{i}"
            if isinstance(source, str):
                await asyncio.to_thread(fetch_s3, source, dest, settings.max_upload_bytes)
            else:
                await asyncio.to_thread(spool, source, dest)
            checked.append(await asyncio.to_thread(inspect_media, dest, media, settings))
        inputs = [{"name": f"input{i}{c['ext']}", "media": c["media"], "probe": c["probe"]}
                  for i, c in enumerate(checked)]
        job = new_job(kind, owner, params, inputs)
        for entry, c in zip(inputs, checked):
            await asyncio.to_thread(jobs.put, job["id"], entry["name"], Path(c["path"]).read_bytes())
        # Marker before record: a crash in between leaves a marker recovery clears, never a lost job.
        await asyncio.to_thread(jobs.activate, owner, job["id"])
        await asyncio.to_thread(jobs.index, owner, job)
        await asyncio.to_thread(jobs.save, job)
        return job
    finally:
        for source in sources:
            if isinstance(source, UploadFile):
                await source.close()
        shutil.rmtree(scratch, ignore_errors=True)
