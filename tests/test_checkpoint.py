"""Checkpoint bookkeeping (markers, pruning, RNG) and the engine's groups, schedule and config.

The DeepSpeed save/load itself is exercised end to end by tests/test_train.py (kill -9, SIGTERM).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys

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


# --------------------------------------------------------------------------- file digests in the marker

# A real DeepSpeed ZeRO-1 save and resume of a tiny module, in a child process (the process group and
# DeepSpeed's globals stay out of the test process). After a clean resume, the optimizer shard (which
# DeepSpeed unpickles with weights_only=False) is replaced by a pickle that creates a folder when
# loaded: the resume must refuse it, naming the file, before anything unpickles it.
_SAVE_TAMPER_RESUME = """
import json, os, pickle, sys
from pathlib import Path
import torch
from amorlip.distributed import init_distributed
from amorlip.train import checkpoint as ckpt
init_distributed()
import deepspeed

class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), config={
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
engine.backward(engine(torch.ones(1, 4)).sum())
engine.step()
root = Path(sys.argv[1])
tag = ckpt.save_checkpoint(engine, root, 1, {"position": 7}, keep=2)
result = {"tag": tag, "resumed": ckpt.load_checkpoint(engine, root, tag)["position"]}
optim = next((root / tag).glob("*optim_states.pt"))
result["optim"] = optim.name
optim.write_bytes(pickle.dumps(Evil()))
try:
    ckpt.load_checkpoint(engine, root, tag)
    result["error"] = None
except ckpt.CheckpointIntegrityError as exc:
    result["error"] = str(exc)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-digests")
    pwned = root / "unpickled-code-ran"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-c", _SAVE_TAMPER_RESUME, str(root / "checkpoints"), str(pwned)],
                          env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root / "checkpoints", "pwned": pwned, **json.loads(lines[-1][len("RESULT "):])}


def test_resume_refuses_a_replaced_deepspeed_file_before_unpickling_it(tampered):
    assert tampered["resumed"] == 7, "an untouched checkpoint resumes"
    assert not tampered["pwned"].exists(), "the replaced optimizer file was unpickled"
    error = tampered["error"]
    assert error is not None, "the replaced optimizer file was accepted"
    assert tampered["optim"] in error and "changed after the checkpoint was saved" in error
    assert "previous complete checkpoint" in error  # the fix


def test_files_added_removed_or_unrecorded_are_refused_by_name(tampered, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(tampered["root"], root)
    tag_dir = root / tampered["tag"]
    tag = tag_dir.name
    marker = json.loads((tag_dir / ckpt.COMPLETE_MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in tag_dir.iterdir()} - {ckpt.COMPLETE_MARKER}
    # drop the replaced shard from the tag and its marker: what is left verifies
    del marker["files"][tampered["optim"]]
    (tag_dir / tampered["optim"]).unlink()
    (tag_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    ckpt.verify_checkpoint(root, tag)

    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(ckpt.CheckpointIntegrityError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt was not written"):
        ckpt.verify_checkpoint(root, tag)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()

    (tag_dir / "rng-rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointIntegrityError, match="rng-rank0.pt is missing"):
        ckpt.verify_checkpoint(root, tag)

    (tag_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))
    with pytest.raises(ckpt.CheckpointIntegrityError, match="records no file digests"):
        ckpt.verify_checkpoint(root, tag)
