"""`dreamix demo | eval | pretrain | batch | serve`: the commands beyond single edits."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# (subcommand, module with add_arguments/run, what to install when it is missing)
CLUSTER_COMMANDS = {
    "batch": ("dreamix_ray.cluster.batch_cli", "batch edits from a manifest on Ray Data"),
    "serve": ("dreamix_ray.cluster.serving.cli", "the Ray Serve endpoint and web page"),
    # Needs no Ray: lives here because this table is the one registry of add_arguments/run commands.
    "convert": ("dreamix_ray.convert", "a cascade directory over diffusers text-to-video repositories "
                "(ModelScope, zeroscope)"),
}


def add_subcommands(sub) -> None:
    p = sub.add_parser("demo", help="render a shapes-world clip, edit it, write original | edit, judge it")
    p.add_argument("-o", "--output-dir", default="out/demo")
    p.add_argument("-p", "--prompt", default=None, help="edit prompt (default: a new colour and motion)")
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="default: the cascade's tuned strength for motion edits, else 0.75")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("eval", help="automatic evaluation reproducing the paper's Tables 1 and 2 -> EVAL.md")
    p.add_argument("--quick", action="store_true", help="one source video, 4 edits per method (CI)")
    p.add_argument("--sources", type=int, default=None,
                   help="held-out source videos, 4 edits each (default 6; 1 with --quick)")
    p.add_argument("-o", "--output", default="EVAL.md")
    p.add_argument("--model", default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("pretrain", help="pretrain the embedded cascade on the shapes world")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="arguments of jobs/pretrain.py (see --help)")

    for name, (module, help_text) in CLUSTER_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:
            p.set_defaults(_missing=f"`dreamix {name}` needs the ray extra: pip install 'dreamix_ray[ray]' ({exc})")
            p.add_argument("rest", nargs=argparse.REMAINDER)


def run(args) -> int:
    from .errors import UserError

    if getattr(args, "_missing", None):
        raise UserError(args._missing)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "eval":
        from .evaluate import run_eval_cli

        return run_eval_cli(args)
    if args.command == "pretrain":
        from .pretrain import main as pretrain_main

        return pretrain_main(args.pretrain_args)
    if args.command in CLUSTER_COMMANDS:
        return importlib.import_module(CLUSTER_COMMANDS[args.command][0]).run(args)
    raise UserError(f"unknown command {args.command!r}")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
