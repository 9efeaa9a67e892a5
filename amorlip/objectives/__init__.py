"""The training objectives: CLIP and SigLIP baselines and AmorLIP's amortized losses.

Fixed interface: all feature inputs are L2-normalised ``[B, D]`` tensors, ``logit_scale``
is s (not log s), results are fp32 whatever the input dtype, and ``group`` names the process group
of the global batch (None = one process).
"""

from amorlip.objectives.amorlip import (
    LAMBDA_LOSS_KINDS,
    encoder_loss,
    encoder_loss_local,
    lambda_loss,
    mix_log_targets,
    partition_targets,
    weighted_logits,
)
from amorlip.objectives.clip import clip_loss
from amorlip.objectives.siglip import siglip_loss
from amorlip.objectives.temperature import clamp_logit_scale_, rescale_loss

__all__ = [
    "LAMBDA_LOSS_KINDS",
    "clamp_logit_scale_",
    "clip_loss",
    "encoder_loss",
    "encoder_loss_local",
    "lambda_loss",
    "mix_log_targets",
    "partition_targets",
    "rescale_loss",
    "siglip_loss",
    "weighted_logits",
]
