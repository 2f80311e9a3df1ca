"""Pretraining the embedded cascade's stages on the procedural shapes world (videos and images).

config.py (PretrainConfig, the learning-rate schedule), data.py (the world batches), motion.py (the
motion prior), run.py (a stage through the training loop, export).
The `dreamix pretrain` command is dreamix_ray/cluster/pretrain_cli.py (it can dispatch to Ray Train).
"""

from .config import PretrainConfig, learning_rate
from .data import (
           OPPOSITE,
           held_out,
           pretrain_batch,
           reversed_twin,
           step_scenes,
           training_scenes,
           world_batch,
)
from .motion import fit_world_motion_prior
from .run import export_cascade, pretrain_spec, publish_ema, train_stage

__all__ = ["OPPOSITE", "PretrainConfig", "export_cascade", "fit_world_motion_prior",
           "held_out", "learning_rate", "pretrain_batch", "pretrain_spec", "publish_ema",
           "reversed_twin", "step_scenes", "train_stage", "training_scenes", "world_batch"]
