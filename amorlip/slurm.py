"""How ``amorlip launch`` starts ranks under SLURM, and the one ``srun`` line every launch path uses.

Three situations look alike from the environment and must not be confused:

- **inside a job step** started by ``srun -n N`` (SLURM_STEP_ID is a step number): SLURM already
  started one process per rank, so the command runs in this process;
- **inside an allocation but not in a step**: the batch script of ``sbatch -n 8`` (no SLURM_STEP_ID
  at all on Slurm 22.05; newer releases may say ``batch``), the external step ``extern``, or the
  shell of ``salloc`` (possibly in its ``interactive`` step). SLURM_NTASKS still says 8 and
  SLURM_PROCID says 0, but only this one process exists: the ranks must be started with ``srun``,
  or one process waits for 7 peers that never come;
- **no allocation**: ranks are started locally with ``torchrun``.

:func:`srun_command` is the one place the ``srun`` flags live, for the Snakemake rule
(workflow/rules/train.smk) and for ``amorlip launch`` inside an allocation; docs/slurm.md says why
each flag is there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

# SLURM's reserved step ids (slurm.h): SLURM_MAX_NORMAL_STEP_ID is 0xfffffff0; above it are the
# pending, extern, batch and interactive steps, none of which is one of the ranks.
_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
_NAMED_STEPS = ("batch", "extern", "interactive", "pending")

# CPUs each rank gets beyond its data-loader workers: one for the rank's own Python thread, which
# drives the GPU and must never wait for a core, and one for its helper threads (NCCL's proxy
# thread, which polls, the pin-memory thread, DeepSpeed's and gloo's threads).
CPUS_PER_RANK_BEYOND_WORKERS = 2


def job_step_id(env: Mapping[str, str] | None = None) -> int | None:
    """This process's SLURM step number, or None outside a numbered step (batch, extern, none)."""
    env = os.environ if env is None else env
    raw = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    if not raw or raw.lower() in _NAMED_STEPS:
        return None
    try:
        step = int(raw)
    except ValueError:
        return None
    return step if 0 <= step < _MAX_NORMAL_STEP_ID else None


def in_job_step(env: Mapping[str, str] | None = None) -> bool:
    """True inside a step that ``srun`` started (one of its tasks), False in a batch script or salloc."""
    return job_step_id(env) is not None


def in_allocation(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def allocation_tasks(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
    except ValueError:
        return 1


def launch_plan(nproc: int, env: Mapping[str, str] | None = None) -> str:
    """How ``amorlip launch --nproc N`` starts its ranks here: ``inline``, ``srun`` or ``torchrun``.

    - ``inline``: run the command in this process: one rank (``nproc == 1``), or this process is
      already one of several tasks of an ``srun`` step (``distributed.py`` reads SLURM_PROCID & co.).
    - ``srun``: inside a multi-task allocation but not in a step (an ``sbatch -n 8`` script, an
      ``salloc`` shell): start the ranks as a job step, so that they get the allocation's nodes,
      GPUs and SLURM's signals.
    - ``torchrun``: anywhere else with several ranks (a workstation, a one-task allocation).
    """
    env = os.environ if env is None else env
    tasks = allocation_tasks(env)
    if in_job_step(env):
        return "inline" if tasks > 1 or nproc == 1 else "torchrun"
    if nproc == 1:
        return "inline"
    if in_allocation(env) and tasks > 1:
        return "srun"
    return "torchrun"


def srun_command(nodes: int, ntasks_per_node: int, cpus_per_task: int | None = None,
                 omp_threads: int = 1, srun: str = "srun") -> list[str]:
    """The ``srun`` prefix that starts ``nodes x ntasks_per_node`` ranks, one per GPU.

    - ``--gpu-bind=none``: every rank sees all GPUs of its node that the job holds (a site default
      such as ``--gpu-bind=single:1`` would hide the peers' GPUs, and NCCL then cannot use
      NVLink/P2P between ranks); ``distributed.py`` picks ``local_rank % device_count``.
    - ``--kill-on-bad-exit=1``: a rank that dies (e.g. out of memory) stops the others at once
      instead of leaving them in a collective until its timeout. Its SIGTERM also reaches ranks
      that are still finishing a requeue exit: :func:`absorb_late_sigterm` keeps their 75.
    - ``env OMP_NUM_THREADS=n``: what torchrun does for several local ranks (1 unless asked); the
      value Snakemake puts in the job's environment is its ``threads``, which means nothing per
      rank. Set in srun's own environment, which it passes to every task: ``srun
      --export=ALL,OMP_NUM_THREADS=1`` would not do, since with ALL the caller's value wins.
    - the geometry is explicit: the Snakemake SLURM plugin removes SLURM_NTASKS & co. from a job's
      environment, and srun does not inherit ``--cpus-per-task`` from sbatch on every release.
    """
    cmd = ["env", f"OMP_NUM_THREADS={max(1, int(omp_threads))}", srun, f"--nodes={nodes}",
           f"--ntasks={nodes * ntasks_per_node}", f"--ntasks-per-node={ntasks_per_node}"]
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    cmd += ["--gpu-bind=none", "--kill-on-bad-exit=1"]
    return cmd


def allocation_srun_command(nproc: int, nodes: int | None = None,
                            env: Mapping[str, str] | None = None) -> list[str]:
    """``srun`` for ``amorlip launch --nproc G`` run in an allocation: G ranks on each of its nodes.

    ``nodes`` defaults to the allocation's node count; CPUs per task follow the allocation's
    ``--cpus-per-task``; OMP_NUM_THREADS follows the environment if set, else 1 (torchrun's rule).
    """
    env = os.environ if env is None else env
    if nodes is None:
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    cpus = env.get("SLURM_CPUS_PER_TASK")
    omp = env.get("OMP_NUM_THREADS") or "1"
    return srun_command(nodes, nproc, int(cpus) if cpus and cpus.isdigit() else None,
                        omp_threads=int(omp) if omp.isdigit() else 1)


def absorb_late_sigterm() -> None:
    """Make SIGTERM harmless in a rank that runs inline under ``srun --kill-on-bad-exit``.

    When the ranks stop for a requeue, each exits 75 after the preemption checkpoint. The first
    one out makes srun send SIGTERM to the others (then SIGKILL after the cluster's KillWait,
    30 s by default); a peer that is still closing its MLflow run or its process group would die
    of it, and srun would report 143 instead of 75, so SLURM and Snakemake would see a crash.
    Outside the trainer's own handler (which turns SIGTERM into a checkpoint and a stop), this one
    only logs: the rank finishes and exits with its own code through :func:`exit_rank`; SIGKILL
    still ends a rank that hangs.
    """

    def _log_sigterm(signum, frame) -> None:
        log.warning("SIGTERM outside training (srun stops the step because a peer exited); "
                    "finishing this rank's exit")

    signal.signal(signal.SIGTERM, _log_sigterm)


def exit_rank(code: int) -> None:
    """End a rank that ran inline under srun with ``code``, without Python's finalization.

    The command has finished (checkpoint, outputs and MLflow run closed), but interpreter
    finalization can still take many seconds (joining library threads, tearing down the process
    group's sockets), and it resets Python-level signal handlers to the default: a peer's exit
    would then make srun's SIGTERM kill this rank and srun report 143 instead of ``code``. So:
    SIGTERM ignored (kept through exit), logs and streams flushed, ``os._exit``.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))
