"""The trainer end to end: real shards, the real CLI, DeepSpeed on gloo (1 and 2 ranks), MLflow SQLite.

Each run is the tiny model on 192 colour-captioned samples (tests/train_configs.py), 12 steps per
epoch. The runs are shared with tests/test_export.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from train_configs import child_env, ensure_trained, read_jsonl, run_cli, shared_root, train_cmd, trainer_root

from amorlip.config import load_config
from amorlip.data.loader import TrainLoader
from amorlip.train.checkpoint import COMPLETE_MARKER, complete_tags, step_of
from amorlip.train.export import consolidated_state_dict
from amorlip.train.run import EXIT_REQUEUE, train

pytestmark = pytest.mark.dist


# Runs these tests watch while they train (a signal, a kill, a dead MLflow): trained here only, in a
# folder made for this module, so that no earlier module or reused folder can train them first.
INTERRUPTED_RUNS = {
    "term": {"method": "clip", "zero_stage": 0},                                    # 1 rank, SIGTERM
    "z2": {"method": "clip", "nproc": 2, "zero_stage": 2, "max_logit_scale": 10.0},  # 2 ranks, MLflow down
    "kill": {"method": "amorlip", "nproc": 2, "zero_stage": 1},                     # 2 ranks, kill -9
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A new folder (numbered by pytest, never reused) holding INTERRUPTED_RUNS untrained."""
    return trainer_root(tmp_path_factory.mktemp("trainer-interrupted"), INTERRUPTED_RUNS)


def _summary(root: Path, run: str) -> dict:
    return json.loads((root / "runs" / run / "train.json").read_text())


def _losses(root: Path, run: str, key: str = "loss") -> list[float]:
    return [r[key] for r in read_jsonl(root / "runs" / run / "metrics.jsonl") if "kind" not in r]


