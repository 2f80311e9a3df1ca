"""Serving settings: one frozen dataclass read from the serve config's `args`, CLI flags or env."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...config import CascadeConfig, ConfigError, StageConfig
from ...models.cascade import CASCADE_FILE, EMBEDDED_DIR
from ...storage import default_store_root
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

    def __post_init__(self):
        if self.max_upload_mb <= 0 or self.concurrency_per_key < 1 or self.max_steps < 1:
            raise ConfigError("max_upload_mb, concurrency_per_key and max_steps must be positive")
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
               "allowed_buckets": "DREAMIX_ALLOWED_BUCKETS"}
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


def key_id(key: str) -> str:
    """A stable, non-reversible name for an API key: it owns jobs and counts toward limits."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:15]


class KeyRing:
    """The accepted bearer keys, held only as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @classmethod
    def load(cls, settings: ServeSettings) -> "KeyRing":
        keys = [k.strip() for k in os.environ.get("DREAMIX_API_KEYS", "").split(",")]
        if settings.api_key_file:
            try:
                lines = Path(settings.api_key_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read the API key file {settings.api_key_file}: {exc.strerror}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        ring = cls([k for k in keys if k])
        if settings.auth and not ring._digests:
            raise ConfigError("no API keys: set DREAMIX_API_KEYS=key1,key2 or --api-key-file FILE "
                              "(or pass --no-auth on a trusted machine)")
        return ring

    def owner(self, key: str) -> str | None:
        """The key's id if it is accepted, else None."""
        digest = hashlib.sha256(key.encode()).digest()
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        ok = [hmac.compare_digest(digest, d) for d in self._digests]
        return key_id(key) if any(ok) else None
