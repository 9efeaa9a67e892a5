"""MLflow through a real tracking server, the cluster setup (docs/slurm.md "MLflow on a cluster").

On a cluster the jobs run on many nodes and SQLite on a network file system is fragile, so users
start `mlflow server` and point the pipeline at it (config `mlflow.tracking_uri`, or
MLFLOW_TRACKING_URI, which wins). This starts a real server bound to 127.0.0.1 on a free port, runs
the tracking API the rules use (parent run, train child with metrics and an artifact), and reads
everything back through MlflowClient over HTTP and the REST API. The server helper and the REST
checks of a whole pipeline's store live in tests/mlflow_rest.py (run from tests/test_pipeline_e2e.py
over the tiny pipeline's store).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from mlflow_rest import Rest
from mlflow_rest import mlflow_server as serve_mlflow

from amorlip.config import load_config, tracking_uri


def _other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one (to prove the bind is local-only)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for UDP connect
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(f"sqlite:///{root}/mlflow.db", root, artifacts=root / "artifacts") as server:
        yield server


def test_server_listens_on_loopback_only(mlflow_server):
    other = _other_address()
    if other is None:
        pytest.skip("no non-loopback address on this machine")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((other, mlflow_server["port"])) != 0, "server reachable off loopback"


def test_pipeline_tracking_through_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from amorlip.tracking import child_run, init_pipeline, log_to_parent

    url = mlflow_server["url"]
    config = load_config({"name": "server-test", "paths": {"results": str(tmp_path / "results")},
                          "mlflow": {"tracking_uri": url, "experiment": "server-test"}}, check_paths=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(config) == url  # the config's URI ...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert tracking_uri(config) == url  # ... and the environment, which wins, agree here

    parent = init_pipeline(config, out=tmp_path / "results" / "mlflow_parent.json")
    assert parent["run_id"] and parent["tracking_uri"] == url, parent

    curve = tmp_path / "curve.txt"
    curve.write_text("step,loss\n1,2.0\n2,1.5\n")
    with child_run(config, "amorlip", "train", tags={"run": "amorlip"}) as tracker:
        tracker.log_params({"batch_size": 16, "method": "amorlip"})
        for step, loss in ((1, 2.0), (2, 1.5), (3, 1.25)):
            tracker.log_metrics({"loss": loss}, step=step)
        tracker.log_artifact(curve)
        child_id = tracker.run_id
    log_to_parent(config, metrics={"mean_main": 0.5})

    client = MlflowClient(url)
    child = client.get_run(child_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent["run_id"]
    assert child.data.tags["amorlip.kind"] == "train"
    assert child.data.params["batch_size"] == "16"
    history = client.get_metric_history(child_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert [a.path for a in client.list_artifacts(child_id)] == ["curve.txt"]
    # the artifact went through the server's proxy into its --artifacts-destination
    assert list(Path(mlflow_server["root"], "artifacts").rglob("curve.txt"))

    top = client.get_run(parent["run_id"])
    assert top.data.metrics["mean_main"] == 0.5 and top.info.status == "FINISHED"
    # the same through the REST API the UI calls: the experiment opens as model training
    experiment = Rest(url).get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="server-test")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    # nothing fell back to the offline JSONL: the server took every event
    assert not list((tmp_path / "results").rglob("*.jsonl"))
