"""The tags every run carries: what kind of job, which Snakemake rule, which commit, which SLURM job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The source tree's commit (None outside a git checkout; never raises)."""
    try:
        res = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """The commit under our key and MLflow's own (the UI's Source column); empty outside a checkout."""
    commit = git_commit()
    return {"git.commit": commit, "mlflow.source.git.commit": commit} if commit else {}


def standard_tags(kind: str) -> dict[str, str]:
    """Tags of every run: job kind (``amorlip.kind``), Snakemake rule, git commit, SLURM job id."""
    tags = {"amorlip.kind": kind, "snakemake.rule": os.environ.get("SNAKEMAKE_RULE", kind), **git_tags()}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
