"""MLflow tracking: one parent run per pipeline, one child run per train / evaluate job.

Why a wrapper rather than ``mlflow.start_run``: Snakemake runs each job in its own process, so the
fluent API's notion of an "active parent" does not exist across jobs. The parent run is created
once by ``amorlip mlflow init`` (its id is kept in ``results/mlflow_parent.json``) and every child
attaches through the ``mlflow.parentRunId`` tag, which is what the MLflow UI uses for nesting.
Everything goes through an explicit :class:`mlflow.MlflowClient`, so several runs in one process
never share global state.

The second reason is robustness: **a tracking failure never kills a job**. The first failed call
logs one warning, and from then on every event (params, metrics with their steps, tags, artifact
paths, dicts) is appended to a local JSONL file; ``amorlip mlflow replay FILE`` sends it later
(:func:`amorlip.mlflow_replay.replay`). Trackers are meant for rank 0 only; other ranks get a disabled tracker
(``child_run(..., enabled=False)``) whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# A dead tracking server must cost seconds, not the minutes of MLflow's default retry policy (these
# are read lazily by MLflow at request time, so setting them here is enough; the user may override).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from amorlip.config import tracking_uri as config_tracking_uri  # noqa: E402
from amorlip.fileio import atomic_write_json

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
# MLflow's log_batch limits per request (params and tags: 100; metrics: 1000).
BATCH_PARAMS = 100
_BATCH_METRICS = 1000
_MAX_PARAM_CHARS = 6000


# --------------------------------------------------------------------------- small helpers


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"amorlip": {"rho": [..]}}`` -> ``{"amorlip.rho": [..]}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=name + "."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text[:_MAX_PARAM_CHARS]


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


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        # MLflow does not create the folder of a SQLite file.
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def store_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (``mlartifacts/``), not into ``./mlruns``
    of whatever the working directory is; a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


# The experiment kind MLflow's UI reads (tag ``mlflow.experimentKind``): without it the UI guesses and
# may open the GenAI/Traces view; this one opens the runs table of a model-training experiment.
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "AmorLIP reproduction: contrastive language-image pretraining with amortized partition-function "
    "estimation, compared with CLIP/SigLIP baselines. One parent run per pipeline (tag "
    "`amorlip.kind = pipeline`); its children are the training runs (`amorlip.kind = train`: params, "
    "per-step losses, zero-shot results as `eval/<suite>/<task>` in percent) and the evaluation runs "
    "(`amorlip.kind = evaluate`, linked to their training run by the tag `amorlip.train_run_id`)."
)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created when missing; tagged with its kind and description when unset."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location)
        except Exception:
            # another job created it between our lookup and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    tags = exp.tags if exp is not None else {}
    if "mlflow.experimentKind" not in tags:
        client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    if "mlflow.note.content" not in tags:  # a description set by a person is kept
        client.set_experiment_tag(exp_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
    return exp_id


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


def git_tags() -> dict[str, str]:
    """The commit tags of every run (ours and MLflow's own key); empty outside a git checkout."""
    commit = git_commit()
    return {"git.commit": commit, "mlflow.source.git.commit": commit} if commit else {}


def standard_tags(kind: str) -> dict[str, str]:
    """Tags every child run carries: job kind, Snakemake rule, git commit, SLURM job id."""
    tags = {"amorlip.kind": kind, "snakemake.rule": os.environ.get("SNAKEMAKE_RULE", kind), **git_tags()}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def send_dataset(client, run_id: str, payload: Mapping[str, Any]) -> None:
    """Log one dataset input (``payload`` as :meth:`Tracker.log_dataset` records it) to ``run_id``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(payload["name"], payload["digest"], payload["source_type"], payload["source"],
                      profile=payload.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset, tags=[InputTag("mlflow.data.context", payload.get("context") or "train")])])


def send_logged_model(client, run_id: str, payload: Mapping[str, Any]) -> str:
    """Create a logged model from one file (``payload`` as :meth:`Tracker.log_model` records it), as an
    output of ``run_id`` at ``step``, and mark it READY; returns the model id."""
    import shutil
    import tempfile

    from mlflow.entities import LoggedModelOutput

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=payload["name"], source_run_id=run_id,
                                       params=payload.get("params") or None)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / Path(payload["path"]).name
        try:
            os.link(payload["path"], dst)  # no copy of a large file when the filesystem allows
        except OSError:
            shutil.copy2(payload["path"], dst)
        client.log_model_artifacts(model.model_id, tmp)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, payload.get("step") or 0)])
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def manifest_dataset(config: Mapping[str, Any], dataset: str) -> dict[str, Any] | None:
    """``data/{dataset}/manifest.json`` as an MLflow dataset input: name, digest (the manifest's sha256,
    cut to MLflow's 36 characters), source (the url list, else the data folder) and a profile with
    the counts and the full digests. None when the manifest is missing or unreadable."""
    from amorlip.provenance import file_sha256

    data_dir = Path(config["paths"]["data"]) / dataset
    manifest_path = data_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    sha = file_sha256(manifest_path)
    ds = (config.get("datasets") or {}).get(dataset) or {}
    url_list = ds.get("url_list") if ds.get("source") == "url_list" else None
    where = str(url_list) if url_list else str(data_dir.resolve())
    if where.startswith(("http://", "https://")):
        source_type, source = "http", json.dumps({"url": where})
    else:
        source_type, source = "local", json.dumps({"uri": where})
    profile = {"num_rows": manifest.get("samples"), "shards": manifest.get("shards"),
               "urls": manifest.get("urls"), "failed": manifest.get("failed"),
               "image_size": manifest.get("image_size"), "manifest_sha256": sha,
               "samples_sha256": manifest.get("samples_sha256"), "manifest": str(manifest_path.resolve())}
    return {"name": dataset, "digest": sha[:36], "source_type": source_type, "source": source,
            "profile": json.dumps(profile)}


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run; every method is safe to call whatever the state of the tracking server.

    While the server answers, calls go straight to MLflow. After the first failure the tracker is
    *offline*: events are appended (and flushed) to ``offline_path`` in order, with enough context
    (tracking URI, experiment, run name, parent id, run id if one was created) for :func:`replay`.
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
            self._go_offline(exc)
        return self

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
        flat = {k: _param_value(v) for k, v in flatten(params).items()}
        if not flat:
            return

        def send():
            from mlflow.entities import Param

            existing = self._client.get_run(self._run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            if changed:
                log.warning("MLflow params already logged with other values, kept as they were: %s",
                            ", ".join(changed[:10]))
            new = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), BATCH_PARAMS):
                self._client.log_batch(self._run_id, params=new[i:i + BATCH_PARAMS])

        self._call("params", {"params": flat}, send)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric entries of ``metrics`` at ``step`` (non-numeric values are dropped)."""
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        timestamp = int(time.time() * 1000)

        def send():
            from mlflow.entities import Metric

            items = [Metric(k, v, timestamp, step or 0) for k, v in values.items()]
            for i in range(0, len(items), _BATCH_METRICS):
                self._client.log_batch(self._run_id, metrics=items[i:i + _BATCH_METRICS])

        self._call("metrics", {"metrics": values, "step": step, "timestamp": timestamp}, send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {k: str(v) for k, v in tags.items()}

        def send():
            from mlflow.entities import RunTag

            items = [RunTag(k, v) for k, v in values.items()]
            for i in range(0, len(items), BATCH_PARAMS):
                self._client.log_batch(self._run_id, tags=items[i:i + BATCH_PARAMS])

        self._call("tags", {"tags": values}, send)

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
                  params: Mapping[str, Any] | None = None) -> None:
        """``path`` (one file) as an MLflow logged model of this run (the run's Models column)."""
        payload = {"path": str(Path(path).resolve()), "name": name, "step": int(step),
                   "params": {k: _param_value(v) for k, v in (params or {}).items()}}
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
                self._go_offline(exc)
        self._write({"event": kind, **payload})

    def _go_offline(self, exc: BaseException) -> None:
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


@contextlib.contextmanager
def child_run(config: Mapping[str, Any], name: str, kind: str, tags: Mapping[str, Any] | None = None,
              offline_path: str | os.PathLike | None = None, enabled: bool = True,
              resume_run_id: str | None = None) -> Iterator[Tracker]:
    """A child of the pipeline's parent run; ends FINISHED, or FAILED when the block raises.

    ``kind`` is ``"train"`` or ``"evaluate"`` (tag ``amorlip.kind``). ``offline_path`` is where events
    go during an outage (default ``results/mlflow-offline/{kind}-{name}.jsonl``). ``enabled=False``
    gives a tracker that does nothing (ranks other than 0). ``resume_run_id`` reopens that run (a
    resumed training job continues its metric history) when the store knows it.
    """
    uri = config_tracking_uri(config)
    if offline_path is None:
        offline_path = Path(config["paths"]["results"]) / "mlflow-offline" / f"{kind}-{name}.jsonl"
    all_tags = {**standard_tags(kind), **{k: str(v) for k, v in (tags or {}).items()}}
    parent = read_parent(config) if enabled else {}
    tracker = Tracker(uri, offline_path, enabled=enabled, experiment=config["mlflow"]["experiment"],
                      run_name=name, parent_run_id=parent.get("run_id"), tags=all_tags)
    exp_id = parent.get("experiment_id") if parent.get("tracking_uri") == uri else None
    tracker.start(experiment_id=exp_id, artifact_location=store_artifact_location(uri),
                  resume_run_id=resume_run_id)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end(tracker.final_status or "FAILED")
        raise
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
    uri = config_tracking_uri(config)
    tracker = Tracker(uri, offline_path, experiment=config["mlflow"]["experiment"], run_id=run_id)
    try:
        tracker._client = mlflow_client(uri)
        tracker._client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 -- tracking must never kill the job
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            log.warning("MLflow run %s is not in %s; nothing logged onto it", run_id, uri)
            return None
        tracker._go_offline(exc)
    return tracker


# --------------------------------------------------------------------------- the pipeline parent


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
    ``results/mlflow-offline/pipeline-parent.jsonl``.
    """
    parent = read_parent(config)
    uri = config_tracking_uri(config)
    offline = Path(config["paths"]["results"]) / "mlflow-offline" / "pipeline-parent.jsonl"
    tracker = Tracker(uri, offline, experiment=config["mlflow"]["experiment"],
                      run_name=parent.get("run_name") or parent_run_name(config), run_id=parent.get("run_id"))
    if not parent.get("run_id") or parent.get("tracking_uri") != uri:
        # no parent in this store (init failed, or the URI changed): start one now so the report lands
        tracker.start(artifact_location=store_artifact_location(uri))
    else:
        try:
            tracker._client = mlflow_client(uri)
        except Exception as exc:  # noqa: BLE001
            tracker._go_offline(exc)
    if params:
        tracker.log_params(params)
    if metrics:
        tracker.log_metrics(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path)
    if finish:
        tracker.end("FINISHED")
    return tracker.run_id
