"""The whole DAG on a tiny config: source -> img2dataset -> index -> train -> export -> evaluate -> report.

Runs the real Snakemake, the real `amorlip` commands (img2dataset against the loopback server,
DeepSpeed on gloo, clip_benchmark, MLflow on SQLite) in a scratch working directory, then checks
the file contracts of docs/architecture.md and the MLflow parent/child structure.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from mlflow_rest import check_researcher_view, chromium, mlflow_server, runs_page_dom
from tinydata import copy_tiny_data, tiny_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

def _snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="")
    env.pop("MLFLOW_TRACKING_URI")
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def _e2e_config() -> dict:
    """config/tiny.yaml's CLIP and AmorLIP runs plus a FastCLIP-v3 run (the same rules, its own row)."""
    config = tiny_config()
    config["runs"]["fastclip"] = {"method": "fastclip"}
    return config


RUNS = ["amorlip", "clip", "fastclip"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the pipeline, then an MLflow server, a headless browser and the report over it
def test_tiny_pipeline_end_to_end(tmp_path: Path, tiny_data: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_e2e_config()))
    copy_tiny_data(tiny_data, tmp_path)
    proc = _snakemake(tmp_path, "all")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    manifest = json.loads((tmp_path / "data/emoji-tiny/manifest.json").read_text())
    sizes = json.loads((tmp_path / "data/emoji-tiny/sizes.json").read_text())
    assert manifest["samples"] == sum(sizes.values()) > 0
    assert manifest["failed"] == 0

    for run in RUNS:
        assert (tmp_path / f"runs/{run}/model.pt").exists()
        train = json.loads((tmp_path / f"runs/{run}/train.json").read_text())
        assert train["steps"] == tiny_config()["defaults"]["max_steps"]
        result = json.loads((tmp_path / f"results/{run}/emoji-heldout.json").read_text())
        assert result["aggregates"]["covered"] == result["aggregates"]["total"] == 3

    with open(tmp_path / "results/summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run"] for r in rows) == RUNS
    assert {r["run"]: (r["method"], r["variant"]) for r in rows}["fastclip"] == ("fastclip", "v3")
    assert (tmp_path / "results/summary.md").exists()
    assert list((tmp_path / "results/plots").glob("*.png"))

    from mlflow.tracking import MlflowClient

    parent = json.loads((tmp_path / "results/mlflow_parent.json").read_text())
    client = MlflowClient(parent["tracking_uri"])
    children = client.search_runs(
        [parent["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'"
    )
    kinds = sorted(c.data.tags.get("amorlip.kind", "?") for c in children)
    assert kinds == ["evaluate"] * 3 + ["train"] * 3, kinds

    # everything is up to date: a second invocation schedules nothing
    again = _snakemake(tmp_path, "-n", "all", timeout=300)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr

    # what a researcher browses: the MLflow UI's REST API over the pipeline's store, the runs page in a
    # real browser, and the Snakemake report
    with mlflow_server(f"sqlite:///{tmp_path}/results/mlflow.db", tmp_path, artifacts=tmp_path / "served") as server:
        training = check_researcher_view(server["url"], parent, tmp_path / "runs", tmp_path / "results",
                                         ["emoji-heldout"])
        assert sorted(training) == RUNS
        if chromium():
            dom = runs_page_dom(server["url"], parent["experiment_id"], tmp_path)
            assert parent["run_name"] in dom, dom[-2000:]  # the runs table, with the pipeline's parent run
    _check_snakemake_report(tmp_path, runs=RUNS)

    # editing the config reruns only what the edit touches: a new run trains alone (no download, no
    # retraining of the others), and a changed lr retrains that one run
    config = _e2e_config()
    config["runs"]["clip-s1"] = {"method": "clip", "seed": 1}
    config["runs"]["amorlip"]["lr"] = 0.000777
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    plan = _snakemake(tmp_path, "-n", "all", timeout=300)
    assert plan.returncode == 0, plan.stdout[-4000:] + plan.stderr[-4000:]
    out = plan.stdout + plan.stderr
    assert _job_counts(out) == {"train_run": 2, "export": 2, "evaluate_run": 2, "report": 1, "all": 1}, out[-3000:]
    scheduled = {line.split("run=")[1].split(",")[0].strip() for line in out.splitlines() if "wildcards: run=" in line}
    assert scheduled == {"clip-s1", "amorlip"}, out[-3000:]


# a phrase of the workflow description (workflow/report/workflow.rst) and of each caption
CAPTIONS = ["contrastive image-text pre-training compared", "One row per run: method, variant",
            "The results table in words", "A comparison across the runs of this pipeline", "Training curves of run"]


def _check_snakemake_report(workdir: Path, runs: list[str]) -> None:
    """`snakemake --report report.zip` holds the workflow description, every caption and every plot:
    each run's loss curves and each comparison plot in results/plots (compared by content)."""
    proc = _snakemake(workdir, "--report", "report.zip", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with zipfile.ZipFile(workdir / "report.zip") as zf:
        blobs = {name: zf.read(name) for name in zf.namelist() if not name.endswith("/")}
    text = " ".join("\n".join(b.decode("utf-8", "replace") for n, b in blobs.items()
                              if n.endswith((".html", ".js", ".json", ".rst"))).replace("\\n", " ").split())
    for phrase in CAPTIONS:
        assert phrase in text, f"{phrase!r} not in the report"
    pngs = set(blobs.values())
    expected = [workdir / f"runs/{run}/loss_curves.png" for run in runs] + sorted((workdir / "results/plots").glob("*.png"))
    missing = [str(p.relative_to(workdir)) for p in expected if p.read_bytes() not in pngs]
    assert not missing, f"not in the report: {missing}"


def _job_counts(out: str) -> dict[str, int]:
    """Snakemake's dry-run "job  count" table as a dict (the `total` line left out)."""
    counts, in_table = {}, False
    for line in out.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_snakemake_two_rank_run_trains_on_the_global_batch(tmp_path: Path, tiny_data: Path) -> None:
    """`snakemake train` of a 2-rank run (the train rule runs `amorlip launch --nproc 2`): its first
    logged CLIP loss tracks the 1-rank run at the same global batch (16), not a run at half of it (8),
    as per-rank negatives would. (2-rank AmorLIP runs, lambda-net replicas included: through the CLI
    in tests/test_train.py, through Snakemake on SLURM in tests/slurm/test_slurm_pipeline.py.)"""
    config = tiny_config()
    config["defaults"].update(max_steps=3, log_every=1, checkpoint_every=2)
    config["runs"] = {"clip": {"method": "clip"}, "clip-b8": {"method": "clip", "batch_size": 8},
                      "clip-2r": {"method": "clip", "nproc": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    copy_tiny_data(tiny_data, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "train"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    def first(run: str, key: str) -> dict:
        records = [json.loads(line) for line in (tmp_path / f"runs/{run}/metrics.jsonl").read_text().splitlines()]
        return records[0] | {"value": records[0][key]}

    one, half, two = first("clip", "clip_loss"), first("clip-b8", "clip_loss"), first("clip-2r", "clip_loss")
    assert two["global_batch"] == one["global_batch"] == 16 and two["world_size"] == 2
    assert abs(two["value"] - one["value"]) < abs(two["value"] - half["value"]), (one, half, two)
    summary = json.loads((tmp_path / "runs/clip-2r/train.json").read_text())
    assert summary["world_size"] == 2 and summary["local_batch_size"] == 8 and summary["batch_size"] == 16
    assert summary["steps"] == 3 and summary["complete"]
