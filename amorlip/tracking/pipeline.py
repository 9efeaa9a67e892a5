"""The pipeline's parent run: created before any job (``amorlip mlflow init``), ended by the report.

It carries the resolved pipeline config (artifact ``config.yaml`` and params ``config.<key>``), and at
the end the report's figures and files (:func:`log_to_parent`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from amorlip.config import tracking_uri as config_tracking_uri
from amorlip.fileio import atomic_write_json
from amorlip.tracking.batching import flat_params, send_params
from amorlip.tracking.store import ensure_experiment, mlflow_client, store_artifact_location
from amorlip.tracking.tags import git_tags
from amorlip.tracking.tracker import Tracker

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"


def parent_run_name(config: Mapping[str, Any], now: float | None = None) -> str:
    """``{name}-{UTC date and time}-{config digest}``: unique per launch, and two launches of one
    configuration share the digest (``demo-20261206-151004-3f9a2c``)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{config['name']}-{stamp}-{digest}"


def read_parent(config: Mapping[str, Any]) -> dict:
    """``results/mlflow_parent.json`` ({} when ``amorlip mlflow init`` has not run)."""
    path = Path(config["paths"]["results"]) / PARENT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as flat params ``config.<dotted key>`` (sortable in the runs table)."""
    return flat_params({"config": json.loads(json.dumps(config, default=str))})


def init_pipeline(config: Mapping[str, Any], out: str | os.PathLike) -> dict:
    """Create the experiment and the pipeline's parent run; write its ids to ``out`` atomically.

    The parent stays RUNNING until the report ends it (:func:`log_to_parent`). When the store is
    unreachable the file still gets written (``run_id`` null, with the error) so the pipeline goes on
    and children simply carry no parent tag.
    """
    uri = config_tracking_uri(config)
    record: dict[str, Any] = {"run_id": None, "experiment_id": None, "tracking_uri": uri}
    try:
        client = mlflow_client(uri)
        exp_id = ensure_experiment(client, config["mlflow"]["experiment"], store_artifact_location(uri))
        tags = {"amorlip.kind": "pipeline", "snakemake.rule": os.environ.get("SNAKEMAKE_RULE", "mlflow_init"),
                **git_tags()}
        run = client.create_run(exp_id, tags=tags, run_name=parent_run_name(config))
        record.update(run_id=run.info.run_id, experiment_id=exp_id, run_name=run.info.run_name)
        client.log_dict(run.info.run_id, json.loads(json.dumps(config, default=str)), "config.yaml")
        send_params(client, run.info.run_id, config_params(config))
        log.info("MLflow parent run %s (experiment %s) at %s", run.info.run_id, exp_id, uri)
    except Exception as exc:  # noqa: BLE001 -- the pipeline must go on without tracking
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("MLflow unreachable at %s (%s); the pipeline runs without a parent run",
                    uri, record["error"])
    atomic_write_json(out, record)
    return record


def log_to_parent(config: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
                  artifacts: Iterable[str | os.PathLike] = (), params: Mapping[str, Any] | None = None,
                  finish: bool = True) -> str | None:
    """Log the report's metrics/artifacts/params to the parent run (and end it when ``finish``).

    Returns the parent run id (None without one). Never raises on tracking failures: events go to
    ``results/mlflow-offline/pipeline-parent.jsonl``. Without a parent in this store (init failed, or
    the URI changed) a parent is started now, with the config, so the report still lands.
    """
    parent = read_parent(config)
    uri = config_tracking_uri(config)
    offline = Path(config["paths"]["results"]) / "mlflow-offline" / "pipeline-parent.jsonl"
    tracker = Tracker(uri, offline, experiment=config["mlflow"]["experiment"],
                      run_name=parent.get("run_name") or parent_run_name(config))
    if not (parent.get("run_id") and parent.get("tracking_uri") == uri and tracker.attach(parent["run_id"])):
        tracker.tags = {"amorlip.kind": "pipeline", **git_tags()}
        tracker.start(artifact_location=store_artifact_location(uri))
        tracker.log_dict(json.loads(json.dumps(config, default=str)), "config.yaml")
        tracker.log_params(config_params(config))
    if params:
        tracker.log_params(params)
    if metrics:
        tracker.log_metrics(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path)
    if finish:
        tracker.end("FINISHED")
    return tracker.run_id
