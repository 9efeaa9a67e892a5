"""``amorlip train --config C --run NAME``: one training job, start to ``runs/{run}/train.json``.

Launch one process per rank (``torchrun --nproc_per_node N``, or ``srun`` with one task per GPU);
every rank runs :func:`train`. Exit codes, as Snakemake and SLURM see them:

- ``0``: finished; ``train.json`` (the rule's output) is written last, atomically.
- ``75`` (EX_TEMPFAIL): stopped by SIGTERM/SIGUSR1 after saving a checkpoint; the job should be
  requeued (``sbatch --requeue``, or Snakemake's ``--retries``) and resumes where it stopped.
- ``1``: the run diverged (non-finite loss, lambda divergence, lambda nets that differ across
  ranks) or a checkpoint could not be written (disk full); the message names the step (and the loss
  terms, or the cause), and the last good checkpoint is kept.
- ``2``: launched with another rank count than the run's ``nproc x nodes``; the message names both.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from amorlip import distributed as dist_utils
from amorlip.config import RunConfig, get_run
from amorlip.determinism import apply_determinism
from amorlip.fileio import atomic_write_json
from amorlip.provenance import flat_provenance, run_provenance
from amorlip.train.checkpoint import tag_for

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_CONFIG = 2  # the launch does not match the run's configuration (as a config error)


def run_dir(config: dict, run_name: str) -> Path:
    return Path(config["paths"]["runs"]) / run_name


def is_finished(path: Path) -> bool:
    """A train.json from a completed run (written last, so its existence means the run is done)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(summary.get("complete")) and summary.get("steps") == summary.get("total_steps")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model_engine_task(run: RunConfig, world):
    """Model, DeepSpeed engine and task for this rank, all shaped by ``world`` (WorldInfo).

    Returns ``(engine, task, preprocess_train, tokenizer)``. The task gets ``world.group``: with W > 1
    ranks every objective scores its local rows against the global batch.
    """
    from amorlip.models import create_model, get_tokenizer, model_config
    from amorlip.tasks import build_task
    from amorlip.train.engine import build_engine

    # the same seed on every rank: identical initial weights (DeepSpeed also broadcasts rank 0's)
    # and identical lambda nets (seeded from run.seed alone)
    seed_everything(run.seed)
    model, preprocess_train, _ = create_model(
        run.model, init_logit_scale=run.init_logit_scale,
        siglip_init_bias=run.siglip_init_bias if run.method == "siglip" else None)
    if hasattr(model, "text_projection"):
        embed_dim = model.text_projection.shape[1]
    else:
        embed_dim = model_config(run.model)["embed_dim"]
    engine, _ = build_engine(model, run, world)
    task = build_task(run, engine.module, embed_dim, world.device, group=world.group)
    task.model = engine
    return engine, task, preprocess_train, get_tokenizer(run.model)


def build_loader(config: dict, run: RunConfig, world, preprocess, tokenizer):
    """This rank's share of every global batch: ``world.local_batch`` samples, slot ``world.rank``."""
    from amorlip.data.loader import TrainLoader
    from amorlip.data.pixels import split_for_device

    # workers ship uint8 pixels; the trainer normalises on the device (a quarter of the bytes)
    to_uint8, normalize = split_for_device(preprocess)
    shard_dir = Path(config["paths"]["data"]) / run.dataset / "shards"
    return TrainLoader(shard_dir, None, local_batch_size=world.local_batch, rank=world.rank,
                       world_size=world.world_size, workers=run.workers, seed=run.seed,
                       preprocess=to_uint8, tokenizer=tokenizer, device_transform=normalize,
                       samples_per_epoch=run.samples_per_epoch, pin_memory=world.device.type == "cuda")


def _build(config: dict, run: RunConfig, world):
    """Model, loader, engine and task for this rank."""
    engine, task, preprocess, tokenizer = build_model_engine_task(run, world)
    loader = build_loader(config, run, world, preprocess, tokenizer)
    # anything random after this point may differ per rank (augmentations are seeded by the loader)
    seed_everything(run.seed + world.rank)
    return engine, task, loader


