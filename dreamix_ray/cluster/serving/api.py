"""The REST API (OpenAPI at /docs) and the web page; every error is one line of JSON."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...animate import CAMERAS
from ...config import EDIT_TYPES
from ...errors import UserError
from ...finetune import PRESETS
from ...video import VideoError
from .jobs import ENTRY, FINAL, KINDS, public_view, shown
from .params import EDIT_PRESETS, ROUTES, openapi_body
from .submit import read_request, resolve, store_job
from .uploads import ACCEPTED, ApiError

log = logging.getLogger("ray.serve")
WEB = Path(__file__).resolve().parent / "web"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # Swagger UI 5, shipped in the wheel
bearer = HTTPBearer(auto_error=False, description="an API key from DREAMIX_API_KEYS or the key file")
# Nothing loads from another origin, no inline script, no framing: the page keeps the key in sessionStorage.
_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'; style-src 'self'")
CSP = {"page": _CSP, "docs": _CSP + " 'unsafe-inline'"}  # Swagger UI sets style attributes from script


class SecurityHeaders:
    """Pure ASGI middleware: CSP, X-Frame-Options and X-Content-Type-Options on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(b"content-security-policy", CSP["docs" if scope["path"] == "/docs" else "page"].encode()),
                 (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                 (b"referrer-policy", b"no-referrer")]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


