"""`dreamix serve`: start the Serve app on a local Ray, or deploy it to a running cluster (--address)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time

if importlib.util.find_spec("ray") is None:  # `dreamix` tells the user to install the ray extra
    raise ImportError("ray is not installed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster (HOST:PORT or ray://HOST:10001) to deploy to and return; "
                             "default: start a private local Ray (even if one runs here; $RAY_ADDRESS is not read) "
                             "and serve until Ctrl-C; with a loopback --host it listens on loopback only")
    parser.add_argument("--model", default=None, metavar="DIR", help="cascade directory (default: the embedded one)")
    parser.add_argument("--store", default=None, metavar="URI",
                        help="where jobs and results live: a directory or s3://BUCKET/PREFIX "
                             "(default: $DREAMIX_STORE or ~/.cache/dreamix_ray/artifacts)")
    parser.add_argument("--no-auth", action="store_true", help="accept requests without an API key (trusted hosts)")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="one API key per line; DREAMIX_API_KEYS=key1,key2 is read as well")
    parser.add_argument("--allowed-bucket", action="append", dest="allowed_buckets", default=None, metavar="BUCKET",
                        help="an S3 bucket whose s3:// URIs requests may name (repeatable)")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling of every deployment")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved per stage replica")
    parser.add_argument("--proxies", choices=("every-node", "head"), default="every-node",
                        help="where HTTP proxies run: every node with a replica (Ray's default), or the head only "
                             "(one entry point; also what several Ray nodes on one machine need, since their "
                             "proxies would share --port)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus export port of the local Ray node (default: Ray picks one)")
    parser.add_argument("--header-timeout", type=float, default=None, metavar="S",
                        help="seconds a client has to send a request's headers (default 10)")
    parser.add_argument("--body-timeout", type=float, default=None, metavar="S",
                        help="seconds an upload may take, plus 1 s per --body-min-rate bytes received (default 20)")
    parser.add_argument("--body-min-rate", type=int, default=None, metavar="BYTES_PER_S",
                        help="the slowest sustained upload rate accepted (default 50000)")
    parser.add_argument("--idle-timeout", type=int, default=None, metavar="S",
                        help="seconds an idle keep-alive connection stays open (default 15)")


def settings_args(args: argparse.Namespace) -> dict:
    """The ServeSettings fields the flags set (unset flags keep the defaults and env)."""
    out = {"model": args.model, "store": args.store, "api_key_file": args.api_key_file,
           "allowed_buckets": args.allowed_buckets, "max_replicas": args.max_replicas,
           "stage_num_gpus": args.num_gpus, "header_timeout_s": args.header_timeout,
           "body_timeout_s": args.body_timeout, "body_min_rate": args.body_min_rate,
           "idle_timeout_s": args.idle_timeout}
    out = {k: v for k, v in out.items() if v is not None}
    if args.no_auth:
        out["auth"] = False
    return out


def run(args: argparse.Namespace) -> int:
    from .settings import LOOPBACK_RAY_ENV, KeyRing, ServeSettings, is_loopback, proxy_env, stage_configs

    fields = settings_args(args)
    settings = ServeSettings.from_args(fields)
    KeyRing.load(settings)  # no keys and no --no-auth: stop here with one line, not after deploying
    stages = stage_configs(settings.model_dir)
    if not args.address:
        # Set before Ray is imported (it reads them then) and inherited by every process of the local cluster:
        # the proxies' header timeout, and with a loopback host, Ray's own ports on loopback as well.
        os.environ.update(proxy_env(settings))
        if is_loopback(args.host):
            os.environ.update(LOOPBACK_RAY_ENV)
    import ray
    from ray import serve

    from ...errors import UserError
    from ..batch import start_or_join
    from .app import APP_NAME, build_app
    from .proxy import http_options

    # Logical CPUs for one replica of every deployment, even on a 2-core laptop: torch uses 1 thread each.
    need = int(len(stages) * settings.stage_num_cpus + settings.ingress_num_cpus + settings.stage_num_cpus) + 1
    # With --address the cluster must hold the keys (a Secret in infra/rayservice.yaml) and the proxy settings.
    start_or_join(args.address, {"num_cpus": max(os.cpu_count() or 1, need), "_metrics_export_port": args.metrics_port},
                  logging_level="WARNING")
    serve.start(http_options=http_options(settings, args.host, args.port),
                proxy_location="HeadOnly" if args.proxies == "head" else "EveryNode")
    try:
        serve.run(build_app(fields), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:
        raise UserError(f"the Serve application did not start ({str(exc).splitlines()[0]}); "
                        "the replica logs under /tmp/ray/session_latest/logs/serve say why") from None
    url = f"http://{args.host}:{args.port}"
    print(f"dreamix serving on {url}/ (web page), {url}/docs (API), {url}/healthz", flush=True)
    if args.address:
        print("deployed; it keeps running on the cluster (stop it with `serve shutdown`)")
        return 0
    # SIGTERM (a service manager stopping us) gets the same graceful stop as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("stopping: draining replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