def _write_outputs(config: dict, run: RunConfig, trainer, tracker, out_dir: Path,
                   determinism: dict | None = None) -> dict:
    from amorlip.loss_curves import plot_run_curves

    pos = trainer.pos
    wall, train_time = trainer.attempt_times()
    summary = {
        "run": run.name, "method": run.method, "variant": run.variant, "dataset": run.dataset,
        "model": run.model, "steps": pos.steps_done, "total_steps": trainer.total_steps,
        "steps_per_epoch": trainer.steps_per_epoch,
        "epochs": round(pos.steps_done / trainer.steps_per_epoch, 4),
        "samples_seen": pos.samples_seen, "wall_time_s": round(wall, 3),
        "train_time_s": round(train_time, 3),
        "images_per_s": round(pos.samples_seen / train_time, 3) if train_time > 0 else 0.0,
        "final_losses": trainer.final_losses, "skipped_samples": pos.skipped_samples,
        "mlflow_run_id": tracker.run_id, "world_size": trainer.world_size,
        "batch_size": run.batch_size, "local_batch_size": trainer.world.local_batch,
        "lambda_replica_checksum": trainer.task.replica_checksum(), "resumed_from": trainer.resumed_from,
        "checkpoint": str(trainer.ckpt_dir / tag_for(pos.steps_done)),
        # what the result depends on: url list, downloaded sample set, settings, code, packages
        "provenance": run_provenance(config, run),
        "determinism": determinism or {"deterministic": False},
        # the last epoch's amortization diagnostics (AmorLIP, diagnostics_every_epochs > 0), else None
        "amortization": trainer.amortization,
        # collectives per step by kind with payload bytes (counted) plus DeepSpeed's (computed); this attempt
        "collectives": trainer.comm.summary(),
        # the last fixed-batch validation ({"step", "epoch", "val_infonce", "val_batch", "temperature"}), else None
        "validation": trainer.last_validation,
        # the last zero-shot evaluation during training ({"step", "epoch", "suite", "mean", "tasks", ...}; percent)
        "zeroshot_during_training": trainer.last_zeroshot,
        "complete": True,
    }
    curve = plot_run_curves(trainer.metrics.read(), out_dir / "loss_curves.png",
                             title=_curve_title(run))
    tracker.log_dict(json.loads(json.dumps(run.to_dict())), "run_config.yaml")
    tracker.log_dict(json.loads(json.dumps(config, default=str)), "pipeline_config.yaml")
    tracker.log_dict(summary, "train.json")
    if curve:
        tracker.log_artifact(curve)
    tracker.log_artifact(trainer.metrics.path)
    tracker.log_metrics({"final_" + k: v for k, v in trainer.final_losses.items()} |
                        {"images_per_s_overall": summary["images_per_s"]}, step=pos.steps_done)
    atomic_write_json(out_dir / "train.json", summary)  # the Snakemake output: last
    return summary


