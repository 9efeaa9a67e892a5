"""Helpers for the tests against the real local SLURM cluster (scripts/slurm-up.sh).

`make test` (scripts/run-tests.sh) starts the cluster when it can, so these tests run there; they
skip when no cluster answers (no `sinfo`, controller down, node not usable). Every Snakemake call
goes through :func:`run_snakemake`, which always has a timeout: a wrong status command makes the
SLURM plugin wait forever instead of failing (docs/slurm.md), and a test must fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SLURM_PROFILE = REPO / "profiles" / "slurm"
TINY = REPO / "config" / "tiny.yaml"


def cluster_problem() -> str | None:
    """Why SLURM tests cannot run here, or None when the local cluster is usable."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "no SLURM client (run `make slurm-up` as root, or `make test`)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"SLURM does not answer: {exc}"
    if "UP" not in ping.stdout:
        return f"slurmctld is not up: {ping.stdout.strip() or ping.stderr.strip()}"
    states = state.stdout.split()
    if not states or not all(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"SLURM node not usable: {states or state.stderr.strip()}"
    return None


def job_env() -> dict[str, str]:
    """The environment Snakemake (and, through sbatch --export=ALL, every job) gets."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SNAKEMAKE_PROFILE"))}
    env.pop("MLFLOW_TRACKING_URI", None)  # the config's default store: results/mlflow.db
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_prefix() -> str:
    """A job-name prefix unique to one Snakemake invocation (alphanumeric, as the plugin requires)."""
    return "amt" + uuid.uuid4().hex[:10]


def jobs_named(prefix: str) -> list[dict[str, str]]:
    """This invocation's jobs, finished ones included (MinJobAge keeps them for 10 minutes)."""
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%j|%T|%k"],
                         capture_output=True, text=True, timeout=30).stdout
    jobs = []
    for line in out.splitlines():
        jobid, name, state, comment = (line.split("|", 3) + ["", "", ""])[:4]
        if name.startswith(prefix + "_"):
            jobs.append({"id": jobid, "name": name, "state": state, "comment": comment})
    return jobs


def cancel_jobs(prefix: str) -> None:
    ids = [j["id"] for j in jobs_named(prefix)
           if j["state"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@dataclass
class SnakemakeRun:
    proc: subprocess.Popen
    workdir: Path
    prefix: str
    log: Path

    def wait(self, timeout: float) -> int:
        """The exit code; on timeout, stop Snakemake and its jobs, then fail the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT first: Snakemake then cancels its SLURM jobs itself; the group kill is the fallback
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            cancel_jobs(self.prefix)
            pytest.fail(f"snakemake did not finish within {timeout:.0f} s (hung?)\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def local_cluster_profile(workdir: Path) -> Path:
    """profiles/slurm with the one change the 2-core test node needs, written under ``workdir``.

    The rule gives each training rank ``workers + 2`` CPUs (docs/slurm.md, "CPUs and memory"): a
    2-rank run would ask for 4 CPUs and never be scheduled on 2. This copy sets train_run's
    ``cpus_per_task`` to 1, the override docs/slurm.md describes for small nodes; every other key
    is the shipped profile's.
    """
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    profile["set-resources"]["train_run"]["cpus_per_task"] = 1
    out = workdir / ".profile-local-cluster"
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


def start_snakemake(workdir: Path, *args: str, profile: Path | None | str = "local-cluster",
                    snakefile: Path = REPO / "Snakefile", configfile: Path | None = None) -> SnakemakeRun:
    """Start Snakemake in ``workdir`` (non-blocking); output goes to ``workdir/snakemake.out``.

    ``profile``: a profile folder, None for none, or "local-cluster" (the default):
    :func:`local_cluster_profile`.
    """
    if profile == "local-cluster":
        profile = local_cluster_profile(workdir)
    prefix = new_prefix()
    cmd = [str(SNAKEMAKE), "-s", str(snakefile), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    if profile is not None:
        cmd += ["--profile", str(profile), "--slurm-jobname-prefix", prefix,
                # tests: notice finished jobs quickly (the plugin adds 10 s per idle poll anyway)
                "--slurm-init-seconds-before-status-checks", "2"]
    cmd += list(args)
    log = workdir / "snakemake.out"
    fh = open(log, "a")  # noqa: SIM115 -- closed with the process
    proc = subprocess.Popen(cmd, cwd=workdir, env=job_env(), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    fh.close()
    return SnakemakeRun(proc, workdir, prefix, log)


def run_snakemake(workdir: Path, *args: str, timeout: float, **kw) -> tuple[int, SnakemakeRun]:
    sm = start_snakemake(workdir, *args, **kw)
    return sm.wait(timeout), sm


def tiny_config(**run_overrides) -> dict:
    """config/tiny.yaml with its runs replaced by ``run_overrides`` (name -> settings)."""
    config = yaml.safe_load(TINY.read_text())
    if run_overrides:
        config["runs"] = run_overrides
    return config


def copy_data(src: Path, dst: Path) -> None:
    for name in ("data", "resources"):
        # copy2 + copytree's copystat keep every mtime, so Snakemake sees the outputs as up to date
        shutil.copytree(src / name, dst / name, symlinks=True, copy_function=shutil.copy2)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
