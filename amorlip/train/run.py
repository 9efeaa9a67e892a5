"""``amorlip train --config C --run NAME``: one training job, start to ``runs/{run}/train.json``.

Launch one process per rank (``torchrun --nproc_per_node N``, or ``srun`` with one task per GPU);
every rank runs :func:`train`. Exit codes, as Snakemake and SLURM see them:

- ``0``: finished; ``train.json`` (the rule's output) is written last, atomically.
- ``75`` (EX_TEMPFAIL): stopped by SIGTERM/SIGUSR1 after saving a checkpoint; the job should be
  requeued (``sbatch --requeue``, or Snakemake's ``--retries``) and resumes where it stopped.
- ``1``: the run diverged (non-finite loss, lambda divergence) or a checkpoint could not be written
  (disk full); the message names the step (and the loss terms, or the cause), and the last good
  checkpoint is kept.
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
from amorlip.fileio import atomic_write_json
from amorlip.train.checkpoint import tag_for

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


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


def _build(config: dict, run: RunConfig, info, device: torch.device, local_batch: int):
    """Model, loader, engine and task for this rank."""
    from amorlip.data.loader import TrainLoader
    from amorlip.models import create_model, get_tokenizer
    from amorlip.tasks import build_task
    from amorlip.train.engine import build_engine

    # the same seed on every rank: identical initial weights (DeepSpeed also broadcasts rank 0's)
    seed_everything(run.seed)
    model, preprocess_train, _ = create_model(
        run.model, init_logit_scale=run.init_logit_scale,
        siglip_init_bias=run.siglip_init_bias if run.method == "siglip" else None)
    embed_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else None
    if embed_dim is None:
        from amorlip.models import model_config

        embed_dim = model_config(run.model)["embed_dim"]
    shard_dir = Path(config["paths"]["data"]) / run.dataset / "shards"
    loader = TrainLoader(shard_dir, None, local_batch_size=local_batch, rank=info.rank,
                         world_size=info.world_size, workers=run.workers, seed=run.seed,
                         preprocess=preprocess_train, tokenizer=get_tokenizer(run.model),
                         samples_per_epoch=run.samples_per_epoch, pin_memory=device.type == "cuda")
    engine, _ = build_engine(model, run, info.world_size, device)
    task = build_task(run, engine.module, embed_dim, device, group=None)
    task.model = engine
    # anything random after this point may differ per rank (augmentations are seeded by the loader)
    seed_everything(run.seed + info.rank)
    return engine, task, loader


def _write_outputs(config: dict, run: RunConfig, trainer, tracker, out_dir: Path) -> dict:
    from amorlip.train.progress import plot_loss_curves

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
        "batch_size": run.batch_size, "resumed_from": trainer.resumed_from,
        "checkpoint": str(trainer.ckpt_dir / tag_for(pos.steps_done)),
        "complete": True,
    }
    curve = plot_loss_curves(trainer.metrics.read(), out_dir / "loss_curves.png",
                             title=f"{run.name} ({run.method}{'' if run.variant == 'none' else ', ' + run.variant})")
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
    from amorlip.tracking import child_run
    from amorlip.train.loop import CheckpointWriteFailed, Preempted, StopSignal, Trainer, TrainingDiverged

    run = get_run(config, run_name)
    out_dir = run_dir(config, run_name)
    if is_finished(out_dir / "train.json"):
        log.info("run %s already finished (%s); nothing to do", run_name, out_dir / "train.json")
        return EXIT_OK
    info = dist_utils.init_distributed()
    master = info.rank == 0
    if info.world_size != run.world_size and master:
        log.warning("run %s is configured for %d rank(s) (nproc x nodes) but runs on %d; the global "
                    "batch stays %d", run_name, run.world_size, info.world_size, run.batch_size)
    if run.batch_size % info.world_size:
        raise SystemExit(f"batch_size {run.batch_size} is not divisible by the {info.world_size} ranks")
    local_batch = run.batch_size // info.world_size
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = dist_utils.device_for(info)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())))

    started = time.monotonic()
    stop = StopSignal()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        engine, task, loader = _build(config, run, info, device, local_batch)
        trainer = Trainer(run=run, engine=engine, task=task, loader=loader, run_dir=out_dir,
                          world_size=info.world_size, global_batch=local_batch * info.world_size,
                          tracker=None, stop=stop, master=master, started_at=started)
        state = trainer.resume()
        tags = {"run": run.name, "method": run.method, "variant": run.variant, "dataset": run.dataset,
                "model": run.model}
        with child_run(config, run.name, "train", tags=tags, offline_path=out_dir / "mlflow-offline.jsonl",
                       enabled=master, resume_run_id=(state or {}).get("mlflow_run_id")) as tracker:
            trainer.tracker = tracker
            if not state:
                tracker.log_params(run.to_dict() | {"world_size": info.world_size, "local_batch_size": local_batch,
                                                    "steps_per_epoch": len(loader)})
            try:
                trainer.fit()
            except Preempted as exc:
                tracker.final_status = "KILLED"
                log.warning("%s; exiting with %d so the job is requeued", exc, EXIT_REQUEUE)
                return EXIT_REQUEUE
            except (TrainingDiverged, CheckpointWriteFailed) as exc:
                if master:
                    log.error("run %s stopped: %s", run.name, exc)
                tracker.final_status = "FAILED"
                return EXIT_DIVERGED
            trainer.debug_final()
            summary = _write_outputs(config, run, trainer, tracker, out_dir) if master else None
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
