"""Batch edit entry point for `ray job submit -- python jobs/edit_batch.py MANIFEST --output-prefix URI ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run from a checkout

from dreamix_ray.cluster.batch_cli import add_arguments, run  # noqa: E402
from dreamix_ray.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edit_batch.py", description="Dreamix batch edits on Ray Data.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:  # the job log shows one line, as the CLI does
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
