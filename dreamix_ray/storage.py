"""URIs (local paths and s3://), and the artifact store, on pyarrow filesystems."""

from __future__ import annotations

from .errors import UserError

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs


class StorageError(UserError):
    """A URI cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class S3Settings:
    """Endpoint, region and credentials; unset fields fall back to the standard AWS settings."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    def resolved(self) -> "S3Settings":
        return S3Settings(
            endpoint_url=(self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                          or os.environ.get("AWS_ENDPOINT_URL")),
            region=self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            access_key=self.access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = str(uri)[5:].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: use s3://BUCKET/KEY")
    return bucket, key


def filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        cfg = (s3 or S3Settings()).resolved()
        kwargs: dict = {}
        if cfg.endpoint_url:
            scheme, _, host = cfg.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if cfg.region:
            kwargs["region"] = cfg.region
        if cfg.access_key and cfg.secret_key:
            kwargs.update(access_key=cfg.access_key, secret_key=cfg.secret_key)
        bucket, key = split_s3(uri)
        return pafs.S3FileSystem(**kwargs), posixpath.join(bucket, key).rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://BUCKET/KEY")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join URI path parts with '/', for s3:// and local paths alike."""
    return posixpath.join(str(uri).rstrip("/"), *parts) if is_s3(uri) else str(Path(uri, *parts))


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from None


def write_bytes(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write whole; local files go through a temp file so readers never see half of one."""
    fs, path = filesystem(uri, s3)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def default_store_root() -> str:
    """The user's cache directory ($XDG_CACHE_HOME or ~/.cache) / dreamix_ray / artifacts."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "dreamix_ray" / "artifacts")


class ArtifactStore:
    """Named artifacts (a folder of files each) under a local directory or an s3:// prefix."""

    def __init__(self, root: str | None = None, s3: S3Settings | None = None):
        self.root, self.s3 = str(root or os.environ.get("DREAMIX_STORE") or default_store_root()), s3

    def uri(self, key: str, name: str = "") -> str:
        return join(self.root, key, name) if name else join(self.root, key)

    def has(self, key: str, name: str) -> bool:
        return exists(self.uri(key, name), self.s3)

    def put(self, key: str, name: str, data: bytes) -> str:
        uri = self.uri(key, name)
        write_bytes(uri, data, self.s3)
        return uri

    def get(self, key: str, name: str) -> bytes:
        return read_bytes(self.uri(key, name), self.s3)

    def put_dir(self, key: str, local_dir: str | Path, marker: str | None = None) -> str:
        """Upload every file of `local_dir`; `marker` is written last, so its presence means complete."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != marker):
            self.put(key, file.relative_to(local_dir).as_posix(), file.read_bytes())
        if marker:
            self.put(key, marker, (local_dir / marker).read_bytes())
        return self.uri(key)

    def get_dir(self, key: str, local_dir: str | Path) -> Path:
        fs, path = filesystem(self.uri(key), self.s3)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File]
        if not files:
            raise StorageError(f"no artifact {key!r} in store {self.root}")
        local_dir = Path(local_dir)
        for info in files:
            rel = posixpath.relpath(info.path, path)
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                dest.write_bytes(f.read())
        return local_dir
