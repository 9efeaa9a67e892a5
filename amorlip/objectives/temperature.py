"""Temperature handling shared by the objectives (docs/method.md, "Temperature").

AmorLIP follows FastCLIP-v3: the loss is rescaled to ``loss / sg(s) + rho / s`` so that rho steers
the learnable scale s (rho > 0 pushes s up, rho < 0 down), and log s is clamped to
``[0, ln max_scale]`` after every optimiser step, as open_clip and the authors' code do.
"""

from __future__ import annotations

import math

import torch

from amorlip.objectives.clip import as_fp32_scale


def rescale_loss(loss: torch.Tensor, logit_scale: torch.Tensor | float, rho: float) -> torch.Tensor:
    """``loss / sg(s) + rho / s``: s is detached in the divisor only, not in rho/s (paper App. C)."""
    s = as_fp32_scale(logit_scale, loss.device)
    return loss.float() / s.detach() + rho / s


def _logit_scale_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters()
            if name == "logit_scale" or name.endswith(".logit_scale")]


@torch.no_grad()
def clamp_logit_scale_(model: torch.nn.Module, max_scale: float) -> None:
    """Clamp every ``logit_scale`` parameter (log s) of ``model`` to ``[0, ln max_scale]`` in place.

    Works on a plain module, a DDP wrapper or a DeepSpeed engine (their parameter names carry a
    ``module.`` prefix). A ZeRO-3 partitioned parameter (one with ``ds_id``) is gathered first; rank
    0's clamped value is broadcast back when the context exits (call it on every rank). The fp32
    master copy that a DeepSpeed optimizer keeps apart from the module is not touched here: the
    trainer clamps every copy after each step (``amorlip.train.engine.clamp_logit_scale_after_step``).
    """
    upper = math.log(max_scale)
    for param in _logit_scale_params(model):
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
                param.data.clamp_(0.0, upper)
        else:
            param.data.clamp_(0.0, upper)
