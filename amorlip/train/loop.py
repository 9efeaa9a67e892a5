"""The training loop: one DeepSpeed step per batch, checkpoints, resume, stop conditions.

Per step (method notes 1.7): set the lr of every group for the global step; the task's forward
(targets, lambda updates, EMA, encoder loss); one all-reduce of the stop flags (preemption signal,
non-finite loss, lambda divergence) so every rank takes the same decision; ``engine.backward``;
``engine.step``; the logit-scale clamp. Positions are counted as *steps done*: a checkpoint taken
after ``n`` steps stores the data position of step ``n`` (epoch, step in epoch), and a resume asks
the loader for exactly that position, so no step is repeated or skipped.

Stops:
- a non-finite loss (or a previous-epoch lambda gap beyond ``amorlip.divergence_bound`` after epoch 0) raises
  :class:`TrainingDiverged` *before* the bad step touches the weights; the last checkpoint stays;
- SIGTERM / SIGUSR1 (SLURM preemption, ``scancel --signal``) finish the current step, save a
  checkpoint and raise :class:`Preempted`; the job should be requeued and will resume;
- a checkpoint that cannot be written (disk full) raises :class:`CheckpointWriteFailed`, which names
  the previous complete checkpoint: the torn tag has no marker, so a rerun resumes from that one.
"""

from __future__ import annotations

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

from amorlip import distributed as dist_utils
from amorlip.train import checkpoint as ckpt
from amorlip.train.engine import clamp_master_logit_scale, set_lr
from amorlip.train.progress import MetricsFile, Progress, Throughput, loss_terms, nonfinite_terms

log = logging.getLogger(__name__)

DEBUG_KEYS_ENV = "AMORLIP_DEBUG_KEYS"
# Seconds to sleep after each step: makes kill/preemption timing reproducible on a fast tiny run
# (tests, and trying out a requeue setup by hand). Never set in real runs.
DEBUG_STEP_SLEEP_ENV = "AMORLIP_DEBUG_STEP_SLEEP"


