"""A copy of a cascade with some stage fields changed, for probes that compare sampling settings with the
unchanged weights (`dreamix eval --quick --model OUT`, compare_base_and_cascade.py --model OUT).

    python research/cascade_variant.py /tmp/ssr-dpm6 --set ssr.sampler=dpm++ --set ssr.steps=6

The copy is written through models.cascade.update_config, so it is validated as any load; the shipped cascade
is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from dreamix_ray.models.cascade import read_config, update_config
    from dreamix_ray.models.embedded import EMBEDDED_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory to write the copy to (replaced if it exists)")
    p.add_argument("--model", type=Path, default=EMBEDDED_DIR, help="cascade to copy (default: the embedded one)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="a stage field to change; VALUE is JSON (6, 0.5) or a bare string (dpm++)")
    args = p.parse_args()

    changes: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not (stage and name and value):
            p.error(f"--set {item!r}: expected STAGE.FIELD=VALUE, e.g. ssr.steps=6")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        changes.setdefault(stage, {})[name] = parsed

    config = read_config(args.model)
    unknown = set(changes) - {s.name for s in config.stages}
    if unknown:
        p.error(f"no stage named {sorted(unknown)} in {args.model} (stages: {[s.name for s in config.stages]})")
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.model, args.out)
    stages = tuple(dataclasses.replace(s, **changes.get(s.name, {})) for s in config.stages)
    update_config(args.out, stages=stages)
    print(f"wrote {args.out}: " + ", ".join(f"{k}.{n}={v!r}" for k, c in changes.items() for n, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
