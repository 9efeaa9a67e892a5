"""Schedules as specified in docs/method.md and docs/variants.md (beta ramp, rho segments, cadences, lr)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from amorlip.schedules import (
    beta_for_epoch,
    cosine_lr,
    epoch_schedule,
    is_ema_step,
    is_lambda_step,
    is_reinit_epoch,
    rho_for_epoch,
)


def test_beta_cosine_ramp_per_epoch():
    # published command: beta_T = 0.8 over --beta_decay_epochs 16: beta_0 = 0, beta_8 = 0.4, beta_16+ = 0.8
    assert beta_for_epoch(0, 0.8, 16) == 0.0
    assert beta_for_epoch(8, 0.8, 16) == pytest.approx(0.4)
    assert beta_for_epoch(16, 0.8, 16) == pytest.approx(0.8)
    assert beta_for_epoch(40, 0.8, 16) == pytest.approx(0.8)
    for e in range(16):
        assert beta_for_epoch(e, 0.8, 16) == pytest.approx(0.8 - 0.4 * (1 + math.cos(math.pi * e / 16)))
    ramp = [beta_for_epoch(e, 0.8, 16) for e in range(20)]
    assert ramp == sorted(ramp)


def test_rho_segments_of_the_published_command():
    # docs/variants.md (rho): [8.5, -8.5, -8.5] over 33 epochs -> +8.5 for epochs 0-10, -8.5 for 11-32
    schedule = epoch_schedule([8.5, -8.5, -8.5], 33)
    assert schedule == [8.5] * 11 + [-8.5] * 22
    assert [rho_for_epoch(e, [8.5, -8.5, -8.5], 33) for e in (0, 10, 11, 32)] == [8.5, 8.5, -8.5, -8.5]


def test_epoch_schedule_remainder_goes_to_the_last_segment():
    assert epoch_schedule([1, 2, 3], 10) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert epoch_schedule([6.5, 6.5, 6.5, -8.0], 30) == [6.5] * 21 + [-8.0] * 9
    assert epoch_schedule(3, 4) == [3.0] * 4
    assert epoch_schedule([1, 2, 3], 2) == [3.0, 3.0]  # fewer epochs than segments: the authors' behaviour
    assert rho_for_epoch(50, [1.0, 2.0], 4) == 2.0


def test_lambda_cadence_counts_in_epoch_steps():
    assert [k for k in range(20) if is_lambda_step(k, 8)] == [0, 8, 16]
    assert all(is_lambda_step(k, 1) for k in range(5))
    assert [k for k in range(7) if is_ema_step(k, 2)] == [0, 2, 4, 6]
    assert [e for e in range(5) if is_reinit_epoch(e, 1)] == [0, 1, 2, 3, 4]
    assert [e for e in range(5) if is_reinit_epoch(e, 2)] == [0, 2, 4]


def test_cosine_lr_warmup_then_cosine_to_zero():
    base, warmup, total = 1e-3, 10, 110
    assert cosine_lr(0, base, warmup, total) == pytest.approx(base / 10)
    assert cosine_lr(9, base, warmup, total) == pytest.approx(base)
    assert cosine_lr(10, base, warmup, total) == pytest.approx(base)
    assert cosine_lr(60, base, warmup, total) == pytest.approx(base / 2)
    assert cosine_lr(109, base, warmup, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert cosine_lr(110, base, warmup, total) == 0.0
    assert cosine_lr(500, base, warmup, total) == 0.0
    assert cosine_lr(0, base, 0, 100) == pytest.approx(base)
    values = [cosine_lr(k, base, warmup, total) for k in range(warmup, total)]
    assert values == sorted(values, reverse=True)


def test_explicit_rho_segments_put_the_annealing_in_the_last_quarter():
    from amorlip.config import ConfigError, get_run, load_config

    # equal segments cannot say "the last quarter of 30 epochs": [6.5]*3 + [-8.0] gives 9 epochs
    assert epoch_schedule([6.5, 6.5, 6.5, -8.0], 30).count(-8.0) == 9
    schedule = epoch_schedule([6.5, -8.0], 30, [23, 7])
    assert schedule[:23] == [6.5] * 23 and schedule[23:] == [-8.0] * 7
    # the shipped medium-scale config: every annealed epoch lies in the last quarter (epoch >= 22.5)
    config_file = Path(__file__).resolve().parents[1] / "config" / "cc3m-rn50.yaml"
    run = get_run(load_config(config_file, check_paths=False), "amorlip")
    annealed = [e for e in range(run.epochs)
                if rho_for_epoch(e, run.amorlip.rho, run.epochs, run.amorlip.rho_epochs) < 0]
    assert annealed == list(range(23, 30)) and len(annealed) / run.epochs <= 0.25
    assert run.lr_logit_scale_thresh == 0.03  # the authors' temperature-lr threshold rule
    with pytest.raises(ConfigError, match=r"amorlip.rho_epochs.*summing to epochs \(30\)"):
        load_config({"datasets": {"d": {"source": "emoji"}}, "defaults": {"dataset": "d", "epochs": 30},
                     "runs": {"r": {"amorlip": {"rho": [6.5, -8.0], "rho_epochs": [20, 7]}}}}, check_paths=False)
