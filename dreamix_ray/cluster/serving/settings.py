"""Serving settings: one frozen dataclass read from the serve config's `args`, CLI flags or env."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ...config import CascadeConfig, ConfigError, StageConfig
from ...models.cascade import CASCADE_FILE, EMBEDDED_DIR
from ...storage import ArtifactStore, default_store_root
from ...video import VideoLimits

MB = 1_000_000


@dataclass(frozen=True)
class ServeSettings:
    """Everything the ingress and the stage deployments need to agree on."""

    model: str = ""  # cascade directory; "" = the embedded default
    store: str = ""  # artifact store (local dir or s3://); "" = $DREAMIX_STORE or the user cache
    auth: bool = True
    api_key_file: str = ""  # one key per line; DREAMIX_API_KEYS (comma-separated) is read too
    allowed_buckets: tuple[str, ...] = ()  # s3:// inputs are read only from these buckets
    max_upload_mb: float = 200.0
    max_width: int = 1920
    max_height: int = 1920
    max_duration_s: float = 60.0
    max_images: int = 16  # subject collections
    max_steps: int = 250  # per stage, so one request cannot hold a replica for hours
    max_prompt_chars: int = 500
    concurrency_per_key: int = 4  # unfinished jobs per API key; more is 429
    heartbeat_s: float = 5.0  # a running job's owner rewrites job.json at least this often
    lease_s: float = 30.0  # a job whose heartbeat is older than this is taken over by another replica
    recover_every_s: float = 10.0
    max_attempts: int = 3  # runs of one job (replica deaths) before it is reported failed
    unit_retries: int = 2  # retries of one stage call whose replica died
    min_replicas: int = 1
    max_replicas: int = 4
    finetune_min_replicas: int = 0  # finetuning is rare and heavy: scale it from zero
    stage_num_cpus: float = 1.0
    stage_num_gpus: float = 0.0
    ingress_num_cpus: float = 0.25
    torch_threads: int = 0  # 0 = the replica's CPU reservation (at least 1)
    # Slow or stalled clients (Apache mod_reqtimeout's rule): headers must be complete within header_timeout_s
    # of the connection or the previous response; a body must arrive within body_timeout_s plus one second per
    # body_min_rate bytes received; an idle keep-alive connection closes after idle_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 20.0
    body_min_rate: int = 50_000  # bytes/s
    idle_timeout_s: int = 15
    owner_secret: str = ""  # HMAC key of owner ids; "" = the one generated once and kept in the store

    def __post_init__(self):
        if self.max_upload_mb <= 0 or self.concurrency_per_key < 1 or self.max_steps < 1:
            raise ConfigError("max_upload_mb, concurrency_per_key and max_steps must be positive")
        if min(self.header_timeout_s, self.body_timeout_s, self.body_min_rate, self.idle_timeout_s) <= 0:
            raise ConfigError("header_timeout_s, body_timeout_s, body_min_rate and idle_timeout_s must be positive")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                              f"{self.min_replicas}..{self.max_replicas}")
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ConfigError(f"lease_s ({self.lease_s}) must exceed twice heartbeat_s ({self.heartbeat_s}), "
                              "or live jobs would be taken over")

    @classmethod
    def from_args(cls, args: dict | None) -> "ServeSettings":
        """Settings from a dict (serve config `args`); env fills what it leaves out."""
        args = dict(args or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {unknown}; known: {sorted(names)}")
        env = {"model": "DREAMIX_MODEL", "store": "DREAMIX_STORE", "api_key_file": "DREAMIX_API_KEY_FILE",
               "allowed_buckets": "DREAMIX_ALLOWED_BUCKETS", "owner_secret": "DREAMIX_OWNER_SECRET"}
        for name, var in env.items():
            if not args.get(name) and os.environ.get(var):
                args[name] = os.environ[var]
        if isinstance(args.get("allowed_buckets"), str):
            args["allowed_buckets"] = [b.strip() for b in args["allowed_buckets"].split(",") if b.strip()]
        if "allowed_buckets" in args:
            args["allowed_buckets"] = tuple(args["allowed_buckets"])
        return cls(**args)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def model_dir(self) -> str:
        return self.model or str(EMBEDDED_DIR)

    @property
    def store_root(self) -> str:
        return self.store or os.environ.get("DREAMIX_STORE") or default_store_root()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def limits(self) -> VideoLimits:
        fps_cap = 120  # frame cap follows the duration cap at a generous frame rate
        return VideoLimits(max_width=self.max_width, max_height=self.max_height, max_duration_s=self.max_duration_s,
                           max_frames=int(self.max_duration_s * fps_cap), max_bytes=self.max_upload_bytes)


CALLBACK_ENV, TIMEOUT_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "DREAMIX_HEADER_TIMEOUT_S"
# Ray takes the loopback address as the node's IP when it is not in cluster mode (its macOS / Windows
# default), while ray.init(_node_ip_address="127.0.0.1") is turned into the external IP. Ray reads it when it
# is imported: set it before that, and every process of the local cluster inherits it.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def proxy_env(settings: ServeSettings) -> dict:
    """Environment of Serve's proxy processes: the header timeout (proxy.install); set before Ray starts, or
    in a cluster's pods."""
    return {CALLBACK_ENV: "dreamix_ray.cluster.serving.proxy:install", TIMEOUT_ENV: f"{settings.header_timeout_s:g}"}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def stage_configs(model_dir: str) -> list[StageConfig]:
    """The cascade's stage list from cascade.json alone (no weights: the ingress never loads them)."""
    return list(cascade_config(model_dir).stages)