def train(config: dict, run_name: str) -> int:
    """Train ``run_name`` of ``config`` on this rank; returns the process exit code."""
    from amorlip.tracking import child_run, manifest_dataset, training_run_name
    from amorlip.train.loop import CheckpointWriteFailed, Preempted, StopSignal, Trainer, TrainingDiverged

    run = get_run(config, run_name)
    out_dir = run_dir(config, run_name)
    if is_finished(out_dir / "train.json"):
        log.info("run %s already finished (%s); nothing to do", run_name, out_dir / "train.json")
        _replot_if_missing(run, out_dir)
        return EXIT_OK
    try:
        world = dist_utils.make_world(run.batch_size, run.world_size, what=f"run {run_name!r}")
    except dist_utils.WorldSizeMismatch as exc:
        log.error("%s", exc)
        dist_utils.shutdown()
        return EXIT_CONFIG
    master = world.is_master
    determinism = apply_determinism(run)  # before any model or kernel is created
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())))

    started = time.monotonic()
    stop = StopSignal()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        engine, task, loader = _build(config, run, world)
        trainer = Trainer(run=run, engine=engine, task=task, loader=loader, run_dir=out_dir, world=world,
                          tracker=None, stop=stop, started_at=started)
        if run.method == "amorlip" and run.diagnostics_every_epochs > 0:  # every rank (the barrier)
            from amorlip.diagnostics import EpochDiagnostics

            trainer.epoch_diagnostics = EpochDiagnostics(
                Path(config["paths"]["data"]) / run.dataset / "shards", run, world.device)
        if run.validation.enabled:  # every rank: each embeds its slice of the fixed batch
            from amorlip.train.validation import FixedBatchValidation

            trainer.validation = FixedBatchValidation(
                Path(config["paths"]["data"]) / run.dataset / "shards", run.model, run.validation, world.device,
                rank=world.rank, world_size=world.world_size, group=world.group).prepare()
        if run.zeroshot_during_training.enabled:  # every rank (the due check); rank 0 evaluates
            from amorlip.train.zeroshot_hook import ZeroShotDuringTraining

            trainer.zeroshot = ZeroShotDuringTraining(config, run, world.device)
        state = trainer.resume()
        tags = {"run": run.name, "method": run.method, "variant": run.variant, "dataset": run.dataset,
                "model": run.model}
        with child_run(config, run.name, "train", tags=tags, offline_path=out_dir / "mlflow-offline.jsonl",
                       enabled=master, resume_run_id=(state or {}).get("mlflow_run_id"),
                       display_name=training_run_name(run), system_metrics=True) as tracker:
            trainer.tracker = tracker
            if not state:
                tracker.set_tags(flat_provenance(run_provenance(config, run)))
                dataset = manifest_dataset(config, run.dataset)
                if dataset:
                    tracker.log_dataset(**dataset, context="train")
                tracker.log_params(run.to_dict() | {"world_size": world.world_size,
                                                    "local_batch_size": world.local_batch,
                                                    "global_batch_size": world.global_batch,
                                                    "lambda_adam_lr": _lambda_adam_lr(task),
                                                    "steps_per_epoch": len(loader)})
            try:
                trainer.fit()
            except Preempted as exc:
                tracker.final_status = "KILLED"
                log.warning("%s; exiting with %d so the job is requeued", exc, EXIT_REQUEUE)
                # the checkpoint is complete on every rank: wait for all before exiting, so that under
                # `srun --kill-on-bad-exit` no rank's exit kills a peer still closing its MLflow run
                dist_utils.barrier()
                return EXIT_REQUEUE
            except (TrainingDiverged, CheckpointWriteFailed) as exc:
                if master:
                    log.error("run %s stopped: %s", run.name, exc)
                tracker.final_status = "FAILED"
                return EXIT_DIVERGED
            trainer.debug_final()
            summary = _write_outputs(config, run, trainer, tracker, out_dir, determinism) if master else None
        dist_utils.barrier()
        if master:
            losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["final_losses"].items())
            log.info("run %s done: %d steps, %d samples in %.1f s (%.1f img/s); %s; %d skipped", run.name,
                     summary["steps"], summary["samples_seen"], summary["wall_time_s"], summary["images_per_s"],
                     losses, summary["skipped_samples"])
        return EXIT_OK
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dist_utils.shutdown()


def _curve_title(run: RunConfig) -> str:
    return f"{run.name} ({run.method}{'' if run.variant == 'none' else ', ' + run.variant})"


def _replot_if_missing(run: RunConfig, out_dir: Path) -> None:
    """A finished run whose loss_curves.png is gone (a rule output: Snakemake reruns the job for it)
    gets it drawn again from metrics.jsonl, rather than a retraining."""
    from amorlip.loss_curves import plot_run_curves
    from amorlip.train.progress import MetricsFile

    if not (out_dir / "loss_curves.png").exists():
        plot_run_curves(MetricsFile(out_dir / "metrics.jsonl").read(), out_dir / "loss_curves.png",
                        title=_curve_title(run))


def _lambda_adam_lr(task) -> float | None:
    lambdas = getattr(task, "lambdas", None)
    return float(lambdas.lr) if lambdas is not None else None
