"""One MLflow run that survives an unreachable store: :class:`Tracker`.

**A tracking failure never kills a job.** While the store answers, calls go straight to MLflow. The
first failed call logs one warning, and from then on every event (params, metrics with their steps,
tags, artifact paths, dicts, dataset inputs, models) is appended to a local JSONL file with enough
context (tracking URI, experiment, run name, parent id, run id if one was created) for
``amorlip mlflow replay FILE`` (:func:`amorlip.tracking.replay.replay`) to send it later. Trackers
are meant for rank 0 only; other ranks get a disabled tracker (``enabled=False``) whose methods do
nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.tracking.batching import (
    flat_params,
    numeric_metrics,
    param_value,
    send_metrics,
    send_params,
    send_tags,
)
from amorlip.tracking.datasets import send_dataset
from amorlip.tracking.logged_models import send_logged_model
from amorlip.tracking.store import ensure_experiment, mlflow_client

log = logging.getLogger(__name__)


class Tracker:
    """One MLflow run; every method is safe to call whatever the state of the tracking server.

    Connect it with :meth:`start` (a new run, or reopen one) or :meth:`attach` (log more onto an
    existing run without ending it).
    """

    def __init__(self, uri: str, offline_path: str | os.PathLike, *, enabled: bool = True,
                 experiment: str | None = None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        self.uri = uri
        self.offline_path = Path(offline_path)
        self.enabled = enabled
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self._run_id = run_id
        self._client = None
        self.offline = False
        # a caller may override how the run ends (e.g. "KILLED" after a preemption checkpoint)
        self.final_status: str | None = None

    # -- lifecycle

    def start(self, experiment_id: str | None = None, artifact_location: str | None = None,
              resume_run_id: str | None = None) -> Tracker:
        """Create (or reopen ``resume_run_id``) the run; on failure go offline."""
        if not self.enabled:
            return self
        try:
            self._client = mlflow_client(self.uri)
            if resume_run_id and self._reopen(resume_run_id):
                return self
            if experiment_id is None:
                experiment_id = ensure_experiment(self._client, self.experiment, artifact_location)
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self._client.create_run(experiment_id, tags=tags, run_name=self.run_name)
            self._run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001 -- tracking must never kill the job
            self.go_offline(exc)
        return self

    def attach(self, run_id: str) -> bool:
        """Log onto the existing run ``run_id`` (left in its state: :meth:`end` is the caller's choice).

        False when the store answers that it does not know ``run_id`` (the run was logged elsewhere:
        nothing should be logged); True otherwise, offline when the store cannot be reached.
        """
        self._run_id = run_id
        if not self.enabled:
            return True
        try:
            self._client = mlflow_client(self.uri)
            self._client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 -- tracking must never kill the job
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                log.warning("MLflow run %s is not in %s; nothing logged onto it", run_id, self.uri)
                return False
            self.go_offline(exc)
        return True

    def _reopen(self, run_id: str) -> bool:
        try:
            self._client.get_run(run_id)
        except Exception:  # noqa: BLE001 -- an unknown id: start a fresh run instead
            return False
        self._client.update_run(run_id, status="RUNNING")
        self._run_id = run_id
        return True

    def end(self, status: str = "FINISHED") -> None:
        self._call("end", {"status": status},
                   lambda: self._client.set_terminated(self._run_id, status=status))

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params; a key already logged keeps its first value (MLflow params are immutable)."""
        flat = flat_params(params)
        if flat:
            self._call("params", {"params": flat}, lambda: send_params(self._client, self._run_id, flat))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric entries of ``metrics`` at ``step`` (non-numeric values are dropped)."""
        values = numeric_metrics(metrics)
        if not values:
            return
        timestamp = int(time.time() * 1000)
        self._call("metrics", {"metrics": values, "step": step, "timestamp": timestamp},
                   lambda: send_metrics(self._client, self._run_id, values, step, timestamp))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {k: str(v) for k, v in tags.items()}
        self._call("tags", {"tags": values}, lambda: send_tags(self._client, self._run_id, values))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = str(Path(path).resolve())
        self._call("artifact", {"path": path, "artifact_path": artifact_path},
                   lambda: self._client.log_artifact(self._run_id, path, artifact_path))

    def log_dataset(self, name: str, digest: str, source_type: str, source: str, profile: str | None = None,
                    context: str = "train") -> None:
        """A dataset input of the run (MLflow's Dataset column; ``mlflow.data.context`` = ``context``)."""
        payload = {"name": name, "digest": digest, "source_type": source_type, "source": source,
                   "profile": profile, "context": context}
        self._call("input", payload, lambda: send_dataset(self._client, self._run_id, payload))

    def log_model(self, path: str | os.PathLike, name: str, step: int = 0,
                  params: Mapping[str, Any] | None = None, open_clip_config: Mapping[str, Any] | None = None,
                  register_as: str | None = None) -> None:
        """``path`` as an MLflow logged model of this run (the run's Models column), with the open_clip
        config that rebuilds it (:mod:`amorlip.tracking.logged_models`), registered as a new version
        of ``register_as`` when given."""
        payload = {"path": str(Path(path).resolve()), "name": name, "step": int(step),
                   "params": {k: param_value(v) for k, v in (params or {}).items()},
                   "open_clip_config": None if open_clip_config is None else dict(open_clip_config),
                   "register_as": register_as}
        self._call("model", payload, lambda: send_logged_model(self._client, self._run_id, payload))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._call("dict", {"obj": obj, "artifact_file": artifact_file},
                   lambda: self._client.log_dict(self._run_id, obj, artifact_file))

    # -- the failure path

    def _call(self, kind: str, payload: dict, send) -> None:
        if not self.enabled:
            return
        if not self.offline:
            try:
                send()
                return
            except Exception as exc:  # noqa: BLE001 -- tracking must never kill the job
                self.go_offline(exc)
        self._write({"event": kind, **payload})

    def go_offline(self, exc: BaseException) -> None:
        """Warn once and keep every later event in ``offline_path`` (a ``start`` event first)."""
        self.offline = True
        log.warning("MLflow unreachable at %s: %s: %s; metrics kept in %s; replay later with "
                    "`amorlip mlflow replay %s`", self.uri, type(exc).__name__, str(exc).splitlines()[0][:200]
                    if str(exc) else "", self.offline_path, self.offline_path)
        self._write({"event": "start", "tracking_uri": self.uri, "experiment": self.experiment,
                     "run_name": self.run_name, "parent_run_id": self.parent_run_id,
                     "run_id": self._run_id, "tags": self.tags, "time": time.time()})

    def _write(self, event: dict) -> None:
        try:
            self.offline_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.offline_path, "a") as fh:
                fh.write(json.dumps(event, default=str) + "\n")
                fh.flush()
        except OSError as exc:  # the local record is best effort too; training goes on
            log.error("cannot write the MLflow offline record %s: %s", self.offline_path, exc)
