"""The pipeline's child runs: one per training or evaluation job, and later additions to a training run.

Snakemake runs each job in its own process, so MLflow's fluent notion of an "active parent" does not
exist across jobs. The parent run is created once (:func:`amorlip.tracking.pipeline.init_pipeline`,
its id kept in ``results/mlflow_parent.json``) and every child attaches through the
``mlflow.parentRunId`` tag, which is what the MLflow UI uses for nesting.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from amorlip.config import tracking_uri as config_tracking_uri
from amorlip.tracking.pipeline import read_parent
from amorlip.tracking.store import store_artifact_location
from amorlip.tracking.system_metrics import SystemMetrics
from amorlip.tracking.tags import standard_tags
from amorlip.tracking.tracker import Tracker


def training_run_name(run) -> str:
    """A training run's MLflow name: what ran, ``{method}[-{variant}]-b{global batch}-s{seed}``
    (``amorlip-published-b64-s0``), with the config's run name appended when it says more than that
    (``clip-b64-s0-baseline``). The config's name stays the tag ``amorlip.run``; lookups go by run id
    (``runs/{run}/train.json``), never by this display name."""
    variant = "" if run.variant in (None, "none") else f"-{run.variant}"
    what = f"{run.method}{variant}-b{run.batch_size}-s{run.seed}"
    return what if set(run.name.split("-")) <= set(what.split("-")) else f"{what}-{run.name}"


@contextlib.contextmanager
def child_run(config: Mapping[str, Any], name: str, kind: str, tags: Mapping[str, Any] | None = None,
              offline_path: str | os.PathLike | None = None, enabled: bool = True,
              resume_run_id: str | None = None, display_name: str | None = None,
              system_metrics: bool = False) -> Iterator[Tracker]:
    """A child of the pipeline's parent run; ends FINISHED, or FAILED when the block raises.

    ``name`` is the config's run name (tag ``amorlip.run``); the MLflow run is called
    ``display_name`` (default ``name``). ``kind`` is ``"train"`` or ``"evaluate"`` (tag
    ``amorlip.kind``). ``offline_path`` is where events go during an outage (default
    ``results/mlflow-offline/{kind}-{name}.jsonl``). ``enabled=False`` gives a tracker that does
    nothing (ranks other than 0). ``resume_run_id`` reopens that run (a resumed training job continues
    its metric history) when the store knows it. ``system_metrics`` samples the machine onto the run
    while the block runs (when ``mlflow.system_metrics`` is on, every ``system_metrics_interval_s``).
    """
    uri = config_tracking_uri(config)
    if offline_path is None:
        offline_path = Path(config["paths"]["results"]) / "mlflow-offline" / f"{kind}-{name}.jsonl"
    all_tags = {**standard_tags(kind), "amorlip.run": name, **{k: str(v) for k, v in (tags or {}).items()}}
    parent = read_parent(config) if enabled else {}
    tracker = Tracker(uri, offline_path, enabled=enabled, experiment=config["mlflow"]["experiment"],
                      run_name=display_name or name, parent_run_id=parent.get("run_id"), tags=all_tags)
    exp_id = parent.get("experiment_id") if parent.get("tracking_uri") == uri else None
    tracker.start(experiment_id=exp_id, artifact_location=store_artifact_location(uri),
                  resume_run_id=resume_run_id)
    monitor = SystemMetrics(tracker, config["mlflow"].get("system_metrics_interval_s", 10))
    if system_metrics and config["mlflow"].get("system_metrics", True):
        monitor.start()
    try:
        yield tracker
    except KeyboardInterrupt:
        monitor.stop()
        tracker.end("KILLED")
        raise
    except BaseException:
        monitor.stop()
        tracker.end(tracker.final_status or "FAILED")
        raise
    monitor.stop()
    tracker.end(tracker.final_status or "FINISHED")


def train_run_id(config: Mapping[str, Any], run: str) -> str | None:
    """The MLflow run id of training run ``run`` (from ``runs/{run}/train.json``; None without one)."""
    try:
        summary = json.loads((Path(config["paths"]["runs"]) / run / "train.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("mlflow_run_id") or None


def attach_run(config: Mapping[str, Any], run_id: str | None, offline_path: str | os.PathLike) -> Tracker | None:
    """A tracker that logs more onto an existing run (a finished training run) without ending it.

    None when ``run_id`` is empty or this store does not know it (the run was logged elsewhere);
    during an outage the tracker is offline and its events go to ``offline_path`` for replay.
    """
    if not run_id:
        return None
    tracker = Tracker(config_tracking_uri(config), offline_path, experiment=config["mlflow"]["experiment"])
    return tracker if tracker.attach(run_id) else None
