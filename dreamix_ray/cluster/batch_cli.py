"""`dreamix batch MANIFEST --output-prefix URI`: flags -> BatchOptions -> run_batch -> summary and exit code."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..request import EditRequest
from ..storage import S3Settings
from .batch import BatchOptions, run_batch

STAGES_HELP = ("step=value pairs by stage name or kind, e.g. base=1,tsr=1,ssr=1 (--layout staged), cascade=1 "
               "(fused), also decode, degrade, finetune, encode")


class FlagError(UserError):
    """A malformed command-line flag value."""


def parse_table(text: str | None, flag: str, pair: bool = False) -> dict:
    """'base=1,ssr=0.5' -> {'base': 1.0, 'ssr': 0.5}; with pair, 'base=1:4' -> {'base': (1, 4)}, 'ssr=2' -> (2, 2)."""
    table: dict = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            if pair:
                lo, _, hi = value.partition(":")
                table[name.strip()] = (int(lo), int(hi or lo))
                if not 1 <= table[name.strip()][0] <= table[name.strip()][1]:
                    raise ValueError
            else:
                table[name.strip()] = float(value)
                if table[name.strip()] < 0:
                    raise ValueError
        except ValueError:
            form = "NAME=MIN:MAX or NAME=N with 1 <= MIN <= MAX" if pair else "NAME=NUMBER with NUMBER >= 0"
            raise FlagError(f"{flag}: cannot read {item!r}; write {form}, comma-separated") from None
    return table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="JSONL, CSV or Parquet manifest (local path or s3://...): columns id, video, "
                                    "prompt or prompts, and optional strength, seed, finetune, steps, output")
    p.add_argument("--output-prefix", required=True, metavar="URI",
                   help="where edits, previews and results Parquet go (local dir or s3://bucket/prefix)")
    p.add_argument("--address", default=None, help="Ray cluster to use (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="cascade directory or s3:// prefix (default: the embedded shapes-world cascade)")
    p.add_argument("--store", default=None, metavar="URI",
                   help="finetuned-artifact store (default: OUTPUT_PREFIX/artifacts)")
    p.add_argument("--stage-cpus", default=None, metavar="SPEC", help=f"CPUs per actor: {STAGES_HELP}")
    p.add_argument("--stage-gpus", default=None, metavar="SPEC", help=f"GPUs per actor: {STAGES_HELP}")
    p.add_argument("--stage-actors", default=None, metavar="SPEC",
                   help="actor pool sizes, e.g. base=1:4,ssr=2 or cascade=2 (MIN:MAX autoscales; default 1:4 per "
                        "model step)")
    p.add_argument("--layout", choices=("auto", "fused", "staged"), default="auto",
                   help="fused: each actor runs every stage of a row (data parallel; the faster one when a device "
                        "holds the whole cascade); staged: an actor pool per stage, each with its own resources "
                        "(pipeline parallel). auto (default): staged with --pin-stages or per-stage resources")
    p.add_argument("--pin-stages", action="store_true",
                   help="run each cascade stage only on nodes with custom resource stage_<kind> (infra/ worker groups)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per model call (default 4)")
    p.add_argument("--max-error-rate", type=float, default=1.0,
                   help="stop once failed outputs exceed this fraction of all outputs (default 1 = never)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of a crashed stage actor (default 3)")
    p.add_argument("--object-store-mb", type=float, default=None,
                   help="Ray Data memory budget for rows in flight; smaller reads less ahead (default: Ray's)")
    p.add_argument("--actor-start-timeout", type=float, default=1800, metavar="SECONDS",
                   help="stop the job when a step's first actors have not started after this long (default 1800: "
                        "time for an autoscaler to add nodes and for images and models to load)")
    p.add_argument("--node-wait", type=float, default=None, metavar="SECONDS",
                   help="stop the job when a step's actor fits on no live node and no row came out for this long: "
                        "a lost node nobody replaced (default: --actor-start-timeout)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--region", default=None, help="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="strength for rows without one (default: the cascade's tuned strength for the row's "
                        "edit_type, else 0.95 with finetune, else 0.7)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance for rows without a guidance column (default: the cascade's, else 1)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="guidance's unconditional text for rows without a negative_prompt column")
    p.add_argument("--ssr-chunk-frames", type=int, default=None,
                   help="frames per chunk of the last SSR stage (default 32, as the paper)")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop", help="how inputs are fitted to the base size")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local cluster (default: the machine's, or enough for one actor per stage)")
    p.add_argument("--run-id", default=None, help="name of this run in the results (default: time + random)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def options_from_args(args) -> BatchOptions:
    # --strength, given, is every row's default, finetuned or not (a row's own strength still wins)
    request = EditRequest(prompt="", strength=args.strength, fit=args.fit, guidance_scale=args.guidance,
                          negative_prompt=args.negative_prompt,
                          **({"ssr_chunk_frames": args.ssr_chunk_frames} if args.ssr_chunk_frames else {}))
    for flag, value in (("--actor-start-timeout", args.actor_start_timeout), ("--node-wait", args.node_wait)):
        if value is not None and value <= 0:
            raise FlagError(f"{flag} must be > 0 seconds, got {value:g}")
    if args.batch_size < 1:
        raise FlagError(f"--batch-size must be >= 1, got {args.batch_size}")
    return BatchOptions(
        manifest=args.manifest, output_prefix=args.output_prefix, model=args.model, address=args.address,
        s3=S3Settings(endpoint_url=args.endpoint_url, region=args.region), request=request,
        store=args.store, cpus=parse_table(args.stage_cpus, "--stage-cpus"),
        gpus=parse_table(args.stage_gpus, "--stage-gpus"),
        actors=parse_table(args.stage_actors, "--stage-actors", pair=True),
        batch_size=args.batch_size, max_error_rate=args.max_error_rate, max_restarts=args.max_restarts,
        object_store_mb=args.object_store_mb, pin_stages=args.pin_stages, num_cpus=args.num_cpus,
        actor_start_timeout_s=args.actor_start_timeout, node_wait_s=args.node_wait, layout=args.layout,
        run_id=args.run_id, progress=not args.quiet)


def run(args) -> int:
    """0: every output done or skipped; 1: some failed (recorded in the results); 3: stopped by --max-error-rate."""
    summary = run_batch(options_from_args(args))
    print(summary.text(), file=sys.stderr if summary.failed else sys.stdout)
    if summary.stopped:
        return 3
    return 1 if summary.failed else 0
