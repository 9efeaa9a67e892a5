"""Inputs that change under an existing pipeline: Snakemake must rerun what they feed, and only that.

Two files the config names by path only: a url list (its content changes, its path does not) and the
DataComp eval sets (downloaded after a first evaluation). Before, editing the list gave "Nothing to be
done" and the old sample count, and a set added later was never evaluated (the summary stayed at 0
of 38 tasks). The real Snakefile runs the real `source` and `evaluate_run` jobs once, so Snakemake
records their params; the later plans are dry runs. The stages between them (download, index,
train, export) are stood in for by their output files, which is all a plan looks at. Each Snakemake
process costs ~10 s of CPU (it validates the config, which imports open_clip): four in all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from .conftest import BIN, REPO, child_env


def _snakemake(workdir: Path, *targets: str, dry: bool = False) -> str:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "1", *(["-n"] if dry else []), *targets]
    proc = subprocess.run(cmd, cwd=workdir, env=child_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


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


def _stand_in_for_training(root: Path) -> None:
    """The outputs of download, index, train and export (a real tiny model.pt)."""
    from amorlip.model_file import FORMAT
    from amorlip.models import create_model, model_config

    (root / "data" / "web" / "shards").mkdir(parents=True)
    for name in ("sizes.json", "manifest.json"):
        (root / "data" / "web" / name).write_text("{}")
    (root / "runs" / "clip").mkdir(parents=True)
    (root / "runs" / "clip" / "train.json").write_text("{}")
    model, _, _ = create_model("amorlip-tiny")
    torch.save({"format": FORMAT, "model_name": "amorlip-tiny", "model_config": model_config("amorlip-tiny"),
                "model_kwargs": {}, "state_dict": model.state_dict(), "run": {"method": "clip"},
                "lambda_nets": None, "step": 1}, root / "runs" / "clip" / "model.pt")


def test_edited_url_list_and_added_datacomp_set_rerun_their_jobs(tmp_path, mlflow_template_db):
    from amorlip.config import load_config
    from amorlip.evaluate.suites import datacomp_folder_name
    from amorlip.tracking import init_pipeline
    from tests.test_evaluate import write_classification_set

    t0 = time.monotonic()
    url_list = tmp_path / "list.tsv"
    url_list.write_text("url\tcaption\nhttp://127.0.0.1:9/a.jpg\ta dog\nhttp://127.0.0.1:9/b.jpg\ta cat\n")
    shutil.copy(mlflow_template_db, tmp_path / "mlflow.db")
    (tmp_path / "datacomp").mkdir()
    config = {
        "name": "stale", "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "stale"},
        "datasets": {"web": {"source": "url_list", "url_list": str(url_list)}},
        "defaults": {"dataset": "web", "model": "amorlip-tiny", "batch_size": 2, "workers": 0},
        "runs": {"clip": {"method": "clip"}},
        "evaluation": {"suites": ["datacomp"], "datacomp_root": str(tmp_path / "datacomp")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    urls = str(tmp_path / "resources" / "web" / "urls.parquet")
    result = str(tmp_path / "results" / "clip" / "datacomp.json")

    # the real source and evaluate_run jobs, in one invocation; the stages between them are files
    init_pipeline(load_config(tmp_path / "config.yaml"), out=tmp_path / "results" / "mlflow_parent.json")
    _stand_in_for_training(tmp_path)
    _snakemake(tmp_path, urls, result, "--allowed-rules", "source", "evaluate_run")
    assert len(pd.read_parquet(urls)) == 2
    assert json.loads(Path(result).read_text())["aggregates"]["covered"] == 0
    # the modification times the real stages would have left, in DAG order, all before the result
    base = Path(result).stat().st_mtime - 100
    chain_files = [tmp_path / "results" / "mlflow_parent.json", urls,
                   *(tmp_path / "data" / "web" / n for n in ("shards", "sizes.json", "manifest.json")),
                   tmp_path / "runs" / "clip" / "train.json", tmp_path / "runs" / "clip" / "model.pt"]
    for i, path in enumerate(chain_files):
        os.utime(path, (base + i, base + i))

    # up to date; a touch (or a copy) of the list without a change in content reruns nothing
    os.utime(url_list)
    assert "Nothing to be done" in _snakemake(tmp_path, urls, result, dry=True)

    # a DataComp set downloaded after the first evaluation: that evaluation reruns, nothing else
    write_classification_set(tmp_path / "datacomp" / datacomp_folder_name("cifar10"), [0, 1, 2, 3])
    assert _job_counts(_snakemake(tmp_path, result, dry=True)) == {"evaluate_run": 1}

    # rows appended to the list (its mtime even set back to before urls.parquet): the dataset rebuilds,
    # and everything it feeds
    with open(url_list, "a") as fh:
        fh.write("http://127.0.0.1:9/c.jpg\ta bird\n")
    os.utime(url_list, (base - 3600, base - 3600))
    chain = ("source", "download", "index", "train_run", "export", "evaluate_run")
    plan = _job_counts(_snakemake(tmp_path, result, dry=True))
    assert {k: plan.get(k) for k in chain} == dict.fromkeys(chain, 1), plan
    print(f"\nstale-input plans checked in {time.monotonic() - t0:.1f} s")