def create_api(ctx) -> FastAPI:
    """The FastAPI app of one ingress replica; `ctx` is the Ingress (settings, jobs, runner, keys)."""
    app = FastAPI(title="Dreamix video editing", version="1.0", docs_url=None, redoc_url=None,
                  description="Text-guided video editing, image animation and subject-driven generation with "
                              "a cascade of video diffusion models (Dreamix). Jobs are durable: POST returns an "
                              "id, GET it until status is done, then download /video and /preview.")
    settings = ctx.settings

    def reject(exc: ApiError) -> JSONResponse:
        ctx.rejected.inc(tags={"code": exc.code})
        return error(exc.status, exc.code, exc.message, exc.headers)

    app.add_exception_handler(ApiError, lambda _r, exc: reject(exc))
    app.add_exception_handler(RequestValidationError, lambda _r, exc: reject(ApiError(
        422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]), "invalid_field")))
    app.add_exception_handler(StarletteHTTPException, lambda _r, exc: error(
        exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None)))
    app.add_exception_handler(UserError, lambda _r, exc: reject(ApiError(422, str(exc), "invalid")))
    app.add_exception_handler(VideoError, lambda _r, exc: reject(ApiError(422, str(exc), "bad_media")))

    async def internal(_request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s: %r", ref, exc, exc_info=exc)
        return error(500, "internal", f"internal error (reference {ref}); the operator's logs have the details")

    app.add_exception_handler(Exception, internal)

    async def owner(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The caller's key id; 401 without a valid bearer key (unless auth is off)."""
        if not settings.auth:
            return "public"
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", "unauthorized",
                           {"WWW-Authenticate": "Bearer"})
        who = ctx.keys.owner(creds.credentials)
        if who is None:
            raise ApiError(401, "the API key is not valid: check it, or ask the operator for one", "unauthorized",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return who

    @app.get("/healthz", tags=["service"], summary="liveness (no key needed)")
    async def healthz():
        return {"status": "ok", "replica": ctx.replica, "running_jobs": len(ctx.runner.tasks)}

    @app.get("/v1/info", tags=["service"], summary="the model, presets and limits")
    async def info(_who: str = Depends(owner)):
        return {"stages": [s.to_dict() for s in ctx.stages], "edit_presets": EDIT_PRESETS,
                "finetune_presets": sorted(PRESETS), "cameras": list(CAMERAS), "edit_types": list(EDIT_TYPES),
                "accepted": ACCEPTED,
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_width": settings.max_width,
                           "max_height": settings.max_height, "max_duration_s": settings.max_duration_s,
                           "max_steps": settings.max_steps, "concurrency_per_key": settings.concurrency_per_key}}

    for kind in KINDS:
        _routes(app, ctx, kind, owner)

    @app.get("/v1/jobs", tags=["service"], summary="the caller's jobs of every kind, newest first, a page at a time")
    async def list_jobs(limit: int = Query(20, ge=1, le=100), cursor: str | None = Query(
            None, max_length=64, description="next_cursor of the previous page"), who: str = Depends(owner)):
        if cursor and not ENTRY.fullmatch(cursor):
            raise ApiError(400, "cursor: pass the next_cursor of the previous page unchanged", "bad_cursor")
        try:
            ids, cursor = await asyncio.to_thread(ctx.jobs.page, who, limit, cursor)
            jobs = await asyncio.gather(*(asyncio.to_thread(ctx.jobs.load, i) for i in ids))
        except OSError:
            raise ApiError(503, "the job store did not answer; retry in a moment", "store_unavailable",
                           {"Retry-After": "1"}) from None
        jobs = [ctx.runner.running(j["id"]) or j for j in jobs if j and j["owner"] == who]
        return {"jobs": [public_view(j, "") for j in jobs], "next_cursor": cursor}

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(WEB / "docs.html")

    app.add_middleware(SecurityHeaders)
    return app


def _routes(app: FastAPI, ctx, kind: str, owner) -> None:
    """POST /v1/{kind}s, GET its status, POST .../cancel, /video and /preview."""
    model, file_field, media, _, _ = ROUTES[kind]
    path, tag = f"/v1/{kind}s", f"{kind}s"

    async def create(request: Request, who: str = Depends(owner)):
        await ctx.admit(who)
        try:
            fields, sources = await read_request(request, kind, ctx.settings)
            params = await resolve(kind, fields, who, ctx.settings, ctx.jobs, ctx.cascade)
            job = await store_job(kind, who, params, sources, media, ctx.settings, ctx.jobs)
        finally:
            ctx.release(who)
        ctx.runner.start(job)
        ctx.accepted.inc(tags={"kind": kind})
        return JSONResponse({"id": job["id"], "status": job["status"], "status_url": f"{path}/{job['id']}"},
                            status_code=202)

    app.add_api_route(path, create, methods=["POST"], status_code=202, tags=[tag], summary=model.__doc__,
                      openapi_extra=openapi_body(kind), responses=_ERRORS)

    async def load(job_id: str, who: str) -> dict:
        try:
            job = ctx.runner.running(job_id) or await asyncio.to_thread(ctx.jobs.load, job_id)
        except OSError:
            raise ApiError(503, "the job store did not answer; retry in a moment", "store_unavailable",
                           {"Retry-After": "1"}) from None
        if job is None or job["owner"] != who or job["kind"] != kind:
            raise ApiError(404, f"no {kind} job {shown(job_id)} for this API key", "not_found")
        return job

    async def status(job_id: str, who: str = Depends(owner)):
        return public_view(await load(job_id, who), "")

    app.add_api_route(f"{path}/{{job_id}}", status, methods=["GET"], tags=[tag],
                      summary=f"status, stage, progress and timings of a {kind} job")

    async def cancel(job_id: str, who: str = Depends(owner)):
        job = await load(job_id, who)
        if job["status"] in FINAL and job["status"] != "cancelled":
            raise ApiError(409, f"job {job_id} is already {job['status']}: there is nothing to cancel", "not_running")
        if job["status"] != "cancelled":
            # Run here: stop its task. Elsewhere (or orphaned): the record and a cancel file its runner watches.
            stopped = await ctx.runner.cancel(job_id)
            if stopped is None:
                await asyncio.to_thread(ctx.jobs.cancel, job)
            job = stopped or job
        return public_view(job, "")

    app.add_api_route(f"{path}/{{job_id}}/cancel", cancel, methods=["POST"], tags=[tag], responses=_ERRORS,
                      summary=f"stop a queued or running {kind} job (frees its slot); a finished one is 409")
    if kind in ("finetune", "subject"):
        return

    async def fetch(job_id: str, who: str, name: str, media_type: str) -> Response:
        job = await load(job_id, who)
        if job["status"] != "done":
            hint = job["error"] if job["status"] == "failed" else f"poll {path}/{job_id} until status is done"
            raise ApiError(409, f"job {job_id} is {job['status']} ({job['stage']}): {hint}", "not_ready")
        if name not in job["result"].values():
            raise ApiError(404, f"job {job_id} has no {name} (generations have no original to compare with)",
                           "not_found")
        data = await asyncio.to_thread(ctx.jobs.get, job_id, name)
        filename = f"{job_id}-{name}"
        disposition = f'attachment; filename="{filename}"'
        return Response(data, media_type=media_type, headers={"Content-Disposition": disposition})

    async def video(job_id: str, who: str = Depends(owner)):
        return await fetch(job_id, who, "output.mp4", "video/mp4")

    async def preview(job_id: str, format: str = Query("mp4", pattern="^(mp4|png)$"), who: str = Depends(owner)):
        if format == "png":
            return await fetch(job_id, who, "preview.png", "image/png")
        return await fetch(job_id, who, "preview.mp4", "video/mp4")

    app.add_api_route(f"{path}/{{job_id}}/video", video, methods=["GET"], tags=[tag], summary="the result (mp4)",
                      response_class=Response)
    app.add_api_route(f"{path}/{{job_id}}/preview", preview, methods=["GET"], tags=[tag], response_class=Response,
                      summary="original and result side by side (mp4), or a contact sheet (?format=png)")


_ERRORS = {code: {"description": text} for code, text in {
    401: "missing or invalid API key", 403: "s3:// bucket not allowed", 409: "a referenced job is not done",
    413: "upload over the byte limit", 415: "not a video / image (sniffed from content)",
    422: "invalid field, or media over the resolution / duration limits", 429: "too many unfinished jobs for this key",
}.items()}
