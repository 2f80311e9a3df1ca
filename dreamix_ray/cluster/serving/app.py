"""The Serve application: a FastAPI ingress composed with one deployment per cascade stage plus finetuning.

`build_app(args)` is an application builder: `serve run serve/config.yaml`, `serve deploy` and
`dreamix serve` all call it with the `args` of the serve config.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict

from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from ...host_memory import worker_env
from ...storage import ArtifactStore
from .api import create_api
from .jobs import JobStore
from .proxy import bind_replica_grpc_to_loopback
from .runner import JobRunner
from .settings import KeyRing, ServeSettings, cascade_config, owner_secret
from .uploads import ApiError
from .workers import FinetuneDeployment, StageDeployment

APP_NAME = "dreamix"


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """HTTP in, jobs out: accepts requests, runs their jobs through the stage handles, answers status."""

    async def __init__(self, settings: dict, stages: list[DeploymentHandle], finetuner: DeploymentHandle):
        self.settings = ServeSettings.from_args(settings)
        bind_replica_grpc_to_loopback()
        # Fails the replica at start if auth is on and no key is set.
        self.keys = KeyRing.load(self.settings, owner_secret(self.settings))
        self.cascade = cascade_config(self.settings.model_dir)  # cascade.json alone: the ingress loads no weights
        self.stages = list(self.cascade.stages)
        self.jobs = JobStore(ArtifactStore(self.settings.store_root))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.runner = JobRunner(self.jobs, self.settings, self.cascade, stages, finetuner, self.replica)
        self.accepted = metrics.Counter("dreamix_jobs_accepted", "Jobs accepted, by kind.", tag_keys=("kind",))
        self.rejected = metrics.Counter("dreamix_requests_rejected", "Requests answered 4xx, by error code.",
                                        tag_keys=("code",))
        self._inflight: dict[str, int] = defaultdict(int)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._recovery = asyncio.get_running_loop().create_task(self.runner.recover_forever())

    def __serve_build_asgi_app__(self):
        return create_api(self)

    async def admit(self, owner: str) -> None:
        """Count the key's unfinished jobs (from the store: every replica's) plus its uploads in flight here."""
        limit = self.settings.concurrency_per_key
        async with self._locks[owner]:
            active = len(await asyncio.to_thread(self.jobs.active, owner))
            if active + self._inflight[owner] >= limit:
                raise ApiError(429, f"this API key has {active + self._inflight[owner]} unfinished jobs, the limit is "
                                    f"{limit}: wait for one to finish", "too_many_jobs", {"Retry-After": "5"})
            self._inflight[owner] += 1

    def release(self, owner: str) -> None:
        self._inflight[owner] -= 1


def _autoscaling(settings: ServeSettings, target: float, min_replicas: int | None = None) -> dict:
    """Serve's autoscaling_config: replicas follow ongoing requests per replica."""
    low = settings.min_replicas if min_replicas is None else min_replicas
    return {"min_replicas": low, "max_replicas": max(settings.max_replicas, 1),
            "target_ongoing_requests": target, "upscale_delay_s": 5, "downscale_delay_s": 120}


def migrate_owners(settings: ServeSettings) -> int:
    """Once per store, before any replica serves: jobs of pre-HMAC owner ids move to the HMAC ones (the owner
    secret is made here on first use, so replicas only read it). To redo: delete service/owners-migrated."""
    keys = KeyRing.load(settings, owner_secret(settings))
    moved = JobStore(ArtifactStore(settings.store_root)).migrate_owners(keys.legacy)
    if moved:
        print(f"moved {moved} stored job(s) to the keyed owner ids", flush=True)
    return moved


def build_app(args: dict | None = None):
    """The application graph; `args` are ServeSettings fields (the serve config's `args`)."""
    settings = ServeSettings.from_args(args)
    # Pin model and store now: replicas on other nodes must not fall back to their own defaults.
    settings = dataclasses.replace(settings, model=settings.model_dir, store=settings.store_root)
    migrate_owners(settings)
    stages = list(cascade_config(settings.model_dir).stages)
    plain = settings.to_dict()
    actor = {"num_cpus": settings.stage_num_cpus, "num_gpus": settings.stage_num_gpus}
    env = worker_env()  # a replica runs its requests on a thread of its own (host_memory)
    if env:
        actor["runtime_env"] = {"env_vars": env}
    workers = [
        # One request per replica: a stage saturates its device, so Serve queues and autoscales instead.
        StageDeployment.options(name=f"stage-{s.name}", ray_actor_options=actor,
                            autoscaling_config=_autoscaling(settings, 1)).bind(plain, i)
        for i, s in enumerate(stages)
    ]
    finetuner = FinetuneDeployment.options(name="finetune", ray_actor_options=actor, autoscaling_config=_autoscaling(
        settings, 1, settings.finetune_min_replicas)).bind(plain)
    return Ingress.options(name="ingress", ray_actor_options={"num_cpus": settings.ingress_num_cpus},
                           autoscaling_config=_autoscaling(settings, 32)).bind(plain, workers, finetuner)
