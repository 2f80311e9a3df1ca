"""Distributed finetuning entry point for `ray job submit` (Ray Train + DeepSpeed ZeRO):

    ray job submit --address http://HEAD:8265 -- python jobs/finetune.py s3://bucket/in.mp4 \\
        --workers 4 --zero 3 --gpu --deepspeed-config infra/deepspeed_zero3.json \\
        --store s3://bucket/artifacts --preset mixed --batch-size 4

Takes the flags of `dreamix finetune` (--workers defaults to 2 here); the input may be an s3:// URI.
Prints the artifact id on the last line; rerunning the same command resumes an interrupted run
(run name = artifact id, checkpoints under <store>/_train unless --storage is given).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.cli import build_parser, main as cli_main  # noqa: E402
from dreamix_ray.errors import UserError  # noqa: E402
from dreamix_ray.storage import is_s3, read_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--workers" not in argv:
        argv += ["--workers", "2"]
    args = build_parser().parse_args(["finetune", *argv])
    if not is_s3(args.input):
        return cli_main(["finetune", *argv])
    # The artifact key hashes the input's bytes, so the downloaded copy keys like the original.
    with tempfile.TemporaryDirectory(prefix="dreamix-ft-input-") as tmp:
        local = Path(tmp, Path(args.input).name or "input.mp4")
        try:
            local.write_bytes(read_bytes(args.input))
        except UserError as exc:  # a missing object or permission: one line, like the CLI
            print(f"finetune.py: error: {exc}", file=sys.stderr)
            return 2
        return cli_main(["finetune", *[str(local) if a == args.input else a for a in argv]])


if __name__ == "__main__":
    sys.exit(main())
