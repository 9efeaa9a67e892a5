"""The DeepSpeed engine around an open_clip model: ZeRO stage, AdamW groups, precision, lr.

Why a *client* ``torch.optim.AdamW`` rather than ``"optimizer"`` in the DeepSpeed config: the config
route builds DeepSpeed's FusedAdam, a two-minute JIT compile on CPU, and
torch's AdamW is on ZeRO's supported list. The parameter groups are open_clip's (``open_clip_train/main.py``):
no weight decay on gains and biases, and the logit scale (+ SigLIP's logit bias) in a group of its
own whose lr may differ (``run.lr_logit_scale``, the authors' ``--lr_tau``).

Precision: ``bf16`` runs the towers under ``torch.autocast`` (DeepSpeed's ``torch_autocast``
section), so parameters, optimizer state, losses and the lambda nets stay fp32; the logit-scale
clamp then acts on the real fp32 parameter. bf16 only on CUDA: on an AVX2 CPU it is 4-8x slower
than fp32 (no native bf16 arithmetic), so a CPU run falls back to fp32 and says so.
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


def deepspeed_config(run: RunConfig, world, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config dict: no optimizer or scheduler entries (both are ours).

    The batch geometry comes from the :class:`~amorlip.distributed.WorldInfo` alone (micro batch =
    its local batch, train batch = its global batch), so DeepSpeed's view of the batch can never
    disagree with what the loader yields. ZeRO 1/2 overlap the gradient reduction with the backward
    pass in buckets of ``run.zero_bucket_size`` elements (``overlap_comm``, ``contiguous_gradients``):
    with one bucket larger than the model the whole exchange waits for backward to finish, which
    across nodes costs the full all-reduce time on every step. overlap_comm needs CUDA streams, so it
    is only set with a GPU.
    """
    zero: dict[str, Any] = {"stage": int(run.zero_stage)}
    if run.zero_stage in (1, 2, 3):
        bucket = int(run.zero_bucket_size)
        zero.update(contiguous_gradients=True, reduce_bucket_size=bucket, allgather_bucket_size=bucket,
                    overlap_comm=bool(cuda and run.zero_overlap_comm))
        if run.zero_stage == 3:
            zero.pop("allgather_bucket_size")  # ZeRO-3 names its prefetch bucket differently
            zero["stage3_prefetch_bucket_size"] = bucket
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": world.local_batch,
        "train_batch_size": world.global_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(run.grad_clip) if run.grad_clip is not None else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own logging; DeepSpeed's would interleave with tqdm
        "wall_clock_breakdown": False,
    }
    if use_bf16(run, cuda):
        # The towers run under bf16 autocast; parameters, optimizer state, losses and the lambda nets
        # stay fp32. An empty lower_precision_safe_modules keeps the gradient all-reduce in fp32 too:
        # DeepSpeed's default list (Linear, Conv) would reduce those gradients in bf16, losing ~3
        # significant digits per sum across ranks.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
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


def build_engine(model: nn.Module, run: RunConfig, world):
    """``deepspeed.initialize`` with our optimizer on ``world.device``; returns ``(engine, optimizer)``.

    ``world`` is the job's :class:`~amorlip.distributed.WorldInfo` (DeepSpeed reuses its process group).
    """
    import deepspeed

    scalar_params_to_1d(model)
    model = model.to(world.device)
    optimizer = make_optimizer(param_groups(model, run), run, world.device)
    config = deepspeed_config(run, world, world.device.type == "cuda")
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    log.info("DeepSpeed ZeRO-%d, micro batch %d x %d ranks = %d, grad clip %s, %s", run.zero_stage,
             world.local_batch, world.world_size, world.global_batch, run.grad_clip,
             "bf16 autocast" if "torch_autocast" in config else "fp32")
    return engine, ds_optimizer


def lr_at(run: RunConfig, step: int, total_steps: int) -> dict[str, float]:
    """lr per group at global ``step``: warmup + cosine for the encoders (open_clip's ``cosine_lr``).

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


def set_logit_scale_lr_by_threshold(optimizer: torch.optim.Optimizer, run: RunConfig, logit_scale: float) -> float | None:
    """FastCLIP's ``step_lr_thresh`` rule, which the AmorLIP authors use for the temperature.

    When ``run.lr_logit_scale_thresh`` is set and the temperature 1/s of this step's forward is at or
    below it, the logit-scale group's lr (as :func:`set_lr` left it for this step) is multiplied by
    ``run.lr_logit_scale_thresh_ratio``; above it the lr stays. Evaluated every step on the s the
    forward used, i.e. the value after the previous step's update and clamp, as the authors'
    scheduler reads ``model.logit_scale`` before each step. Returns the group's lr, or None when off.
    """
    if run.lr_logit_scale_thresh is None:
        return None
    lr = None
    for group in optimizer.param_groups:
        if group.get("name") != GROUP_LOGIT:
            continue
        if logit_scale > 0 and 1.0 / logit_scale <= run.lr_logit_scale_thresh:
            group["lr"] = group["lr"] * run.lr_logit_scale_thresh_ratio
        lr = group["lr"]
    return lr


def logit_scale_params(engine) -> list[nn.Parameter]:
    return [p for name, p in engine.module.named_parameters() if name.rsplit(".", 1)[-1] == "logit_scale"]


@torch.no_grad()
def clamp_logit_scale_after_step(engine, max_scale: float) -> None:
    """Clamp log s to ``[0, ln max_scale]`` in every copy this rank holds, with no collective and no
    host read (called after every ``engine.step()``; the authors' and open_clip's clamp).

    - the module parameter (ZeRO 0-2: the full value; ZeRO-3: this rank's partition ``ds_tensor``,
      and the gathered value too when ZeRO-3 keeps it between steps, as it does for parameters below
      ``stage3_param_persistence_threshold``: the next forward reads that one);
    - the optimizer's fp32 master copy, which ZeRO keeps apart from the module and would otherwise
      write back unclamped at the next step: ZeRO 1/2 through the parameter's local fragment
      (``set_full_hp_param`` narrows the full value to it), ZeRO-3 through its local fp32 partition.

    Each rank clamps only what it owns, so ranks whose ZeRO-3 partition of the one-element parameter
    is padding do the same harmless work. The clamp is unconditional: testing whether it is needed
    would read the device on every step.
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    upper = math.log(max_scale)
    for param in logit_scale_params(engine):
        if hasattr(param, "ds_id"):  # ZeRO-3: module partition and fp32 master partition, both local
            param.ds_tensor.data.clamp_(0.0, upper)
            if param.data.numel():  # a small "persistent" parameter stays gathered between steps
                param.data.clamp_(0.0, upper)
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(0.0, upper))
            continue
        param.data.clamp_(0.0, upper)
        if getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1/2 master fragment
            param.set_full_hp_param(param.data.float())
