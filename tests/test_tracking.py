"""MLflow tracking against a real SQLite store, and the outage path against a closed port."""

from __future__ import annotations

import json
import socket
import time

import pytest
from mlflow import MlflowClient

from amorlip.config import load_config
from amorlip.mlflow_replay import replay
from amorlip.tracking import child_run, flatten, init_pipeline, log_to_parent


def _config(tmp_path, uri=None):
    return load_config({
        "name": "pipe-test",
        "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "mlflow": {"tracking_uri": uri, "experiment": "exp-test"},
        "runs": {"r1": {"method": "clip", "model": "amorlip-tiny"}},
    }, check_paths=False)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (./mlruns)
    monkeypatch.setenv("SNAKEMAKE_RULE", "train_run")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    yield
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_nests_with_dots():
    assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {"a": 1, "b.c": [1, 2], "b.d.e": None}


def test_parent_and_child_visible_in_sqlite_store(tmp_path):
    config = _config(tmp_path)
    parent = init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    assert json.loads((tmp_path / "results" / "mlflow_parent.json").read_text()) == parent
    assert parent["tracking_uri"] == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"

    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with child_run(config, "r1", "train", tags={"method": "clip"}) as tracker:
        tracker.log_params({"lr": 1e-3, "amorlip": {"rho": [8.5, -8.5]}})
        for step in range(3):
            tracker.log_metrics({"loss": 3.0 - step, "note": "not a number"}, step=step)
        tracker.log_artifact(artifact)
        tracker.log_dict({"a": 1}, "summary.json")
        child_id = tracker.run_id
    assert not tracker.offline

    client = MlflowClient(parent["tracking_uri"])
    run = client.get_run(child_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
    assert run.data.tags["amorlip.kind"] == "train"
    assert run.data.tags["snakemake.rule"] == "train_run"
    assert run.data.tags["slurm.job_id"] == "4242"
    assert run.data.tags["method"] == "clip"
    assert run.data.params == {"lr": "0.001", "amorlip.rho": "[8.5, -8.5]"}
    history = client.get_metric_history(child_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert sorted(a.path for a in client.list_artifacts(child_id)) == ["note.txt", "summary.json"]
    # artifacts live beside the database, not in the cwd's ./mlruns
    assert (tmp_path / "results" / "mlartifacts").is_dir()

    log_to_parent(config, metrics={"mean_main": 0.5}, artifacts=[artifact])
    prun = client.get_run(parent["run_id"])
    assert prun.data.metrics["mean_main"] == 0.5 and prun.info.status == "FINISHED"
    assert prun.info.run_name == "pipe-test"


def test_child_run_marks_failure_and_reopens(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(RuntimeError):
        with child_run(config, "r1", "train") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    client = MlflowClient(tracker.uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    # a resumed job continues the same run; an already-logged param keeps its value without error
    with child_run(config, "r1", "train", resume_run_id=tracker.run_id) as again:
        again.log_params({"lr": 1})
        again.log_params({"lr": 2})
        again.log_metrics({"loss": 0.5}, step=2)
    assert again.run_id == tracker.run_id and not again.offline
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2]
    assert client.get_run(tracker.run_id).data.params["lr"] == "1"


def test_unreachable_server_keeps_events_then_replays(tmp_path, caplog):
    dead = f"http://127.0.0.1:{_closed_port()}"
    config = _config(tmp_path, uri=dead)
    t0 = time.monotonic()
    parent = init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    assert parent["run_id"] is None and "error" in parent
    offline = tmp_path / "runs" / "r1" / "mlflow-offline.jsonl"
    artifact = tmp_path / "curve.png"
    artifact.write_bytes(b"png")
    with child_run(config, "r1", "train", offline_path=offline) as tracker:
        tracker.log_params({"lr": 0.1})
        for step in (10, 20):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.set_tags({"extra": "x"})
        tracker.log_artifact(artifact)
        tracker.log_dict({"steps": 20}, "train.json")
    assert time.monotonic() - t0 < 60, "a dead server must cost seconds, not minutes"
    assert tracker.offline and tracker.run_id is None
    warnings = [r.getMessage() for r in caplog.records if "MLflow unreachable" in r.getMessage()]
    assert len([w for w in warnings if "amorlip mlflow replay" in w]) == 1
    events = [json.loads(line) for line in offline.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "params", "metrics", "metrics", "tags", "artifact",
                                             "dict", "end"]

    store = f"sqlite:///{tmp_path / 'later.db'}"
    (run_id,) = replay(offline, tracking_uri=store)
    assert not offline.exists() and offline.with_name(offline.name + ".replayed").exists()
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["extra"] == "x" and run.data.tags["amorlip.kind"] == "train"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(10, 0.1), (20, 0.05)]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["curve.png", "train.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # beside later.db


def test_disabled_tracker_does_nothing(tmp_path):
    config = _config(tmp_path)
    with child_run(config, "r1", "train", enabled=False) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_params({"a": 1})
    assert tracker.run_id is None
    assert not (tmp_path / "results").exists()