class TrainingDiverged(RuntimeError):
    """Non-finite loss or lambda divergence: stopping is the only honest outcome."""


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
    """Owns the engine, the task and the loader for one run; :meth:`fit` trains to ``total_steps``."""

    def __init__(self, *, run, engine, task, loader, run_dir: Path, world_size: int, global_batch: int,
                 tracker, stop: StopSignal, master: bool, started_at: float | None = None):
        self.run = run
        self.engine = engine
        self.task = task
        self.loader = loader
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.world_size = world_size
        self.tracker = tracker
        self.stop = stop
        self.master = master
        self.steps_per_epoch = len(loader)
        self.total_steps = min(run.epochs * self.steps_per_epoch, run.max_steps or math.inf)
        self.global_batch = global_batch
        self.pos = Position()
        self.last_saved = -1
        self.resumed_from: str | None = None
        self.final_losses: dict[str, float] = {}
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self._window: dict[str, list[float]] = {}
        self._skipped_local = 0
        self._debug_keys = os.environ.get(DEBUG_KEYS_ENV)
        self._debug_sleep = float(os.environ.get(DEBUG_STEP_SLEEP_ENV) or 0.0)
        self._attempt_t0 = started_at if started_at is not None else time.monotonic()
        self._stop_now = False
        self._loop_t0: float | None = None

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
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "final_losses": dict(self.final_losses),
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
        state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        if state.get("world_size") != self.world_size:
            raise RuntimeError(
                f"checkpoint {tag} was written by {state.get('world_size')} ranks but this job has "
                f"{self.world_size}; the data position depends on the rank count: relaunch with "
                f"{state.get('world_size')} ranks or delete {self.ckpt_dir} to start over")
        changed = sorted(k for k, v in state["run"].items()
                         if json.loads(json.dumps(self.run.to_dict())).get(k) != v)
        if changed and self.master:
            log.warning("run config changed since checkpoint %s (%s); continuing with the new values",
                        tag, ", ".join(changed))
        self.pos = Position(**state["position"])
        self.task.load_state_dict(state["task"])
        self.final_losses = dict(state.get("final_losses") or {})
        self.last_saved = self.pos.steps_done
        self.resumed_from = tag
        if self.master:
            kept = self.metrics.truncate_after(self.pos.steps_done)
            log.info("resumed from %s: step %d (epoch %d, step %d in epoch), %d metric lines kept", tag,
                     self.pos.steps_done, self.pos.epoch, self.pos.step_in_epoch, kept)
        return state

    def save(self) -> None:
        if self.last_saved == self.pos.steps_done:
            return
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
        speed = Throughput(self.global_batch)
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
                    progress.update(float(out["loss"].detach()), speed.peek(), epoch)
                    self._after_step(out, speed)
                    if self._stop_now and self.pos.steps_done < self.total_steps:
                        self.save()
                        raise Preempted(f"stop signal ({self.stop.signum or 'on another rank'}) at step {self.pos.steps_done}: "
                                        f"checkpoint {ckpt.tag_for(self.pos.steps_done)} saved")
                if self.pos.step_in_epoch >= spe:  # the epoch is done: move on, checkpoint
                    self.pos.epoch, self.pos.step_in_epoch = epoch + 1, 0
                    self.save()
            self.save()
        finally:
            progress.close()
        self._sync_skipped()
        return self.pos

    def _step(self, batch: dict) -> dict:
        run, pos = self.run, self.pos
        device = self.engine.device
        images = batch["images"].to(device, non_blocking=True)
        texts = batch["texts"].to(device, non_blocking=True)
        lr = set_lr(self.engine.optimizer, run, pos.steps_done, self.total_steps)
        out = self.task.training_forward(images, texts, pos.step_in_epoch)
        out["lr"] = lr
        bad = nonfinite_terms(out)
        # lambda_gap_prev (the previous epoch's net vs the fresh in-batch sums) is the divergence
        # signal: lambda_gap itself is large by design right after each epoch's re-initialisation.
        gap = out.get("lambda_gap_prev")
        diverged = (pos.epoch > 0 and gap is not None and math.isfinite(gap)
                    and abs(gap) > run.amorlip.divergence_bound)
        flags = torch.tensor([1.0 if self.stop.signum is not None else 0.0, 1.0 if bad else 0.0,
                              1.0 if diverged else 0.0])
        if dist_utils.world_size() > 1:
            flags = flags.to(device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signal_any, bad_any, diverged_any = (bool(v) for v in flags.tolist())
        where = f"step {pos.steps_done} (epoch {pos.epoch}, step {pos.step_in_epoch} of the epoch)"
        last = f"the last good checkpoint ({ckpt.latest_complete_tag(self.ckpt_dir) or 'none'}) is kept"
        if bad_any:
            terms = ", ".join(f"{k}={v:.6g}" for k, v in loss_terms(out).items())
            raise TrainingDiverged(f"non-finite loss at {where}: {terms} (on rank "
                                   f"{'this' if bad else 'another'}); {last}. Lower lr, check the data "
                                   "or the logit scale.")
        if diverged_any:
            raise TrainingDiverged(
                f"lambda divergence at {where}: |lambda_gap_prev| = {abs(gap or 0.0):.4g} > divergence_bound "
                f"{run.amorlip.divergence_bound}; {last}. Lower amorlip.lambda_lr or raise the bound.")
        # only the reduced flag decides: a signal landing after the all-reduce waits for the next step,
        # so every rank stops at the same step (save_checkpoint is collective)
        self._stop_now = signal_any
        self.engine.backward(out["loss"])
        self.engine.step()
        clamp_master_logit_scale(self.engine, run.max_logit_scale)
        self.task.after_encoder_step()
        self._debug_record(batch)
        if self._debug_sleep:
            time.sleep(self._debug_sleep)
        self._skipped_local += int(batch.get("skipped", 0))
        pos.steps_done += 1
        pos.step_in_epoch += 1
        pos.samples_seen += self.global_batch
        return out

    def _after_step(self, out: dict, speed: Throughput) -> None:
        pos = self.pos
        for key, value in out.items():
            if key != "loss" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._window.setdefault(key, []).append(float(value))
        self._window.setdefault("loss", []).append(float(out["loss"].detach()))
        last = pos.steps_done >= self.total_steps
        if pos.steps_done % self.run.log_every == 0 or last:
            self._sync_skipped()
            means = {k: sum(v) / len(v) for k, v in self._window.items() if v}
            self._window = {}
            self.final_losses = {k: v for k, v in means.items() if k == "loss" or k.endswith("_loss")}
            record = {"step": pos.steps_done, "epoch": pos.epoch, **means, "lr": out["lr"],
                      "images_per_s": speed.rate(), "skipped": pos.skipped_samples,
                      "samples_seen": pos.samples_seen}
            if self.master:
                self.metrics.append({**record, "time": time.time()})
                self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=pos.steps_done)
        if pos.steps_done % self.run.checkpoint_every == 0 and not last:
            self.save()

    def _sync_skipped(self) -> None:
        """Add every rank's corrupt-sample count to the global total (all ranks call this together)."""
        local = torch.tensor([float(self._skipped_local)])
        if dist_utils.world_size() > 1:
            local = local.to(self.engine.device)
            torch.distributed.all_reduce(local)
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
        with open(f"{self._debug_keys}.rank{dist_utils.rank()}.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def debug_final(self) -> None:
        """With AMORLIP_DEBUG_KEYS set, each rank records a checksum of its weights (replica agreement)."""
        if not self._debug_keys:
            return
        digest = hashlib.sha256()
        for name, param in sorted(self.engine.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
        with open(f"{self._debug_keys}.rank{dist_utils.rank()}.jsonl", "a") as fh:
            fh.write(json.dumps({"final_step": self.pos.steps_done, "weights_sha256": digest.hexdigest(),
                                 "pid": os.getpid()}) + "\n")
