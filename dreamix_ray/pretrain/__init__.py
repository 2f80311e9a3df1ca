"""Pretraining the embedded cascade's stages on the procedural shapes world (videos and images).

config.py (PretrainConfig, the learning-rate schedule), data.py (the world batches), motion.py (the
motion prior and the experimental motion planes), run.py (a stage through the training loop, export).
The `dreamix pretrain` command is dreamix_ray/cluster/pretrain_cli.py (it can dispatch to Ray Train).
"""

from .config import PretrainConfig, learning_rate, stage_denoisers
from .data import (
           OPPOSITE,
           held_out,
           pretrain_batch,
           reversed_twin,
           step_scenes,
           training_scenes,
           world_batch,
)
from .motion import fit_motion_projection, fit_world_motion_prior, motion_targets
from .run import export_cascade, pretrain_spec, publish_ema, train_stage

__all__ = ["OPPOSITE", "PretrainConfig", "export_cascade", "fit_motion_projection", "fit_world_motion_prior",
           "held_out", "learning_rate", "motion_targets", "pretrain_batch", "pretrain_spec", "publish_ema",
           "reversed_twin", "stage_denoisers", "step_scenes", "train_stage", "training_scenes", "world_batch"]
