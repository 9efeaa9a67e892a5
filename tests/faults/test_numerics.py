"""Numerics: a non-finite loss and a lambda divergence stop the run, say where and why, keep a checkpoint.

Real triggers, no injected tensors:
- **NaN/inf**: ``lr: 1e30``. AdamW's first update moves every weight by about 1e30 (Adam normalises
  the gradient, so the step is the lr itself); the next forward overflows float32 and the loss is
  non-finite. With a checkpoint after every step, the newest checkpoint is the state right before
  the bad step, and its weights must all still be finite (the bad step never reached them).
- **Lambda divergence**: ``amorlip.divergence_bound: 1e-6``, far below any real gap between the
  previous epoch's lambda net and the log targets (``lambda_gap_prev``), so the check (armed after
  the first epoch) fires at the first step of epoch 1.

Both runs start together (they are independent).
"""

from __future__ import annotations

import re

import pytest
import torch

from amorlip.train import checkpoint as ckpt

from .conftest import run_dir, train_job, write_tiny_config

EXIT_DIVERGED = 1


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, mlflow_template_db) -> dict:
    root = tmp_path_factory.mktemp("numerics")
    nan_cfg = write_tiny_config(root / "nan", run_overrides={"lr": 1.0e30, "checkpoint_every": 1, "epochs": 1})
    div_cfg = write_tiny_config(root / "div", run_overrides={
        "samples_per_epoch": 32, "epochs": 3, "checkpoint_every": 1000, "amorlip": {"divergence_bound": 1.0e-6}})
    jobs = {"nan": train_job(nan_cfg, "tiny-run", root / "nan.log"),
            "div": train_job(div_cfg, "tiny-run", root / "div.log")}
    out = {}
    for name, job in jobs.items():
        rc = job.wait(300)
        out[name] = {"rc": rc, "log": job.text(), "root": root / name}
    return out


def test_nonfinite_loss_stops_with_step_terms_and_checkpoint(stopped_runs):
    res = stopped_runs["nan"]
    assert res["rc"] == EXIT_DIVERGED, res["log"][-3000:]
    m = re.search(r"non-finite loss at step (\d+) \(epoch \d+, step \d+ of the epoch\): (.*?) \(on rank", res["log"])
    assert m, res["log"][-3000:]
    step, terms = int(m.group(1)), m.group(2)
    assert re.search(r"(loss|encoder_loss)=(nan|inf|-inf)", terms), terms
    ckpt_dir = run_dir(res["root"]) / "checkpoints"
    kept = ckpt.latest_complete_tag(ckpt_dir)
    assert kept == ckpt.tag_for(step), (kept, step)  # the state right before the bad step
    assert f"the last good checkpoint ({kept}) is kept" in res["log"]
    assert "Lower lr" in res["log"]
    assert not (run_dir(res["root"]) / "train.json").exists()
    states = torch.load(ckpt_dir / kept / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in states["module"].values() if t.is_floating_point())
    print(f"\nlr 1e30: stopped at step {step} with {terms}; kept {kept}, all of its weights finite")


def test_lambda_divergence_is_detected_and_reported(stopped_runs):
    res = stopped_runs["div"]
    assert res["rc"] == EXIT_DIVERGED, res["log"][-3000:]
    m = re.search(r"lambda divergence at step (\d+) \(epoch (\d+), step (\d+) of the epoch\): "
                  r"\|(lambda_gap\w*)\| = ([0-9.e+-]+) > divergence_bound 1e-06", res["log"])
    assert m, res["log"][-3000:]
    step, epoch, in_epoch = int(m.group(1)), int(m.group(2)), int(m.group(3))
    signal_name, gap = m.group(4), float(m.group(5))
    assert (epoch, in_epoch) == (1, 0) and step == 2  # armed after the first epoch (2 steps), fires at once
    kept = ckpt.latest_complete_tag(run_dir(res["root"]) / "checkpoints")
    assert kept == ckpt.tag_for(2)  # the epoch-end checkpoint before the diverged step
    assert f"the last good checkpoint ({kept}) is kept" in res["log"]
    assert "Lower amorlip.lambda_lr or raise the bound" in res["log"]
    print(f"\nlambda divergence: step {step} (epoch {epoch}), |{signal_name}| {gap:.4g} > bound 1e-06; kept {kept}")
