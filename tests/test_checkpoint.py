"""Checkpoint bookkeeping (markers, pruning, RNG) and the engine's groups, schedule and config.

The DeepSpeed save/load itself is exercised end to end by tests/test_train.py (kill -9, SIGTERM).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from amorlip.config import get_run, load_config
from amorlip.models import create_model
from amorlip.train import checkpoint as ckpt
from amorlip.train.engine import GROUP_LOGIT, deepspeed_config, lr_at, param_groups, set_lr
from amorlip.train.progress import MetricsFile, nonfinite_terms


def _run(**overrides):
    config = load_config({"runs": {"r": {"model": "amorlip-tiny", **overrides}}}, check_paths=False)
    return get_run(config, "r")


def _tag(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.COMPLETE_MARKER).write_text("{}")
    return d


def test_only_marked_tags_count_and_newest_wins(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False), (3, False)):
        _tag(tmp_path, step, complete)
    (tmp_path / "latest").write_text("step-0000015")  # DeepSpeed's pointer is never trusted
    (tmp_path / "not-a-tag").mkdir()
    assert ckpt.complete_tags(tmp_path) == ["step-0000005", "step-0000010"]
    assert ckpt.latest_complete_tag(tmp_path) == "step-0000010"
    assert ckpt.torn_tags(tmp_path) == ["step-0000003", "step-0000015"]
    assert ckpt.latest_complete_tag(tmp_path / "missing") is None


def test_prune_keeps_the_newest_complete_and_newer_torn(tmp_path):
    for step in (5, 10, 15, 20):
        _tag(tmp_path, step)
    _tag(tmp_path, 7, complete=False)
    _tag(tmp_path, 25, complete=False)  # may be a save in progress: never removed
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step-0000005", "step-0000007", "step-0000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000015", "step-0000020", "step-0000025"]


def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


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


def test_deepspeed_config_is_fp32_on_cpu():
    run = _run(batch_size=64, nproc=2, zero_stage=2, precision="bf16", grad_clip=1.0)
    cpu = deepspeed_config(run, world_size=2, cuda=False)
    assert cpu["train_micro_batch_size_per_gpu"] == 32 and cpu["train_batch_size"] == 64
    assert cpu["zero_optimization"] == {"stage": 2} and cpu["gradient_clipping"] == 1.0
    assert "torch_autocast" not in cpu and "optimizer" not in cpu and "bf16" not in cpu
    gpu = deepspeed_config(run, world_size=2, cuda=True)
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_nonfinite_terms_names_the_bad_loss():
    assert nonfinite_terms({"loss": torch.tensor(1.0), "lambda_loss": 0.5, "lambda_gap": math.nan}) == {}
    bad = nonfinite_terms({"loss": torch.tensor(float("nan")), "encoder_loss": math.inf, "lambda_loss": 0.1})
    assert set(bad) == {"loss", "encoder_loss"}


def test_metrics_file_is_cut_back_on_resume(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 8):
        metrics.append({"step": step, "loss": 1.0 / step})
    assert metrics.truncate_after(5) == 5
    assert [r["step"] for r in metrics.read()] == [1, 2, 3, 4, 5]
