"""The training loop: one DeepSpeed step per batch, checkpoints, resume, stop conditions.

Per step (docs/architecture.md, "The training step"): set the lr of every group for the global
step; the task's forward (targets, lambda updates, EMA, encoder loss); one device vector of flags
(stop signal, non-finite loss, lambda divergence, the logit scale) all-reduced once and read once,
so every rank takes the same decision; ``engine.backward``; ``engine.step``; the logit-scale clamp.
That read is the step's only host-device synchronisation: metrics stay detached device tensors and
are summed on the device, then averaged over ranks and read on logging steps only, so the logged
numbers describe the global batch, not rank 0's share. Positions are counted as *steps done*: a
checkpoint taken after ``n`` steps stores the data position of step ``n`` (epoch, step in epoch),
and a resume asks the loader for exactly that position, so no step is repeated or skipped.

Stops:
- a non-finite loss (or a previous-epoch lambda gap beyond ``amorlip.divergence_bound`` after epoch 0) raises
  :class:`TrainingDiverged` *before* the bad step touches the weights; the last checkpoint stays;
- SIGTERM / SIGUSR1 (SLURM preemption, ``scancel --signal``) finish the current step, save a
  checkpoint and raise :class:`Preempted`; the job should be requeued and will resume;
- a checkpoint that cannot be written (disk full) raises :class:`CheckpointWriteFailed`, which names
  the previous complete checkpoint: the torn tag has no marker, so a rerun resumes from that one;
- lambda nets that differ across ranks at a checkpoint raise :class:`ReplicaMismatch` (they must be
  one model: same initial weights, all-reduced gradients).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from amorlip import collectives
from amorlip import distributed as dist_utils
from amorlip.train import checkpoint as ckpt
from amorlip.train.engine import set_logit_scale_lr_by_threshold, set_lr
from amorlip.train.progress import MetricsFile, Progress, Throughput, loss_terms, nonfinite_terms
from amorlip.train.step import encoder_step

log = logging.getLogger(__name__)

DEBUG_KEYS_ENV = "AMORLIP_DEBUG_KEYS"
# Seconds to sleep after each step: makes kill/preemption timing reproducible on a fast tiny run
# (tests, and trying out a requeue setup by hand). Never set in real runs.
DEBUG_STEP_SLEEP_ENV = "AMORLIP_DEBUG_STEP_SLEEP"


class TrainingDiverged(RuntimeError):
    """Non-finite loss or lambda divergence: stopping is the only honest outcome."""


class ReplicaMismatch(TrainingDiverged):
    """State that must be identical on every rank (the lambda nets) differs between ranks."""


# A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact.
CheckpointWriteFailed = ckpt.CheckpointWriteError


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and the job should be requeued."""


@dataclass
class Position:
    """Where the run is: the next batch to train is (epoch, step_in_epoch)."""

    steps_done: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0
    wall_time_s: float = 0.0  # job time (setup included), summed over attempts
    train_time_s: float = 0.0  # time inside the step loop, summed over attempts


