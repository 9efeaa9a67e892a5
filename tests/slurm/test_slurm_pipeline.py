"""The pipeline through `--profile profiles/slurm` on the real local SLURM cluster.

One DAG run covers the SLURM contract end to end, because every SLURM job costs seconds of
scheduling and Snakemake start-up on a 2-core machine:
- every rule after the data stage runs as a SLURM job (plugin logs + `squeue --states=all`);
- the AmorLIP run trains on 2 ranks started by `srun` (an MPI-style job), world size 2 on gloo;
- mid-training the job gets `scancel --signal=USR1` (what `--signal=USR1@T` does before a time
  limit): the ranks checkpoint and exit with the requeue code (Snakemake's job log shows exit
  status 75, not 143), Snakemake's `retries` resubmit the job, and the new job resumes from that
  checkpoint and finishes;
- the outputs are the files a local run writes (tests/test_pipeline_e2e.py checks the same ones).
A second test shows a failing job is reported as failed and Snakemake exits non-zero, not hangs.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_helpers import (
    copy_data,
    jobs_named,
    run_snakemake,
    start_snakemake,
    tiny_config,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 80 samples, batch 16 -> 5 steps per epoch; 8 epochs give the signal a window of several seconds
PREEMPT_RUN = {"method": "amorlip", "nproc": 2, "epochs": 8, "max_steps": 40, "checkpoint_every": 5}


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoints/step-*/complete"))


# the waits below (first checkpoint, the DAG, the dry run) govern, not pytest-timeout's 900 s: a
# pytest-timeout kill would leave the test's SLURM jobs running; on 2 loaded cores the DAG and the
# shared data fixture can take more than 15 minutes together
@pytest.mark.timeout(1900)
def test_tiny_dag_through_slurm_with_preemption(tmp_path: Path, slurm_tiny_data: Path) -> None:
    copy_data(slurm_tiny_data, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(amorlip=PREEMPT_RUN)))

    sm = start_snakemake(tmp_path, "all", configfile=config)
    run_dir = tmp_path / "runs" / "amorlip"

    # preempt the training once it checkpointed for the first time
    wait_for(lambda: _complete_checkpoints(run_dir) or sm.proc.poll() is not None, timeout=600,
             what="the first checkpoint of the SLURM train job")
    assert sm.proc.poll() is None, "snakemake ended before training checkpointed:\n" + sm.tail()
    train_jobs = [j for j in jobs_named(sm.prefix) if j["comment"].startswith("rule_train_run")]
    assert len(train_jobs) == 1 and train_jobs[0]["state"] == "RUNNING", train_jobs
    first_job = train_jobs[0]["id"]
    # without --batch/--full the signal goes to the job steps only: the srun'd ranks
    subprocess.run(["scancel", "--signal=USR1", first_job], check=True, timeout=30)

    code = sm.wait(timeout=900)
    assert code == 0, sm.tail()

    # every rule that had work ran as a SLURM job (the plugin keeps each job's log)
    logs = tmp_path / ".snakemake" / "slurm_logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        f"rule_{r}" for r in ("mlflow_init", "train_run", "export", "evaluate_run", "report"))
    jobs = jobs_named(sm.prefix)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(job["comment"].split("_wildcards")[0], []).append(job)
    assert set(by_rule) == {"rule_mlflow_init", "rule_train_run", "rule_export", "rule_evaluate_run",
                            "rule_report"}, jobs
    # the signalled train job stopped with the requeue code (FAILED); its retry completed
    train_states = {j["id"]: j["state"] for j in by_rule["rule_train_run"]}
    assert train_states.pop(first_job) == "FAILED", by_rule["rule_train_run"]
    # ... and the code Snakemake saw in that job is 75 from srun, not the 143/137 of a rank that
    # srun's --kill-on-bad-exit terminated while its peer left first
    failed_log = next((logs / "rule_train_run").rglob(f"{first_job}.log")).read_text()
    assert "non-zero exit status 75" in failed_log, failed_log[-4000:]
    assert not any(f"exit status {code}" in failed_log for code in (137, 143)), failed_log[-4000:]
    assert list(train_states.values()) == ["COMPLETED"], by_rule["rule_train_run"]
    assert all(j["state"] == "COMPLETED" for r, js in by_rule.items() if r != "rule_train_run" for j in js)

    # two ranks started by srun, and the retry resumed from the preemption checkpoint
    train = json.loads((run_dir / "train.json").read_text())
    assert train["world_size"] == 2, train
    # the lambda nets are one model on both ranks: the trainer compares their checksums at every
    # checkpoint (and stops on a mismatch); the agreed one is recorded
    assert train["lambda_replica_checksum"], train
    assert train["steps"] == 40, train
    assert train["resumed_from"], train
    log = (tmp_path / "logs" / "train" / "amorlip.log").read_text()
    assert "rank 1/2" in log and "via slurm" in log, log[-3000:]
    assert "resumed from" in log, log[-3000:]

    # the same files as a local run (tests/test_pipeline_e2e.py)
    assert (tmp_path / "runs/amorlip/model.pt").is_file()
    assert (tmp_path / "runs/amorlip/metrics.jsonl").is_file()
    result = json.loads((tmp_path / "results/amorlip/emoji-heldout.json").read_text())
    assert result["aggregates"]["covered"] == result["aggregates"]["total"] > 0
    with open(tmp_path / "results/summary.csv") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["amorlip"]
    assert (tmp_path / "results/summary.md").is_file()
    assert list((tmp_path / "results/plots").glob("*.png"))
    assert json.loads((tmp_path / "results/mlflow_parent.json").read_text())["run_id"]

    # and nothing is left to do
    code, again = run_snakemake(tmp_path, "-n", "all", configfile=config, timeout=300)
    assert code == 0 and "Nothing to be done" in again.tail(), again.tail()


FAILING_SNAKEFILE = """
rule all:
    input: "ok.txt", "never.txt"

rule ok:
    output: "ok.txt"
    shell: "echo ok from $SLURM_JOB_ID > {output}"

rule broken:
    output: "never.txt"
    log: "logs/broken.log"
    shell: "echo about to fail > {log}; exit 7"
"""


def test_failing_job_fails_the_run(tmp_path: Path, slurm_cluster) -> None:
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(FAILING_SNAKEFILE)
    code, sm = run_snakemake(tmp_path, "--retries", "0", "--keep-going", snakefile=snakefile, timeout=300)
    out = sm.tail()
    assert code != 0, out
    assert "Error in rule broken" in out and "FAILED" in out, out
    assert (tmp_path / "ok.txt").read_text().startswith("ok from "), out  # the other job still ran
    states = {j["comment"]: j["state"] for j in jobs_named(sm.prefix)}
    assert states == {"rule_ok": "COMPLETED", "rule_broken": "FAILED"}, states
    assert (tmp_path / "logs/broken.log").read_text().strip() == "about to fail"
