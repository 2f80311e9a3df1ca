"""Fit the motion prior that motion guidance uses (dreamix_ray/motion_guidance.py) and write it into a
cascade's cascade.json; the weights are untouched. `dreamix pretrain` does this on export.

    python jobs/fit_motion_prior.py --cascade dreamix_ray/default_cascade
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamix_ray.models.cascade import Cascade  # noqa: E402
from dreamix_ray.pretrain import PretrainConfig, fit_world_motion_prior  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cascade", required=True, help="cascade directory whose cascade.json gets the prior")
    p.add_argument("--batches", type=int, default=200, help="training batches of captions to fit on")
    args = p.parse_args()
    torch.set_num_threads(2)
    cascade = Cascade.from_pretrained(args.cascade)
    prior = fit_world_motion_prior(cascade.text_encoder, PretrainConfig(stage="base"), steps=args.batches)
    cascade.config = dataclasses.replace(cascade.config, motion_prior=prior.to_dict())
    path = Path(args.cascade) / "cascade.json"
    path.write_text(json.dumps(cascade.config.to_dict(), indent=2) + "\n")
    print(f"motion prior written to {path} (gate {prior.gate}, from t = {prior.from_t}, travel {prior.travel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