def cascade_config(model_dir: str) -> CascadeConfig:
    """The cascade's config (stages, tuned strengths) from cascade.json alone, without weights."""
    path = Path(model_dir, CASCADE_FILE)
    if not path.is_file():
        raise ConfigError(f"{model_dir} is not a cascade directory (no {CASCADE_FILE}): pass --model DIR "
                          "written by Cascade.save_pretrained, or train the embedded default first")
    return CascadeConfig.from_dict(json.loads(path.read_text()))


SECRET_KEY, SECRET_NAME = "service", "owner-secret"


def owner_secret(settings: ServeSettings) -> bytes:
    """The HMAC key of owner ids: the setting, else the store's, generated and kept there on first use."""
    if settings.owner_secret:
        return settings.owner_secret.encode()
    store = ArtifactStore(settings.store_root)
    if not store.has(SECRET_KEY, SECRET_NAME):
        # Two builders racing here could write different secrets; the first deploy of a store is a single one.
        store.put(SECRET_KEY, SECRET_NAME, secrets.token_hex(32).encode())
    return store.get(SECRET_KEY, SECRET_NAME).strip()


def key_id(key: str, secret: bytes) -> str:
    """The owner id of an API key: a keyed hash (HMAC-SHA256), so a leaked store does not let keys be guessed
    offline; it owns jobs and counts toward limits."""
    return "o" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:24]


def legacy_key_id(key: str) -> str:
    """The owner id before issue 22 (an unsalted SHA-256 prefix); read only to migrate stored jobs."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:15]


class KeyRing:
    """The accepted bearer keys, held only as SHA-256 digests (with their owner ids), compared in constant time."""

    def __init__(self, keys: list[str], secret: bytes = b""):
        self._entries = [(hashlib.sha256(k.encode()).digest(), key_id(k, secret)) for k in keys if k]
        self.legacy = {legacy_key_id(k): key_id(k, secret) for k in keys if k}  # old owner id -> new

    @classmethod
    def load(cls, settings: ServeSettings, secret: bytes = b"") -> "KeyRing":
        keys = [k.strip() for k in os.environ.get("DREAMIX_API_KEYS", "").split(",")]
        if settings.api_key_file:
            try:
                lines = Path(settings.api_key_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read the API key file {settings.api_key_file}: {exc.strerror}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        ring = cls([k for k in keys if k], secret)
        if settings.auth and not ring._entries:
            raise ConfigError("no API keys: set DREAMIX_API_KEYS=key1,key2 or --api-key-file FILE "
                              "(or pass --no-auth on a trusted machine)")
        return ring

    def owner(self, key: str) -> str | None:
        """The key's owner id if it is accepted, else None."""
        digest = hashlib.sha256(key.encode()).digest()
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        found = None
        for known, owner in self._entries:
            if hmac.compare_digest(digest, known):
                found = owner
        return found
