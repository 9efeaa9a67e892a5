"""``amorlip mlflow replay``: send a job's offline tracking record to MLflow after an outage.

Kept apart from :mod:`amorlip.tracking.tracker` because it runs at a different time and for a
different reader: the tracker writes the JSONL record while training must not be disturbed; replay
runs later, by hand, and must fail loudly (the user is there to see it) and leave the record in place
if so. Params, metrics and tags go through the same batching as the live tracker
(:mod:`amorlip.tracking.batching`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from amorlip.tracking.batching import send_metrics, send_params, send_tags
from amorlip.tracking.datasets import send_dataset
from amorlip.tracking.logged_models import send_logged_model
from amorlip.tracking.store import ensure_experiment, mlflow_client, store_artifact_location

log = logging.getLogger(__name__)


def _open_session(client, uri: str, ev: dict, path: Path) -> str:
    """The run a ``start`` event's events go to: the recorded one when this store knows it, else a
    new run in the recorded experiment, under the recorded parent when that parent is here."""
    run_id = ev.get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 -- not in this store
            pass
    exp_id = ensure_experiment(client, ev.get("experiment") or "amorlip", store_artifact_location(uri))
    tags = dict(ev.get("tags") or {})
    parent = ev.get("parent_run_id")
    if parent:
        try:
            client.get_run(parent)
            tags["mlflow.parentRunId"] = parent
        except Exception:  # noqa: BLE001 -- the parent lives in another store
            tags["amorlip.original_parent_run_id"] = parent
    tags["amorlip.replayed_from"] = str(path.resolve())
    return client.create_run(exp_id, tags=tags, run_name=ev.get("run_name")).info.run_id


def replay(path: str | os.PathLike, tracking_uri: str | None = None) -> list[str]:
    """Send the events kept in an offline JSONL file; rename it to ``.replayed``.

    Each ``start`` event opens a session (:func:`_open_session`). Returns the run ids written to.
    Raises on failure (the user is there to see it), leaving the file in place.
    """
    path = Path(path)
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client = None
    run_id = None
    written: list[str] = []
    for ev in events:
        kind = ev["event"]
        if kind == "start":
            uri = tracking_uri or ev["tracking_uri"]
            client = mlflow_client(uri)
            run_id = _open_session(client, uri, ev, path)
            written.append(run_id)
            continue
        if client is None or run_id is None:
            raise ValueError(f"{path}: event {kind!r} before any 'start' event; not an amorlip offline record")
        if kind == "params":
            send_params(client, run_id, ev["params"])
        elif kind == "metrics":
            send_metrics(client, run_id, ev["metrics"], ev.get("step"), ev.get("timestamp"))
        elif kind == "tags":
            send_tags(client, run_id, ev["tags"])
        elif kind == "artifact":
            if Path(ev["path"]).exists():
                client.log_artifact(run_id, ev["path"], ev.get("artifact_path"))
            else:
                log.warning("replay: artifact %s no longer exists; skipped", ev["path"])
        elif kind == "dict":
            client.log_dict(run_id, ev["obj"], ev["artifact_file"])
        elif kind == "input":
            send_dataset(client, run_id, ev)
        elif kind == "model":
            if Path(ev["path"]).exists():
                send_logged_model(client, run_id, ev)
            else:
                log.warning("replay: model file %s no longer exists; skipped", ev["path"])
        elif kind == "end":
            client.set_terminated(run_id, status=ev.get("status", "FINISHED"))
        else:
            raise ValueError(f"{path}: unknown event {kind!r}; not an amorlip offline record (or a newer one)")
    done = path.with_name(path.name + ".replayed")
    os.replace(path, done)
    log.info("replayed %d events into run(s) %s; %s -> %s", len(events), ", ".join(dict.fromkeys(written)),
             path, done)
    return list(dict.fromkeys(written))