class StopSignal:
    """Set by the SIGTERM/SIGUSR1 handlers; read at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:  # a signal handler: set a flag, nothing else
        self.signum = signum


class Trainer:
    """Owns the engine, the task and the loader for one run; :meth:`fit` trains to ``total_steps``.

    ``world`` (:class:`amorlip.distributed.WorldInfo`) is the only source of the rank, the world
    size, the global batch and the process group of the per-step collectives.
    """

    def __init__(self, *, run, engine, task, loader, run_dir: Path, world, tracker, stop: StopSignal,
                 started_at: float | None = None):
        self.run = run
        self.engine = engine
        self.task = task
        self.loader = loader
        self.world = world
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.world_size = world.world_size
        self.global_batch = world.global_batch
        self.master = world.is_master
        self.tracker = tracker
        self.stop = stop
        self.steps_per_epoch = len(loader)
        if getattr(task, "needs_indices", False):
            task.set_dataset_size(loader.total_samples)  # per-sample state (FastCLIP's u), by dense index
        self.total_steps = min(run.epochs * self.steps_per_epoch, run.max_steps or math.inf)
        self.pos = Position()
        self.last_saved = -1
        self.resumed_from: str | None = None
        self.final_losses: dict[str, float] = {}
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self._window = MetricWindow()
        # collectives per step by kind and bytes (docs/architecture.md, "Collective accounting")
        self.comm = collectives.StepAccounting(world.world_size, self._deepspeed_traffic(engine, run))
        self._device_transform = getattr(loader, "device_transform", None)
        self._skipped_local = 0
        self._debug_keys = os.environ.get(DEBUG_KEYS_ENV)
        self._debug_sleep = float(os.environ.get(DEBUG_STEP_SLEEP_ENV) or 0.0)
        self._attempt_t0 = started_at if started_at is not None else time.monotonic()
        self._stop_now = False
        self._loop_t0: float | None = None
        self._speed: Throughput | None = None  # the images/s window of the running fit()
        self.last_logged: dict[str, float] = {}
        # end-of-epoch amortization diagnostics (amorlip.diagnostics.EpochDiagnostics), set by the caller
        # for AmorLIP runs; amortization: the last measurement, for train.json
        self.epoch_diagnostics = None
        self.amortization: dict[str, Any] | None = None
        # the fixed-batch validation metric (amorlip.train.validation.FixedBatchValidation), set by the caller
        # on every rank when run.validation is on; validation: its last record, for train.json
        self.validation = None
        self.last_validation: dict[str, Any] | None = None
        self.last_validation_step = -1
        # zero-shot evaluation during training (amorlip.train.zeroshot_hook.ZeroShotDuringTraining), set by the
        # caller on every rank when run.zeroshot_during_training is on; last_zeroshot: its last record, for train.json
        self.zeroshot = None
        self.last_zeroshot: dict[str, Any] | None = None
        self.last_zeroshot_step = -1

    # ------------------------------------------------------------------ state

    def client_state(self) -> dict[str, Any]:
        """Everything besides DeepSpeed's own state; plain types only (see checkpoint.py)."""
        pos = asdict(self.pos)
        pos["wall_time_s"] = self.pos.wall_time_s + (time.monotonic() - self._attempt_t0)
        pos["train_time_s"] = self.pos.train_time_s + self._loop_time()
        return {
            "amorlip_format": 1,
            "position": pos,
            "task": self.task.state_dict(),
            "run": json.loads(json.dumps(self.run.to_dict())),
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "replica_checksum": self.task.replica_checksum(),
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "final_losses": dict(self.final_losses),
            # the last measurement of each between-steps kind, so that a resumed run's train.json still
            # reports them (a resume after the last epoch end measures nothing again)
            "last_records": json.loads(json.dumps({"amortization": self.amortization,
                                                   "validation": self.last_validation,
                                                   "zeroshot": self.last_zeroshot})),
        }

    def resume(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint, if any (every rank loads the same tag)."""
        tag = dist_utils.broadcast_object(ckpt.latest_complete_tag(self.ckpt_dir) if self.master else None)
        if tag is None:
            torn = ckpt.torn_tags(self.ckpt_dir)
            if torn and self.master:
                log.warning("ignoring incomplete checkpoint(s) %s (interrupted saves)", ", ".join(torn))
            return None
        torn = [t for t in ckpt.torn_tags(self.ckpt_dir) if ckpt.step_of(t) > ckpt.step_of(tag)]
        if torn and self.master:
            log.warning("ignoring incomplete checkpoint(s) %s; resuming from %s", ", ".join(torn), tag)
        self._check_world_of(tag, ckpt.marker_world_size(self.ckpt_dir, tag))  # before DeepSpeed reads it
        state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        self._check_world_of(tag, state.get("world_size"))
        changed = sorted(k for k, v in state["run"].items()
                         if json.loads(json.dumps(self.run.to_dict())).get(k) != v)
        if changed and self.master:
            log.warning("run config changed since checkpoint %s (%s); continuing with the new values",
                        tag, ", ".join(changed))
        self.pos = Position(**state["position"])
        self.task.load_state_dict(state["task"])
        self.final_losses = dict(state.get("final_losses") or {})
        records = state.get("last_records") or {}
        self.amortization = records.get("amortization")
        self.last_validation = records.get("validation")
        self.last_zeroshot = records.get("zeroshot")
        # a measurement taken at the resumed step is not taken again (the end-of-training zero-shot of a
        # run resumed at its last step, whose record metrics.jsonl keeps)
        self.last_validation_step = (self.last_validation or {}).get("step", -1)
        self.last_zeroshot_step = (self.last_zeroshot or {}).get("step", -1)
        self.last_saved = self.pos.steps_done
        self.resumed_from = tag
        if self.master:
            kept = self.metrics.truncate_after(self.pos.steps_done)
            log.info("resumed from %s: step %d (epoch %d, step %d in epoch), %d metric lines kept", tag,
                     self.pos.steps_done, self.pos.epoch, self.pos.step_in_epoch, kept)
        return state

    def _check_world_of(self, tag: str, saved_world_size: int | None) -> None:
        """Refuse a checkpoint of another world size before any step (docs/failure-modes.md).

        The data position (each rank's slots and streams), ZeRO's optimizer partitions and the RNG
        files are all per rank: carrying them to another rank count would silently change the data
        order or fail inside DeepSpeed. The lambda nets would carry over (they are replicated), the
        rest would not, so the run stops and says how to go on.
        """
        if saved_world_size is None or int(saved_world_size) == self.world_size:
            return
        raise RuntimeError(
            f"checkpoint {tag} in {self.ckpt_dir} was written by {saved_world_size} ranks but this job has "
            f"{self.world_size}: the data position and ZeRO's optimizer partitions are per rank. Relaunch "
            f"with {saved_world_size} ranks (nproc x nodes = {saved_world_size}), or move {self.ckpt_dir} "
            f"away to start this run over on {self.world_size}")

    def _check_replicas(self) -> str | None:
        """Compare the task's replicated state (the lambda nets) across ranks; raise if it differs."""
        checksum = self.task.replica_checksum()
        if checksum is None or self.world_size == 1:
            return checksum
        every = [None] * self.world_size
        torch.distributed.all_gather_object(every, checksum)
        if len(set(every)) > 1:
            listing = ", ".join(f"rank {r}: {c[:12]}" for r, c in enumerate(every))
            raise ReplicaMismatch(
                f"the lambda nets differ across ranks at step {self.pos.steps_done} ({listing}); they must be one "
                f"model (same seed, all-reduced gradients). The last good checkpoint "
                f"({ckpt.latest_complete_tag(self.ckpt_dir) or 'none'}) is kept; this is a bug, please report it")
        return checksum

    def save(self) -> None:
        if self.last_saved == self.pos.steps_done:
            return
        self._check_replicas()
        self._sync_skipped()
        # raises CheckpointWriteFailed (disk full, ...) naming the free space and the intact previous tag
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.pos.steps_done, self.client_state(),
                             self.run.keep_checkpoints)
        self.last_saved = self.pos.steps_done

    def _loop_time(self) -> float:
        return time.monotonic() - self._loop_t0 if self._loop_t0 is not None else 0.0

    def attempt_times(self) -> tuple[float, float]:
        """(wall, train-loop) seconds summed over every attempt, this one included."""
        return (self.pos.wall_time_s + time.monotonic() - self._attempt_t0,
                self.pos.train_time_s + self._loop_time())

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Position:
        spe = self.steps_per_epoch
        progress = Progress(self.total_steps, self.pos.steps_done, self.master, desc=self.run.name)
        speed = self._speed = Throughput(self.global_batch)
        self._loop_t0 = time.monotonic()
        try:
            while self.pos.steps_done < self.total_steps:
                epoch, start = self.pos.epoch, self.pos.step_in_epoch
                self.task.start_epoch(epoch, spe)
                for batch in self.loader.epoch(epoch, start_step=start):
                    if self.pos.steps_done >= self.total_steps:
                        break
                    out = self._step(batch)
                    speed.step()
                    logged = self._after_step(out, speed)
                    progress.update(speed.peek(), epoch, logged.get("loss") if logged else None)
                    if self._stop_now and self.pos.steps_done < self.total_steps:
                        self.save()
                        raise Preempted(f"stop signal ({self.stop.signum or 'on another rank'}) at step {self.pos.steps_done}: "
                                        f"checkpoint {ckpt.tag_for(self.pos.steps_done)} saved")
                if self.pos.step_in_epoch >= spe:  # the epoch is done: measure, move on, checkpoint
                    self._validate(epoch, epoch_end=True)
                    with self._between_steps():
                        self._epoch_diagnostics(epoch)
                        self._zeroshot_eval(epoch)
                    self.pos.epoch, self.pos.step_in_epoch = epoch + 1, 0
                    self.save()
            with self._between_steps():
                self._zeroshot_eval(self.pos.epoch)  # the end of training (max_steps may end mid-epoch)
            self.save()
        finally:
            progress.close()
        self._sync_skipped()
        return self.pos

    @contextlib.contextmanager
    def _between_steps(self):
        """Time spent measuring between steps (validation, amortization diagnostics, zero-shot) is no
        step's: it is taken out of the images/s window and of the train-loop time (train_time_s), so
        that turning a measurement on does not read as a slower trainer. Checkpoint saves stay in."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - t0
            if self._speed is not None:
                self._speed.t0 += spent
            if self._loop_t0 is not None:
                self._loop_t0 += spent

    def _validate(self, epoch: int, epoch_end: bool) -> None:
        """The fixed-batch validation metric (amorlip/train/validation.py) when it is due: every
        ``validation.every_steps`` steps, at the end of every ``validation.every_epochs``-th epoch, and at
        the last step. Every rank calls this at the same steps (the metric gathers features over the
        ranks); rank 0 records it in metrics.jsonl (``kind: validation``) and as ``val/infonce``."""
        cfg, steps = self.run.validation, self.pos.steps_done
        if self.validation is None or not cfg.enabled or self.last_validation_step == steps:
            return
        due = (steps >= self.total_steps or (cfg.every_steps and steps % cfg.every_steps == 0)
               or (epoch_end and cfg.every_epochs and (epoch + 1) % cfg.every_epochs == 0))
        if not due:
            return
        self.last_validation_step = steps
        t0 = time.monotonic()
        with self._between_steps():
            figures = self.validation(self.engine.module)
        if self.master:
            self.last_validation = {"step": steps, "epoch": epoch, **figures, "temperature": cfg.temperature}
            self.metrics.append({"step": steps, "epoch": epoch, "kind": "validation", **figures, "time": time.time()})
            self.tracker.log_metrics({"val/infonce": figures["val_infonce"]}, step=steps)
            log.debug("validation at step %d: val_infonce %.4f (batch %d, %.2f s)", steps, figures["val_infonce"],
                      figures["val_batch"], time.monotonic() - t0)

    def _epoch_diagnostics(self, epoch: int) -> None:
        """At the end of every ``diagnostics_every_epochs``-th epoch (and the last), rank 0 measures the
        lambda nets' amortization and the gradient fidelity on its probe; the other ranks wait at a
        barrier. Rank 0 alone suffices: the encoders and lambda nets are replicas on every rank. Under
        ZeRO-3 the encoders are partitioned: skipped with a note (gathering them on one rank would
        deadlock the others)."""
        every = int(getattr(self.run, "diagnostics_every_epochs", 0) or 0)
        final = self.pos.steps_done >= self.total_steps
        if self.epoch_diagnostics is None or every <= 0 or ((epoch + 1) % every and not final):
            return
        if self.run.zero_stage == 3:
            if self.master and epoch == 0:
                log.info("amortization diagnostics skipped: ZeRO-3 partitions the encoders")
            return
        report = None
        if self.master:
            from amorlip.diagnostics import flat_figures

            t0 = time.monotonic()
            try:
                report = self.epoch_diagnostics(self.engine.module, self.task.lambdas)
            except Exception as exc:  # a measurement never stops training (nor leaves peers at the barrier)
                log.warning("epoch %d amortization diagnostics failed: %s: %s", epoch, type(exc).__name__, exc)
                report = None
        if self.master and report is not None:
            figures = flat_figures(report)
            self.amortization = {"epoch": epoch, "step": self.pos.steps_done, **report}
            self.metrics.append({"step": self.pos.steps_done, "epoch": epoch, "kind": "amortization", **figures,
                                 "time": time.time()})
            self.tracker.log_metrics(figures, step=self.pos.steps_done)
            img, txt = report["modalities"]["image"]["predictors"], report["modalities"]["text"]["predictors"]
            log.info("epoch %d amortization (probe %d, %.1f s): rmse image ema %.4f / in-batch %.4f, text ema %.4f / "
                     "in-batch %.4f; gradient cosine %s", epoch, report["probe"], time.monotonic() - t0,
                     img["ema"]["rmse"], img["in_batch"]["rmse"], txt["ema"]["rmse"], txt["in_batch"]["rmse"],
                     report["gradient_fidelity"]["cosine"])
        if self.world_size > 1:
            dist_utils.barrier()

    def _zeroshot_eval(self, epoch: int) -> None:
        """Zero-shot evaluation of the current weights (amorlip/train/zeroshot_hook.py) at the end of every
        ``zeroshot_during_training.every_epochs``-th epoch and at the end of training: rank 0 evaluates
        ``engine.module`` (replicated: ZeRO-3 is refused at config load) and records ``kind: zeroshot`` in
        metrics.jsonl and ``zeroshot/<suite>/...`` (percent) in MLflow; the other ranks wait at a barrier.
        Called inside :meth:`_between_steps` (its time is no step's)."""
        steps, final = self.pos.steps_done, self.pos.steps_done >= self.total_steps
        if self.zeroshot is None or self.last_zeroshot_step == steps or not self.zeroshot.due(epoch, final):
            return
        self.last_zeroshot_step = steps
        t0 = time.monotonic()
        if self.master:
            from amorlip.train.zeroshot_hook import mlflow_figures, percent_figures

            try:
                results = self.zeroshot(self.engine.module)
            except Exception as exc:  # an evaluation never stops training (nor leaves peers at the barrier)
                log.warning("zero-shot evaluation at step %d failed: %s: %s", steps, type(exc).__name__, exc)
                results = None
            if results is not None:
                suite = results["suite"]
                mean, tasks = percent_figures(results)
                agg = results["aggregates"]
                self.last_zeroshot = {"step": steps, "epoch": epoch, "suite": suite, "mean": mean, "tasks": tasks,
                                      "covered": agg["covered"], "total": agg["total"]}
                self.metrics.append({"step": steps, "epoch": epoch, "kind": "zeroshot", "suite": suite, "mean": mean,
                                     "tasks": tasks, "covered": agg["covered"], "total": agg["total"],
                                     "time": time.time()})
                self.tracker.log_metrics(mlflow_figures(suite, mean, tasks), step=steps)
                log.info("zero-shot at step %d (epoch %d): %s mean %s over %d/%d tasks (%.1f s)", steps, epoch, suite,
                         "n/a" if mean is None else f"{mean:.2f}%", agg["covered"], agg["total"],
                         time.monotonic() - t0)
        if self.world_size > 1:
            dist_utils.barrier()

    def _deepspeed_traffic(self, engine, run) -> dict[str, tuple[int, int]]:
        """DeepSpeed's per-step gradient and parameter collectives, computed from the parameter groups and
        the ZeRO stage (``collectives.deepspeed_step_traffic``); empty on one rank."""
        if self.world_size <= 1:
            return {}
        return collectives.deepspeed_step_traffic(collectives.engine_group_sizes(engine, run), run.zero_stage,
                                                  self.world_size, run.zero_bucket_size)

    def _step_flags(self, out: dict) -> torch.Tensor:
        """``[stop signal, non-finite loss, lambda divergence, s]`` as one device vector, reduced by MAX.

        Built from device tensors without reading them; s (identical on every rank) rides along for
        the temperature-lr threshold rule so that reading it costs nothing extra.
        """
        device = self.engine.device
        terms = [v.detach().float().reshape(()) for k, v in out.items()
                 if (k == "loss" or k.endswith("_loss")) and isinstance(v, torch.Tensor)]
        nonfinite = (~torch.isfinite(torch.stack(terms))).any().float()
        gap = out.get("lambda_gap_prev")
        if self.pos.epoch > 0 and isinstance(gap, torch.Tensor):
            # lambda_gap_prev (the previous epoch's net vs the fresh in-batch sums) is the divergence
            # signal: lambda_gap itself is large by design right after each epoch's re-initialisation.
            gap = gap.detach().float()
            diverged = (torch.isfinite(gap) & (gap.abs() > self.run.amorlip.divergence_bound)).float()
        else:
            diverged = torch.zeros((), device=device)
        scale = out.get("logit_scale")
        scale = scale.detach().float().reshape(()) if isinstance(scale, torch.Tensor) else \
            torch.full((), float(scale if scale is not None else math.nan), device=device)
        signal_flag = torch.full((), 1.0 if self.stop.signum is not None else 0.0, device=device)
        flags = torch.stack([signal_flag.to(device), nonfinite.to(device), diverged.to(device), scale.to(device)])
        if self.world_size > 1:
            dist_utils.all_reduce_(flags, op=torch.distributed.ReduceOp.MAX, group=self.world.step_group)
        return flags

    def _step(self, batch: dict) -> dict:
        run, pos = self.run, self.pos
        collectives.take()  # what ran between steps (checkpoints, diagnostics, validation) is no step's
        device = self.engine.device
        images = batch["images"].to(device, non_blocking=True)
        if self._device_transform is not None:
            images = self._device_transform(images)
        texts = batch["texts"].to(device, non_blocking=True)
        lr = set_lr(self.engine.optimizer, run, pos.steps_done, self.total_steps)

        def check_flags(out: dict) -> None:
            """Between the task's forward and the update (amorlip.train.step.encoder_step)."""
            out["lr"] = lr
            # the step's one host read: every rank decides the same from the reduced flags
            signal_any, bad_any, diverged_any, scale = self._step_flags(out).tolist()
            if bad_any:
                self._raise_nonfinite(out)
            if diverged_any:
                self._raise_diverged(out)
            # only the reduced flag decides: a signal landing after the all-reduce waits for the next
            # step, so every rank stops at the same step (save_checkpoint is collective)
            self._stop_now = bool(signal_any)
            logit_lr = set_logit_scale_lr_by_threshold(self.engine.optimizer, run, scale)
            if logit_lr is not None:
                out["lr_logit_scale"] = logit_lr

        out = encoder_step(self.task, self.engine, images, texts, pos.step_in_epoch,
                           indices=batch.get("indices"), before_update=check_flags)
        self._debug_record(batch)
        if self._debug_sleep:
            time.sleep(self._debug_sleep)
        self._skipped_local += int(batch.get("skipped", 0))
        pos.steps_done += 1
        pos.step_in_epoch += 1
        pos.samples_seen += self.global_batch
        return out

    def _where(self) -> str:
        pos = self.pos
        return f"step {pos.steps_done} (epoch {pos.epoch}, step {pos.step_in_epoch} of the epoch)"

    def _last_good(self) -> str:
        # built only when raising: listing the checkpoint folder every step would hit a shared file
        # system from every rank on every step
        return f"the last good checkpoint ({ckpt.latest_complete_tag(self.ckpt_dir) or 'none'}) is kept"

    def _raise_nonfinite(self, out: dict) -> None:
        here = nonfinite_terms(out)
        terms = ", ".join(f"{k}={v:.6g}" for k, v in loss_terms(out).items())
        raise TrainingDiverged(f"non-finite loss at {self._where()}: {terms} (on rank "
                               f"{'this' if here else 'another'}); {self._last_good()}. Lower lr, check the data "
                               "or the logit scale.")

    def _raise_diverged(self, out: dict) -> None:
        gap = out.get("lambda_gap_prev")
        gap = float(gap) if gap is not None else math.nan
        raise TrainingDiverged(
            f"lambda divergence at {self._where()}: |lambda_gap_prev| = {abs(gap):.4g} > "
            f"divergence_bound {self.run.amorlip.divergence_bound} (on rank {self.world.rank} or another); "
            f"{self._last_good()}. Lower "
            "amorlip.lambda_lr or raise the bound.")

    def _after_step(self, out: dict, speed: Throughput) -> dict[str, float] | None:
        """Add the step to the metric window; on logging steps reduce it over ranks and record it.

        Returns the logged means on logging steps, else None (nothing was read from the device).
        """
        pos = self.pos
        self._window.add(out)
        last = pos.steps_done >= self.total_steps
        logged = None
        if pos.steps_done % self.run.log_every == 0 or last:
            means, skipped = self._window.reduce(self.world, self._skipped_local)
            self.comm.add_step(collectives.take())  # this step's collectives, the metric all-reduce included
            means.update(self.comm.window_means())
            self._skipped_local = 0
            pos.skipped_samples += skipped
            self.final_losses = {k: v for k, v in means.items() if k == "loss" or k.endswith("_loss")}
            record = {"step": pos.steps_done, "epoch": pos.epoch, **means, "lr": out["lr"],
                      "images_per_s": speed.rate(), "skipped": pos.skipped_samples,
                      "samples_seen": pos.samples_seen, "global_batch": self.global_batch,
                      "world_size": self.world_size}
            if self.master:
                self.metrics.append({**record, "time": time.time()})
                self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=pos.steps_done)
            self.last_logged = means
            logged = means
        else:
            self.comm.add_step(collectives.take())
        self._validate(pos.epoch, epoch_end=False)
        if pos.steps_done % self.run.checkpoint_every == 0 and not last:
            self.save()
        return logged

    def _sync_skipped(self) -> None:
        """Add every rank's corrupt-sample count to the global total (all ranks call this together)."""
        local = torch.tensor([float(self._skipped_local)])
        if self.world_size > 1:
            local = local.to(self.engine.device)
            torch.distributed.all_reduce(local, group=self.world.step_group)
        self.pos.skipped_samples += int(local.item())
        self._skipped_local = 0

    # ------------------------------------------------------------------ debugging aids

    def _debug_record(self, batch: dict) -> None:
        """With AMORLIP_DEBUG_KEYS=PATH, each rank appends (step, sample keys) to PATH.rank{r}.jsonl.

        Used to prove a resume neither repeats nor skips data; cheap enough for real runs.
        """
        if not self._debug_keys:
            return
        rec = {"step": self.pos.steps_done, "epoch": self.pos.epoch, "step_in_epoch": self.pos.step_in_epoch,
               "keys": list(batch.get("keys", [])), "pid": os.getpid()}
        with open(f"{self._debug_keys}.rank{self.world.rank}.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def debug_final(self) -> None:
        """With AMORLIP_DEBUG_KEYS set, each rank records checksums of its weights and of the task's
        replicated state (replica agreement). Under ZeRO-3 the module holds partitions only, so the
        parameters are gathered first (every rank takes part)."""
        if not self._debug_keys:
            return
        digest = hashlib.sha256()
        for name, tensor in sorted(full_module_state(self.engine).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        record = {"final_step": self.pos.steps_done, "weights_sha256": digest.hexdigest(), "pid": os.getpid(),
                  "replica_checksum": self.task.replica_checksum()}
        with open(f"{self._debug_keys}.rank{self.world.rank}.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def full_module_state(engine) -> dict[str, torch.Tensor]:
    """The module's full parameters and buffers on this rank (gathered under ZeRO-3; collective there)."""
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


class MetricWindow:
    """Per-key sums of the step outputs since the last logging step, kept on the device.

    Tensor values are added on the device (no read); plain numbers on the host. Each key is averaged
    over the steps that produced it: a task may report a metric on some steps only (AmorLIP's
    partition-target diagnostics with local negatives exist on Stage-I steps only). :meth:`reduce`
    averages the tensor sums over those steps and over ranks with one all-reduce and one read, so a
    logged ``loss`` is the mean over the global batch rather than rank 0's share. The per-key step
    counts travel in the same vector, so the vector's layout is the sorted key set, which every rank
    shares: a task's keys on a step are a function of the step (never of the data or the rank).
    """

    def __init__(self) -> None:
        self.device_sums: dict[str, torch.Tensor] = {}
        self.device_counts: dict[str, int] = {}
        self.host_sums: dict[str, float] = {}
        self.host_counts: dict[str, int] = {}
        self.steps = 0

    def add(self, out: dict) -> None:
        self.steps += 1
        for key, value in out.items():
            if key == "lr" or isinstance(value, bool):
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
                self.device_sums[key] = self.device_sums[key] + value if key in self.device_sums else value.clone()
                self.device_counts[key] = self.device_counts.get(key, 0) + 1
            elif isinstance(value, (int, float)):
                self.host_sums[key] = self.host_sums.get(key, 0.0) + float(value)
                self.host_counts[key] = self.host_counts.get(key, 0) + 1

    def reduce(self, world, skipped_local: int) -> tuple[dict[str, float], int]:
        """``(means over steps and ranks, skipped samples summed over ranks)``; empties the window.

        A key's mean is its sum over ranks and steps divided by the number of (rank, step) pairs that
        produced it; keys no step of the window produced are absent.
        """
        keys = sorted(self.device_sums)
        device = next(iter(self.device_sums.values())).device if keys else torch.device("cpu")
        counts = torch.tensor([float(self.device_counts[k]) for k in keys], device=device)
        vector = torch.cat([torch.stack([self.device_sums[k] for k in keys]) if keys else counts[:0], counts,
                            torch.full((1,), float(skipped_local), device=device)])
        if world.world_size > 1:
            dist_utils.all_reduce_(vector, group=world.step_group)
        values = vector.tolist()
        n = len(keys)
        means = {k: v / c for k, v, c in zip(keys, values[:n], values[n:2 * n])}
        means.update({k: v / self.host_counts[k] for k, v in self.host_sums.items()})
        skipped = int(round(values[-1]))
        self.device_sums, self.device_counts, self.host_sums, self.host_counts, self.steps = {}, {}, {}, {}, 0
        return means, skipped
