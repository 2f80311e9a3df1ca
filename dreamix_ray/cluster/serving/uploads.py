"""Untrusted input: byte-capped, deadline-bound streaming of uploads, magic-byte sniffing, header probes,
s3:// checks.

Nothing here decodes a whole file: the byte cap and the read deadline hold while the body streams in,
the type comes from the first bytes, and resolution / duration come from the container header.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator

from PIL import Image
from pyarrow import fs as pafs
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ...storage import StorageError, filesystem
from ...video import VideoError, probe_video
from .settings import ServeSettings

FORM_OVERHEAD = 64_000  # multipart boundaries and text fields on top of the file bytes
JSON_LIMIT = 64_000
CHUNK = 1 << 20
ACCEPTED = "mp4, mov, webm, mkv, avi or gif videos; png, jpg or webp images"


class ApiError(Exception):
    """An answer other than 2xx: HTTP status, a short code and a one-line message."""

    def __init__(self, status: int, message: str, code: str = "bad_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is over the {limit / 1e6:g} MB limit: trim or compress it", "too_large")


def sniff(head: bytes) -> tuple[str, str]:
    """(media, extension) from a file's first bytes; the file name and Content-Type are never trusted."""
    if head[4:8] == b"ftyp":
        return "video", ".mov" if head[8:12] == b"qt  " else ".mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "video", ".webm" if b"webm" in head[:64] else ".mkv"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", ".avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "video", ".gif"  # an animated GIF is a short video to Dreamix
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "image", ".png"
    if head[:3] == b"\xff\xd8\xff":
        return "image", ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", ".webp"
    raise ApiError(415, f"the content is not a video or image this service reads: send {ACCEPTED}", "unsupported_type")


def too_slow(settings: ServeSettings) -> ApiError:
    # Connection: close, or the proxy would keep reading the rest of a trickled body.
    return ApiError(408, f"the upload arrived too slowly: the body must come within {settings.body_timeout_s:g} s "
                         f"plus 1 s per {settings.body_min_rate / 1000:g} kB", "timeout", {"Connection": "close"})


async def capped(stream: AsyncIterator[bytes], limit: int, settings: ServeSettings) -> AsyncIterator[bytes]:
    """The request body, refused as soon as it passes `limit` bytes, or once it falls behind its deadline
    (body_timeout_s, plus 1 s per body_min_rate bytes received, as Apache's mod_reqtimeout): a stalled or
    trickled upload ends with 408 and frees its key's slot."""
    loop, chunks = asyncio.get_running_loop(), stream.__aiter__()
    total, start = 0, loop.time()
    while True:
        left = start + settings.body_timeout_s + total / settings.body_min_rate - loop.time()
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(left, 0.0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise too_slow(settings) from None
        total += len(chunk)
        if total > limit:
            raise too_large(limit - FORM_OVERHEAD if limit > FORM_OVERHEAD else limit)
        yield chunk


def check_length(request: Request, limit: int) -> None:
    """Refuse by Content-Length before reading a byte, when the client declares one."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit - FORM_OVERHEAD if limit > FORM_OVERHEAD else limit)


async def read_json(request: Request, settings: ServeSettings) -> dict:
    check_length(request, JSON_LIMIT)
    body = b"".join([c async for c in capped(request.stream(), JSON_LIMIT, settings)])
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "the body is not valid JSON: send a JSON object or a multipart form") from None
    except RecursionError:  # json's parser recurses per nesting level; a 64 kB body can nest 32,000 deep
        raise ApiError(400, "the JSON body is nested too deeply: send a flat object of fields") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object of fields")
    return data


async def read_form(request: Request, settings: ServeSettings):
    """Parse a multipart form while its bytes stream in; file parts spool to disk, capped in total."""
    limit = settings.max_upload_bytes + FORM_OVERHEAD
    check_length(request, limit)
    parser = MultiPartParser(request.headers, capped(request.stream(), limit, settings),
                             max_files=settings.max_images, max_fields=32, max_part_size=16_000)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart form ({exc.message}); send fields and files as multipart/form-data")


def check_s3_uri(uri: object, allowed: tuple[str, ...]) -> str:
    """An s3:// URI in a configured bucket with a plain key; local paths and other schemes never pass."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ApiError(400, "only s3://BUCKET/KEY URIs are accepted (no local paths, file:// or other schemes); "
                            "upload the file instead", "bad_uri")
    bucket, _, key = uri[5:].partition("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in uri or any(ord(c) < 32 for c in uri):
        raise ApiError(400, "the URI's key must be a plain path: no '..', '.', empty segments, backslashes or "
                            "control characters", "bad_uri")
    if bucket not in allowed:
        names = ", ".join(allowed) or "none are configured"
        raise ApiError(403, f"bucket {bucket!r} is not one this service reads from (allowed: {names})",
                       "forbidden_bucket")
    return uri


def fetch_s3(uri: str, dest: Path, limit: int) -> None:
    """Copy an s3:// object to `dest`, refusing it by its listed size or once the bytes pass `limit`."""
    try:
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ApiError(422, f"{uri} does not exist or is not a file", "not_found")
        if info.size is not None and info.size > limit:
            raise too_large(limit)
        total = 0
        with fs.open_input_stream(path) as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                out.write(chunk)
    except (OSError, StorageError) as exc:
        raise ApiError(422, f"cannot read {uri}: {str(exc).splitlines()[0]}", "unreadable_uri") from None


def spool(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(upload.file, out, CHUNK)


def inspect_media(path: Path, expected: str, settings: ServeSettings) -> dict:
    """Sniff and header-check a received file; returns its media kind, extension and header facts."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ApiError(422, "the file is empty: send a video or an image", "empty")
    media, ext = sniff(head)
    if media != expected:
        hint = "POST images to /v1/animations or /v1/subjects" if media == "image" else "POST videos to /v1/edits"
        raise ApiError(415, f"this route takes a {expected}, but the content is a {media} ({ext[1:]}): {hint}",
                       "wrong_media")
    typed = path.with_suffix(ext)
    path.rename(typed)
    try:
        facts = probe_video(typed, settings.limits) if media == "video" else _image_header(typed, settings)
    except VideoError as exc:
        raise ApiError(422, str(exc).replace(str(typed), "the upload"), "bad_media") from None
    return {"media": media, "ext": ext, "path": str(typed), "probe": {k: v for k, v in facts.items()
                                                                       if isinstance(v, (int, float, str, bool))}}


def _image_header(path: Path, settings: ServeSettings) -> dict:
    try:
        with Image.open(path) as im:  # lazy: reads the header, not the pixels
            width, height, fmt = im.width, im.height, im.format
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(422, f"the image cannot be read ({exc}); send a png, jpg or webp", "bad_media") from None
    if width > settings.max_width or height > settings.max_height:
        raise ApiError(422, f"the image is {width}x{height}, over the {settings.max_width}x{settings.max_height} "
                            "limit: downscale it", "bad_media")
    return {"width": width, "height": height, "format": str(fmt).lower()}


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dreamix-upload-"))
