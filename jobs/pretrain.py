"""Pretrain the embedded cascade on the shapes world: `python jobs/pretrain.py --stages base tsr ssr`.

Single process by default (one stage after another); a rerun with the same --run-dir resumes.
`--export DIR` writes the cascade directory from the stages' EMA weights. Same as `dreamix pretrain`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamix_ray.cluster.pretrain_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
