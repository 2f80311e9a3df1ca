"""The `dreamix` command: one registry of subcommands, each a module with `add_arguments(parser)` and
`run(args)`. Only the chosen command's module is imported, so `dreamix --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import UserError

# name -> (module with add_arguments / run, one-line help); the order is `dreamix --help`'s
COMMANDS = {
    "edit": ("dreamix_ray.cli.edit", "edit a video from a text prompt (paper Sec. 4.1)"),
    "generate": ("dreamix_ray.cli.generate", "text-to-video with no input video"),
    "finetune": ("dreamix_ray.cli.finetune", "finetune once on a video; prints the artifact id"),
    "animate": ("dreamix_ray.cli.animate", "animate an image (paper Sec. 5)"),
    "subject": ("dreamix_ray.cli.subject", "learn a subject from a folder of images; prints the artifact id"),
    "info": ("dreamix_ray.cli.info", "list the cascade's stages"),
    "demo": ("dreamix_ray.cli.demo", "render a shapes-world clip, edit it, write original | edit, judge it"),
    "eval": ("dreamix_ray.cli.eval", "automatic evaluation reproducing the paper's Tables 1 and 2 -> EVAL.md"),
    "pretrain": ("dreamix_ray.cli.pretrain", "pretrain the embedded cascade on the shapes world"),
    "convert": ("dreamix_ray.convert", "a cascade directory over diffusers text-to-video repositories "
                                       "(ModelScope, zeroscope)"),
    "batch": ("dreamix_ray.cluster.batch_cli", "batch edits from a manifest on Ray Data"),
    "serve": ("dreamix_ray.cluster.serving.cli", "the Ray Serve endpoint and web page"),
}


def _attach(name: str, p: argparse.ArgumentParser) -> None:
    try:
        importlib.import_module(COMMANDS[name][0]).add_arguments(p)
        if "--quiet" not in p._option_string_actions:  # every command takes it (README), even one with no bars
            p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    except ImportError as exc:  # batch and serve need the optional ray extra
        p.set_defaults(_missing=f"`dreamix {name}` needs the ray extra: pip install 'dreamix_ray[ray]' ({exc})")
        p.add_argument("rest", nargs=argparse.REMAINDER)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or (`only`) the full arguments of one command and the names of the rest."""
    parser = argparse.ArgumentParser(prog="dreamix", description="Dreamix text-guided video editing.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if only is None or only == name:
            _attach(name, p)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = command_of(argv)
    # only the named command's module loads; with none (or a typo) argparse needs just the names
    args = build_parser(only=name if name in COMMANDS else "").parse_args(argv)
    if name in argv and "--quiet" in argv[:argv.index(name)]:  # before the command: a command's own default
        args.quiet = True                                      # must not reset it
    # Imported here, not at the top: it loads diffusers and transformers (2.5 s), which `dreamix --help` and a
    # mistyped flag should not wait for; the chosen command's module imports them anyway.
    from ..quiet import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if getattr(args, "_missing", None):
            raise UserError(args._missing)
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except UserError as exc:
        print(f"dreamix: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dreamix: error: {exc.filename or exc}: no such file or directory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamix: interrupted; finished outputs and the last finetune checkpoint are kept", file=sys.stderr)
        return 130
