"""The MLflow store: a client with a short retry policy, where artifacts go, the experiment.

Everything goes through an explicit :class:`mlflow.MlflowClient` (never the fluent API), so several
runs in one process never share global state.
"""

from __future__ import annotations

import os
from pathlib import Path

# The experiment kind MLflow's UI reads (tag ``mlflow.experimentKind``): without it the UI guesses and
# may open the GenAI/Traces view; this one opens the runs table of a model-training experiment.
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "AmorLIP reproduction: contrastive language-image pretraining with amortized partition-function "
    "estimation, compared with CLIP/SigLIP baselines. One parent run per pipeline (tag "
    "`amorlip.kind = pipeline`, resolved config in `config.yaml`); its children are the training runs "
    "(`amorlip.kind = train`, named method-variant-batch-seed: params, per-step losses, system metrics, "
    "zero-shot results as `eval/<suite>/<task>` in percent, the exported model as a logged model) and "
    "the evaluation runs (`amorlip.kind = evaluate`, linked to their training run by the tag "
    "`amorlip.train_run_id`)."
)

# A dead tracking server must cost seconds, not the minutes of MLflow's default retry policy.
HTTP_RETRY_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def configure_http_retries() -> None:
    """Set :data:`HTTP_RETRY_POLICY` unless the user set those variables. MLflow reads them at request
    time, so calling this before the first request (:func:`mlflow_client` does) is enough."""
    for key, value in HTTP_RETRY_POLICY.items():
        os.environ.setdefault(key, value)


def mlflow_client(uri: str):
    """A client for ``uri`` (the SQLite file's folder created first: MLflow does not create it)."""
    from mlflow import MlflowClient

    configure_http_retries()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def store_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (``mlartifacts/``), not into ``./mlruns``
    of whatever the working directory is; a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


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
