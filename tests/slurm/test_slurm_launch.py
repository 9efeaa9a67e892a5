"""`amorlip launch` on the real local SLURM cluster: batch script versus job step, and requeue exits.

- The environments of a real `sbatch -n 2` batch script and of the tasks of a real step started
  with the project's own srun line (amorlip.slurm.srun_command: the real srun must accept every
  flag) lead to the right decisions: start ranks with srun from the batch script, run inline in a
  step, OMP_NUM_THREADS=1 per rank; evaluation takes the GPU only when the job holds one.
- `sbatch -n 2 --wrap "amorlip launch --nproc 2 -- train ..."` (an allocation, no step) starts both
  ranks as one srun step (world size 2, SLURM rendezvous); `scancel --signal=USR1` mid-training
  makes them checkpoint and the job ends with exit code 75 as SLURM records it, not the 137/143 of
  a rank killed by `--kill-on-bad-exit` while its peer exits first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_helpers import copy_data, job_env, tiny_config, wait_for

from amorlip import devices, slurm

pytestmark = [pytest.mark.slurm]

AMORLIP = Path(sys.executable).parent / "amorlip"


def _sbatch(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60,
                         env=env or job_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job_fields(jobid: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (finished jobs stay visible for MinJobAge = 600 s)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_done(jobid: str, timeout: float) -> dict[str, str]:
    def done():
        fields = _job_fields(jobid)
        return fields if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                    "NODE_FAIL", "OUT_OF_MEMORY") else None
    try:
        return wait_for(done, timeout=timeout, interval=1.0, what=f"SLURM job {jobid} to end")
    except AssertionError:
        subprocess.run(["scancel", jobid], capture_output=True, timeout=30)
        raise


def _read_env(path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in path.read_text().split("\0") if "=" in item)


def test_launch_decisions_on_real_slurm_environments(tmp_path: Path, slurm_cluster) -> None:
    step = " ".join(slurm.srun_command(1, 2, 1))
    script = (f"env -0 > batch.env && {step} bash -c 'env -0 > step.$SLURM_PROCID.env'")
    env = job_env()
    env["OMP_NUM_THREADS"] = "5"  # what Snakemake would export (its `threads`); the ranks must get 1
    gpu_job = _sbatch("-n", "2", "-c", "1", "--gres=gpu:2", f"--chdir={tmp_path}", "-o", "job.out",
                      "--wrap", script, env=env)
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    cpu_job = _sbatch("-n", "1", f"--chdir={cpu_dir}", "-o", "job.out", "--wrap", "env -0 > batch.env")
    for jobid, where in ((gpu_job, tmp_path), (cpu_job, cpu_dir)):
        fields = _wait_done(jobid, timeout=120)
        out = where / "job.out"
        assert fields["JobState"] == "COMPLETED", (fields, out.read_text() if out.exists() else "")

    batch = _read_env(tmp_path / "batch.env")
    tasks = [_read_env(tmp_path / f"step.{i}.env") for i in range(2)]
    # the batch script says 2 tasks and rank 0 like a rank would: only the step id tells them apart
    assert batch["SLURM_NTASKS"] == "2" and batch["OMP_NUM_THREADS"] == "5" and not slurm.in_job_step(batch)
    assert slurm.launch_plan(2, batch) == "srun"
    for i, task in enumerate(tasks):
        assert task["SLURM_PROCID"] == str(i) and slurm.in_job_step(task), task
        assert slurm.launch_plan(2, task) == "inline"
        assert task["OMP_NUM_THREADS"] == "1"  # srun --export, whatever the batch script had
    # evaluation: the GPU job holds its GPUs; the CPU job on the same (GPU) node holds none
    assert devices.eval_device(batch, cuda_device_count=2) == "cuda:0"
    assert devices.eval_device(_read_env(cpu_dir / "batch.env"), cuda_device_count=2) == "cpu"


PREEMPT_RUN = {"method": "amorlip", "nproc": 2, "epochs": 8, "max_steps": 40, "checkpoint_every": 5}


def test_launch_in_allocation_starts_all_ranks_and_requeue_exit_is_75(tmp_path: Path, slurm_tiny_data: Path) -> None:
    copy_data(slurm_tiny_data, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(amorlip=PREEMPT_RUN)))
    env = job_env()
    env["PATH"] = f"{AMORLIP.parent}{os.pathsep}{env.get('PATH', '')}"
    env["AMORLIP_DEBUG_STEP_SLEEP"] = "1.0"  # a window of ~35 s between the first checkpoint and the end
    env["OMP_NUM_THREADS"] = "1"
    # the allocation of a user's own `sbatch -n 2`: no srun in sight, amorlip launch must start it
    jobid = _sbatch("-n", "2", "-c", "1", f"--chdir={tmp_path}", "-o", "job.log", "--wrap",
                    f"{AMORLIP} launch --nproc 2 -- train --config config.yaml --run amorlip", env=env)
    log = tmp_path / "job.log"
    run_dir = tmp_path / "runs" / "amorlip"
    t0 = time.monotonic()
    try:
        wait_for(lambda: sorted(run_dir.glob("checkpoints/step-*/complete"))
                 or _job_fields(jobid).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"),
                 timeout=600, what="the first checkpoint")
    except AssertionError:
        subprocess.run(["scancel", jobid], capture_output=True, timeout=30)
        raise
    assert _job_fields(jobid).get("JobState") == "RUNNING", log.read_text()[-4000:]
    # to the job's steps (the srun'd ranks), not the batch shell: what --signal=USR1@T does
    subprocess.run(["scancel", "--signal=USR1", jobid], check=True, timeout=30)
    fields = _wait_done(jobid, timeout=300)
    text = log.read_text()
    print(f"job {jobid}: {fields.get('JobState')} {fields.get('ExitCode')} after {time.monotonic() - t0:.0f} s")

    # amorlip launch saw an allocation, not a step, and started both ranks with srun
    assert "starting the ranks with" in text and "--kill-on-bad-exit=1" in text, text[-4000:]
    assert re.search(r"rank 1/2 .*via slurm", text) and re.search(r"rank 0/2 .*via slurm", text), text[-4000:]
    # the requeue code as SLURM records it (the batch shell exits with srun's code)
    assert fields["ExitCode"] == "75:0", (fields, text[-4000:])
    assert fields["JobState"] == "FAILED", fields
    assert "Terminated" not in text and "Killed" not in text, text[-4000:]
    assert not (run_dir / "train.json").exists()  # stopped before the end, with a checkpoint to resume
    assert sorted(run_dir.glob("checkpoints/step-*/complete"))
