"""amorlip.train.engine: the AdamW groups, the lr schedule per group, the temperature-lr rule and the
DeepSpeed config. The step through the engine is tested with the tasks (tests/test_tasks.py)."""

from __future__ import annotations

import pytest
import torch

from amorlip.config import get_run, load_config
from amorlip.models import create_model
from amorlip.train.engine import GROUP_LOGIT, deepspeed_config, lr_at, param_groups, set_lr


def _run(**overrides):
    config = load_config({"runs": {"r": {"model": "amorlip-tiny", **overrides}}}, check_paths=False)
    return get_run(config, "r")


def test_param_groups_follow_open_clip():
    run = _run(method="siglip", weight_decay=0.2, lr=1e-3, lr_logit_scale=1e-4)
    model, _, _ = create_model("amorlip-tiny", siglip_init_bias=-10.0)
    groups = {g["name"]: g for g in param_groups(model, run)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    logit = {names[id(p)] for p in groups[GROUP_LOGIT]["params"]}
    assert logit == {"logit_scale", "logit_bias"}
    assert "token_embedding.weight" in decay and "visual.conv1.weight" in decay
    assert "ln_final.weight" in no_decay and "visual.class_embedding" in no_decay
    assert all("bias" not in n and "ln" not in n for n in decay)
    assert len(decay) + len(no_decay) + len(logit) == len(names)
    assert groups["decay"]["weight_decay"] == 0.2 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups[GROUP_LOGIT]["weight_decay"] == 0.0 and groups[GROUP_LOGIT]["lr"] == 1e-4


def test_lr_schedule_per_group():
    run = _run(lr=1e-3, warmup_steps=10)
    assert lr_at(run, 0, 100)["decay"] == pytest.approx(1e-4)
    assert lr_at(run, 9, 100)["decay"] == pytest.approx(1e-3)
    assert lr_at(run, 55, 100)["decay"] == pytest.approx(0.5e-3)
    assert lr_at(run, 55, 100)[GROUP_LOGIT] == lr_at(run, 55, 100)["decay"]  # no own lr: follows
    run_tau = _run(lr=1e-3, warmup_steps=10, lr_logit_scale=1e-4)
    assert {lr_at(run_tau, s, 100)[GROUP_LOGIT] for s in (0, 50, 99)} == {1e-4}  # constant
    model, _, _ = create_model("amorlip-tiny")
    opt = torch.optim.AdamW(param_groups(model, run_tau))
    assert set_lr(opt, run_tau, 55, 100) == pytest.approx(0.5e-3)
    assert {g["name"]: g["lr"] for g in opt.param_groups}[GROUP_LOGIT] == 1e-4


def _world(world_size: int, global_batch: int):
    from amorlip.distributed import WorldInfo

    return WorldInfo(rank=0, local_rank=0, world_size=world_size, group=None, device=torch.device("cpu"),
                     global_batch=global_batch, local_batch=global_batch // world_size)


def test_deepspeed_config_is_fp32_on_cpu():
    run = _run(batch_size=64, nproc=2, zero_stage=2, precision="bf16", grad_clip=1.0)
    cpu = deepspeed_config(run, _world(2, 64), cuda=False)
    assert cpu["train_micro_batch_size_per_gpu"] == 32 and cpu["train_batch_size"] == 64
    assert cpu["zero_optimization"]["stage"] == 2 and cpu["gradient_clipping"] == 1.0
    assert "torch_autocast" not in cpu and "optimizer" not in cpu and "bf16" not in cpu
    gpu = deepspeed_config(run, _world(2, 64), cuda=True)
    # bf16 towers, but the gradient all-reduce stays fp32 (no module is "lower-precision safe")
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def test_zero_overlaps_gradient_exchange_in_buckets_smaller_than_the_model():
    run = _run(batch_size=64, zero_stage=2, zero_bucket_size=1000)
    gpu = deepspeed_config(run, _world(1, 64), cuda=True)["zero_optimization"]
    assert gpu["overlap_comm"] is True and gpu["contiguous_gradients"] is True
    assert gpu["reduce_bucket_size"] == gpu["allgather_bucket_size"] == 1000
    # overlap_comm needs CUDA streams: off on CPU, the buckets stay
    cpu = deepspeed_config(run, _world(1, 64), cuda=False)["zero_optimization"]
    assert cpu["overlap_comm"] is False and cpu["reduce_bucket_size"] == 1000
    z3 = deepspeed_config(_run(zero_stage=3, zero_bucket_size=1000), _world(1, 64), cuda=True)["zero_optimization"]
    assert z3["stage3_prefetch_bucket_size"] == 1000 and "allgather_bucket_size" not in z3
    assert deepspeed_config(_run(zero_stage=0), _world(1, 64), cuda=True)["zero_optimization"] == {"stage": 0}


def test_temperature_lr_drops_by_the_ratio_below_the_threshold():
    from amorlip.train.engine import set_logit_scale_lr_by_threshold

    run = _run(lr=1e-3, lr_logit_scale=1e-4, lr_logit_scale_thresh=0.03)
    model, _, _ = create_model("amorlip-tiny")
    opt = torch.optim.AdamW(param_groups(model, run))
    set_lr(opt, run, 10, 100)
    assert set_logit_scale_lr_by_threshold(opt, run, 14.3) == pytest.approx(1e-4)  # 1/s = 0.07 > 0.03
    set_lr(opt, run, 11, 100)
    assert set_logit_scale_lr_by_threshold(opt, run, 40.0) == pytest.approx(1e-4 / 3)  # 1/s = 0.025
    set_lr(opt, run, 12, 100)  # recomputed every step from the current s (not a one-way latch)
    assert set_logit_scale_lr_by_threshold(opt, run, 20.0) == pytest.approx(1e-4)
    assert set_logit_scale_lr_by_threshold(opt, _run(), 40.0) is None  # off by default
