"""The DeepSpeed engine around an open_clip model: ZeRO stage, AdamW groups, precision, lr.

Why a *client* ``torch.optim.AdamW`` rather than ``"optimizer"`` in the DeepSpeed config: the config
route builds DeepSpeed's FusedAdam, a two-minute JIT compile on CPU (env-python.md section 2), and
torch's AdamW is on ZeRO's supported list. The parameter groups are open_clip's (method notes 1.7):
no weight decay on gains and biases, and the logit scale (+ SigLIP's logit bias) in a group of its
own whose lr may differ (``run.lr_logit_scale``, the authors' ``--lr_tau``).

Precision: ``bf16`` runs the towers under ``torch.autocast`` (DeepSpeed's ``torch_autocast``
section), so parameters, optimizer state, losses and the lambda nets stay fp32; the logit-scale
clamp then acts on the real fp32 parameter. bf16 only on CUDA: on an AVX2 CPU it is 4-8x slower
than fp32 (env-python.md, pitfall 12), so a CPU run falls back to fp32 and says so.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from amorlip.config import RunConfig
from amorlip.schedules import cosine_lr

log = logging.getLogger(__name__)

GROUP_DECAY = "decay"
GROUP_NO_DECAY = "no_decay"
GROUP_LOGIT = "logit_scale"


def _is_logit_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("logit_scale", "logit_bias")


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: gains and biases (1-d tensors, norm layers, biases) take no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, run: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, gains/biases (wd 0), logit scale/bias (wd 0, own lr).

    Each group carries a ``name`` so the loop can give it its lr; empty groups are left out.
    """
    decay, no_decay, logit = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_logit_param(name):
            logit.append(param)
        elif _no_weight_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    logit_lr = run.lr_logit_scale if run.lr_logit_scale is not None else run.lr
    groups = [
        {"name": GROUP_DECAY, "params": decay, "weight_decay": run.weight_decay, "lr": run.lr},
        {"name": GROUP_NO_DECAY, "params": no_decay, "weight_decay": 0.0, "lr": run.lr},
        {"name": GROUP_LOGIT, "params": logit, "weight_decay": 0.0, "lr": logit_lr},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], run: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW, fused where the backend has it (CPU too: ~7x faster on the token embedding)."""
    kwargs = {"betas": tuple(run.adam_betas), "eps": run.adam_eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        log.info("fused AdamW unavailable on %s (%s); using the foreach implementation", device.type, exc)
        return torch.optim.AdamW(groups, **kwargs)


def use_bf16(run: RunConfig, cuda: bool) -> bool:
    if run.precision == "bf16" and not cuda:
        log.warning("precision bf16 requested but no CUDA device: training in fp32 (bf16 on CPU is "
                    "several times slower, and results match fp32 up to rounding)")
    return run.precision == "bf16" and cuda


def deepspeed_config(run: RunConfig, world_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config dict: no optimizer or scheduler entries (both are ours)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": run.local_batch_size,
        "train_batch_size": run.local_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(run.grad_clip) if run.grad_clip is not None else 0.0,
        "zero_optimization": {"stage": int(run.zero_stage)},
        "steps_per_print": 10**9,  # our own logging; DeepSpeed's would interleave with tqdm
        "wall_clock_breakdown": False,
    }
    if use_bf16(run, cuda):
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


def scalar_params_to_1d(model: nn.Module) -> list[str]:
    """Give every 0-dim parameter (open_clip's ``logit_scale``, ``logit_bias``) the shape ``[1]``.

    DeepSpeed 0.19.8 mishandles 0-dim parameters in several places: ``_broadcast_model`` and ZeRO-3's
    partitioning reinterpret each parameter as uint8 (``self.dim() cannot be 0 to view Float as
    Byte``) and ZeRO-0's gradient clipping multiplies in place by a ``[1]`` coefficient. A one-element
    vector has the same value, the same broadcasting in ``s * x @ y.T`` and the same gradient; the
    objectives read the scale through ``as_fp32_scale`` (a reshape to a scalar). The export reshapes
    them back, so ``model.pt`` matches a stock open_clip model. Returns the names changed.
    """
    changed = []
    for name, param in list(model.named_parameters()):
        if param.dim() != 0:
            continue
        owner = model
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
        changed.append(name)
    return changed


def build_engine(model: nn.Module, run: RunConfig, world_size: int, device: torch.device):
    """``deepspeed.initialize`` with our optimizer; returns ``(engine, optimizer)``.

    Call after :func:`amorlip.distributed.init_distributed` (DeepSpeed reuses that process group).
    """
    import deepspeed

    scalar_params_to_1d(model)
    model = model.to(device)
    optimizer = make_optimizer(param_groups(model, run), run, device)
    config = deepspeed_config(run, world_size, device.type == "cuda")
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    log.info("DeepSpeed ZeRO-%d, micro batch %d x %d ranks, grad clip %s, %s", run.zero_stage,
             run.local_batch_size, world_size, run.grad_clip,
             "bf16 autocast" if "torch_autocast" in config else "fp32")
    return engine, ds_optimizer


def lr_at(run: RunConfig, step: int, total_steps: int) -> dict[str, float]:
    """lr per group at global ``step``: warmup + cosine for the encoders (notes 1.7 step 5).

    The logit-scale group follows the same schedule unless ``run.lr_logit_scale`` is set, in which case
    it is constant (the authors' ``--lr_tau`` is not scheduled).
    """
    main = cosine_lr(step, run.lr, run.warmup_steps, total_steps)
    logit = run.lr_logit_scale if run.lr_logit_scale is not None else main
    return {GROUP_DECAY: main, GROUP_NO_DECAY: main, GROUP_LOGIT: logit}


def set_lr(optimizer: torch.optim.Optimizer, run: RunConfig, step: int, total_steps: int) -> float:
    """Write each group's lr for ``step``; returns the encoder lr (what gets logged)."""
    lrs = lr_at(run, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lrs[group.get("name", GROUP_DECAY)]
    return lrs[GROUP_DECAY]


@torch.no_grad()
def clamp_master_logit_scale(engine, max_scale: float) -> None:
    """Clamp the optimizer's fp32 master copy of log s, which ZeRO 1/2 keeps apart from the module.

    The task's clamp (``after_encoder_step``) acts on the module parameter; under ZeRO 1/2 the
    optimizer holds a separate fp32 partition and would undo it on the next step. Called on every
    rank after ``engine.step()``, while the module still holds the unclamped value (identical on every
    rank, so all ranks take the same branch); setting a master fragment is local, no collective.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    upper = math.log(max_scale)
    for name, param in engine.module.named_parameters():
        if name.rsplit(".", 1)[-1] != "logit_scale":
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: the module holds a partition; read the master (collective)
            value = safe_get_full_fp32_param(param)
        else:
            value = param.detach().float()
        if value is not None and bool(((value < 0.0) | (value > upper)).any()):
            safe_set_full_fp32_param(param, value.clamp(0.0, upper))