def _weights_sha(state: dict[str, torch.Tensor]) -> str:
    """The digest the trainer writes with AMORLIP_DEBUG_KEYS (loop.Trainer.debug_final)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _debug_records(prefix: Path, rank: int) -> list[dict]:
    return read_jsonl(f"{prefix}.rank{rank}.jsonl")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _last_logged_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


# --------------------------------------------------------------------------- one rank


def test_amorlip_one_rank_outputs_and_mlflow(root):
    ensure_trained(root, "amor")
    summary = _summary(root, "amor")
    assert {"run", "method", "variant", "steps", "epochs", "samples_seen", "wall_time_s", "images_per_s",
            "final_losses", "skipped_samples", "mlflow_run_id", "world_size"} <= set(summary)
    assert (summary["method"], summary["variant"], summary["world_size"]) == ("amorlip", "published", 1)
    assert summary["steps"] == summary["total_steps"] == 24 and summary["samples_seen"] == 24 * 16
    assert summary["skipped_samples"] == 0 and summary["images_per_s"] > 0
    assert set(summary["final_losses"]) >= {"loss", "encoder_loss", "lambda_loss"}

    lines = read_jsonl(root / "runs" / "amor" / "metrics.jsonl")
    records = [r for r in lines if "kind" not in r]  # the step records; per-epoch diagnostics apart
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["step"] for r in lines if r.get("kind") == "amortization"] == [12, 24]  # one per epoch end
    # the fixed-batch validation metric: once per epoch end, all 192 samples (fewer than the default 256)
    val = [r for r in lines if r.get("kind") == "validation"]
    assert [(r["step"], r["epoch"], r["val_batch"]) for r in val] == [(12, 0, 192), (24, 1, 192)]
    assert all(0 < r["val_infonce"] < math.log(192) for r in val), val  # the colour signal is picked up
    assert summary["validation"] == {k: v for k, v in val[-1].items() if k not in ("kind", "time")} | {"temperature": 0.07}
    assert {"lr", "logit_scale", "lambda_gap", "images_per_s", "epoch"} <= set(records[0])
    epoch0 = [r["loss"] for r in records if r["epoch"] == 0 and r["step"] <= 12]
    assert sum(epoch0[-3:]) / 3 < epoch0[0] - 0.1, epoch0  # the encoder objective goes down in epoch 0
    lam = [r["lambda_loss"] for r in records if r["step"] > 12]
    assert sum(lam[-3:]) / 3 < lam[0], lam  # the lambda nets fit the epoch-1 targets
    assert (root / "runs" / "amor" / "loss_curves.png").stat().st_size > 1000

    config = load_config(root / "config.yaml")
    parent = json.loads((root / "results" / "mlflow_parent.json").read_text())
    client = MlflowClient(parent["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    # named by what ran (method-variant-batch-seed, then the config's name); the config's name as a tag
    assert run.info.status == "FINISHED" and run.info.run_name == "amorlip-published-b16-s0-amor"
    assert run.data.tags["amorlip.run"] == "amor"
    # system metrics on the training run (MLflow's monitor; at least its closing sample)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
    assert run.data.tags["method"] == "amorlip" and run.data.tags["variant"] == "published"
    assert run.data.tags["amorlip.kind"] == "train"
    assert run.data.params["amorlip.pos_coef"] == "0.001" and run.data.params["batch_size"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 25))
    assert client.get_metric_history(run.info.run_id, "lambda_gap")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/infonce")] == \
        [(r["step"], pytest.approx(r["val_infonce"])) for r in val]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train.json", "loss_curves.png", "run_config.yaml", "metrics.jsonl"} <= artifacts

    # a finished run is a no-op (Snakemake may call it again after --touch or a rerun)
    mtime = (root / "runs" / "amor" / "train.json").stat().st_mtime_ns
    assert train(config, "amor") == 0
    assert (root / "runs" / "amor" / "train.json").stat().st_mtime_ns == mtime
    # ... that redraws loss_curves.png (a rule output) when only the figure is gone
    (root / "runs" / "amor" / "loss_curves.png").unlink()
    assert train(config, "amor") == 0
    assert (root / "runs" / "amor" / "loss_curves.png").stat().st_size > 1000
    assert (root / "runs" / "amor" / "train.json").stat().st_mtime_ns == mtime


def test_sigterm_checkpoints_then_requeue_resumes(fresh):
    root = fresh
    run_dir = root / "runs" / "term"
    assert not (run_dir / "train.json").exists()
    proc = subprocess.Popen(train_cmd(root / "config.yaml", "term"), env=child_env(AMORLIP_DEBUG_STEP_SLEEP="0.3"),
                            text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _last_logged_step(run_dir / "metrics.jsonl") >= 3, proc, what="step 3")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "requeued" in err
    tags = complete_tags(run_dir / "checkpoints")
    stopped_at = step_of(tags[-1])
    assert 3 <= stopped_at < 24 and not (run_dir / "train.json").exists()
    marker = json.loads((run_dir / "checkpoints" / tags[-1] / COMPLETE_MARKER).read_text())
    assert marker["step"] == stopped_at
    assert _last_logged_step(run_dir / "metrics.jsonl") == stopped_at  # the stop came at a step boundary

    res = run_cli(root / "config.yaml", "term")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = _summary(root, "term")
    assert summary["steps"] == 24 and summary["resumed_from"] == tags[-1]
    # every step once (the per-epoch validation records, which carry a "kind", apart)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "kind" not in r] == list(range(1, 25))
    losses = _losses(root, "term")
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses  # colour captions are learnable
    # the resumed job continued the same MLflow run
    parent = json.loads((root / "results" / "mlflow_parent.json").read_text())
    client = MlflowClient(parent["tracking_uri"])
    runs = client.search_runs([parent["experiment_id"]], "tags.`amorlip.run` = 'term'")  # the config's run name
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")] == list(range(1, 25))


# --------------------------------------------------------------------------- two ranks


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_zero2_agree_and_survive_dead_mlflow(fresh, tmp_path):
    root = fresh
    assert not (root / "runs" / "z2" / "train.json").exists()
    keys = tmp_path / "keys"
    env = child_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_closed_port()}", AMORLIP_DEBUG_KEYS=str(keys))
    res = run_cli(root / "config.yaml", "z2", nproc=2, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "MLflow unreachable" in res.stderr and "amorlip mlflow replay" in res.stderr
    summary = _summary(root, "z2")
    assert summary["world_size"] == 2 and summary["steps"] == 24 and summary["mlflow_run_id"] is None
    offline = read_jsonl(root / "runs" / "z2" / "mlflow-offline.jsonl")
    assert sum(e["event"] == "metrics" and "loss" in e["metrics"] for e in offline) == 24
    # collective accounting through the CLI: CLIP at G = 16, d = 32 gathers 2 x 16 x 32 x 4 bytes a step;
    # ZeRO-2's gradient all-reduce is the 4-byte gradients; every logged step carries the figures to MLflow
    comm = summary["collectives"]
    assert (comm["world_size"], comm["steps"]) == (2, 24)
    assert comm["per_step"]["all_gather"] == {"calls": 2.0, "bytes": 2 * 16 * 32 * 4}
    assert comm["per_step"]["reduce_scatter"] == {"calls": 2.0, "bytes": 2 * 16 * 32 * 4}
    assert comm["per_step"]["deepspeed_grad_all_reduce"]["bytes"] % 4 == 0 and "deepspeed_grad_all_reduce" in comm["computed"]
    assert all(e["metrics"]["comm/all_gather_bytes"] == 4096.0 for e in offline
               if e["event"] == "metrics" and "loss" in e["metrics"])
    losses = _losses(root, "z2")
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    # s starts at 14.3 > max_logit_scale 10: clamped after step 1 and stays clamped, so the ZeRO master
    # copy was clamped too (a module-only clamp would be undone by the next optimizer step)
    scales = [r["logit_scale"] for r in read_jsonl(root / "runs" / "z2" / "metrics.jsonl") if "kind" not in r]
    assert scales[0] > 14 and max(scales[1:]) <= 10.0 + 1e-4, scales

    finals = [[r for r in _debug_records(keys, rank) if "weights_sha256" in r][-1] for rank in (0, 1)]
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]  # replicas agree
    steps = [[r["step"] for r in _debug_records(keys, rank) if "keys" in r] for rank in (0, 1)]
    assert steps[0] == steps[1] == list(range(24))
    # the consolidated fp32 weights (ZeRO master partitions) are exactly what the ranks hold
    ckpt_dir = root / "runs" / "z2" / "checkpoints"
    consolidated = consolidated_state_dict(ckpt_dir, complete_tags(ckpt_dir)[-1])
    assert _weights_sha(consolidated) == finals[0]["weights_sha256"]
    assert float(consolidated["logit_scale"]) <= math.log(10.0) + 1e-6


def _reference_keys(root: Path, world_size: int, epochs: int) -> dict[int, list[list[str]]]:
    """Per rank, the keys of every step of an uninterrupted run (the loader alone, in this process)."""
    out = {}
    for rank in range(world_size):
        loader = TrainLoader(root / "data" / "tiny" / "shards", None, local_batch_size=16 // world_size, rank=rank,
                             world_size=world_size, workers=0, seed=0,
                             preprocess=lambda im: torch.zeros(3, 1, 1),
                             tokenizer=lambda texts: torch.zeros(len(texts), 1, dtype=torch.long))
        out[rank] = [b["keys"] for e in range(epochs) for b in loader.epoch(e)]
    return out


def test_kill9_mid_epoch_resumes_without_gap_or_repeat(fresh, tmp_path):
    root = fresh
    run_dir = root / "runs" / "kill"
    assert not (run_dir / "train.json").exists()
    keys = tmp_path / "keys"
    env = child_env(AMORLIP_DEBUG_KEYS=str(keys))
    slow = dict(env, AMORLIP_DEBUG_STEP_SLEEP="0.3")  # a window to kill in, even on a loaded machine
    proc = subprocess.Popen(train_cmd(root / "config.yaml", "kill", nproc=2), env=slow, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = run_dir / "checkpoints"
    _wait_for(lambda: complete_tags(ckpt_dir) and _last_logged_step(run_dir / "metrics.jsonl") >= 7, proc,
              what="a checkpoint and step 7")
    # torchrun and both ranks, mid-epoch, no chance to clean up (torchrun starts each rank in a session
    # of its own, so killing torchrun's process group would leave the ranks running)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _last_logged_step(run_dir / "metrics.jsonl")
    assert killed_at < 24, "the run finished before it could be killed"
    resume_tag = complete_tags(ckpt_dir)[-1]
    # a torn save newer than every complete one (files but no marker) must be ignored
    torn = ckpt_dir / "step-0000023"  # (not a step this run saves at)
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"torn")

    res = run_cli(root / "config.yaml", "kill", nproc=2, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ignoring incomplete checkpoint(s) step-0000023" in res.stderr
    summary = _summary(root, "kill")
    assert summary["resumed_from"] == resume_tag and summary["steps"] == summary["total_steps"] == 24
    assert not torn.exists()  # pruned once a newer complete checkpoint existed
    assert len(complete_tags(ckpt_dir)) <= 3
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines if "kind" not in r] == list(range(1, 25))
    # per-epoch diagnostics: once per epoch end, none repeated by the resume
    assert [r["step"] for r in lines if r.get("kind") == "amortization"] == [12, 24]

    resumed = step_of(resume_tag)
    reference = _reference_keys(root, world_size=2, epochs=2)
    for rank in (0, 1):
        records = [r for r in _debug_records(keys, rank) if "keys" in r]
        first_pid = records[0]["pid"]
        first = [r for r in records if r["pid"] == first_pid]
        second = [r for r in records if r["pid"] != first_pid]
        # the second attempt starts exactly at the checkpoint and runs every later step once
        assert [r["step"] for r in second] == list(range(resumed, 24))
        assert [r["step"] for r in first] == list(range(len(first)))  # no repeat before the kill
        assert len(first) >= resumed
        effective = [r for r in first if r["step"] < resumed] + second
        assert [r["keys"] for r in effective] == reference[rank]  # = an uninterrupted run's data
        redone = {r["step"]: r["keys"] for r in first if r["step"] >= resumed}
        assert all(reference[rank][s] == k for s, k in redone.items())
    finals = [[r for r in _debug_records(keys, rank) if "weights_sha256" in r][-1] for rank in (0, 1)]
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]
    losses = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["epoch"] == 0 and "kind" not in r]
    assert losses[-1]["loss"] < losses[0]["loss"]

    # train.json lost after the end: the rerun resumes at the last step, trains nothing and still
    # reports the last validation and amortization records (they travel in the checkpoint)
    before = _summary(root, "kill")
    (run_dir / "train.json").unlink()
    res = run_cli(root / "config.yaml", "kill", nproc=2)
    assert res.returncode == 0, res.stderr[-4000:]
    after = _summary(root, "kill")
    assert after["resumed_from"] == "step-0000024" and after["steps"] == 24
    for key in ("validation", "amortization"):
        assert before[key] is not None and after[key] == before[key], key
