"""Preemption: SIGUSR1 (SLURM's ``--signal=USR1@300`` before the time limit) and SIGTERM (``scancel``,
preemption; SIGKILL follows after KillWait, 30 s by default).

On either signal the trainer finishes the current step, writes a complete checkpoint and exits with
75 (EX_TEMPFAIL), which the SLURM profile's ``--requeue`` and Snakemake's ``retries`` turn into a
rerun that resumes there. Figures: seconds from the signal to the checkpoint's completion marker, and
to the process exit; both must fit in the 30 s grace.
"""

from __future__ import annotations

import signal
import time

from amorlip.train import checkpoint as ckpt

from .conftest import read_jsonl, run_dir, train_job, wait_for, write_tiny_config

GRACE_S = 30  # SLURM's default KillWait between SIGTERM and SIGKILL
EXIT_REQUEUE = 75


def test_sigusr1_then_sigterm_checkpoint_within_grace_exit_75(tmp_path, mlflow_template_db):
    # no periodic checkpoints: the only checkpoints are the ones the signals cause (and the epoch end)
    config = write_tiny_config(tmp_path, run_overrides={"checkpoint_every": 1000})
    ckpt_dir = run_dir(tmp_path) / "checkpoints"
    keys = tmp_path / "keys"
    previous_tag = None
    for attempt, (signum, at_step) in enumerate([(signal.SIGUSR1, 3), (signal.SIGTERM, 16)], start=1):
        job = train_job(config, "tiny-run", tmp_path / f"attempt-{attempt}.log", AMORLIP_DEBUG_KEYS=str(keys))

        def mine(job=job):
            return [r for r in read_jsonl(f"{keys}.rank0.jsonl") if r.get("pid") == job.pid and "keys" in r]

        wait_for(lambda at_step=at_step, mine=mine: any(r["step"] >= at_step for r in mine()), 240,
                 interval=0.02, what=f"step {at_step}", proc=job.proc)
        before = set(ckpt.complete_tags(ckpt_dir))
        t0 = time.monotonic()
        job.signal(signum)
        tag = wait_for(lambda before=before: next(iter(set(ckpt.complete_tags(ckpt_dir)) - before), None),
                       GRACE_S, interval=0.01, what="the preemption checkpoint", proc=job.proc)
        to_checkpoint = time.monotonic() - t0
        rc = job.wait(GRACE_S)
        to_exit = time.monotonic() - t0
        text = job.text()
        assert rc == EXIT_REQUEUE, text[-3000:]
        assert f"exiting with {EXIT_REQUEUE}" in text
        steps_done = max(r["step"] for r in mine()) + 1
        assert ckpt.step_of(tag) == steps_done, (tag, steps_done)  # no step lost, none trained twice
        assert not (run_dir(tmp_path) / "train.json").exists()  # the Snakemake output only when complete
        if previous_tag:
            assert f"resumed from {previous_tag}" in text
        print(f"\n{signal.Signals(signum).name} at step {at_step}: checkpoint {tag} complete after "
              f"{to_checkpoint:.2f} s, exit {rc} after {to_exit:.2f} s (grace {GRACE_S} s)")
        assert to_exit < GRACE_S
        previous_tag = tag
