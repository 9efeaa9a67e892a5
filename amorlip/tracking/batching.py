"""Params, metrics and tags in the batches MLflow accepts, shared by the live tracker and the replay.

MLflow's ``log_batch`` takes at most 100 params or tags and 1000 metrics per request, and a param,
once logged, cannot change: a key already on the run keeps its first value (a resumed job, or a
replay of events that partly reached the store, logs the same keys again).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

BATCH_PARAMS = 100
BATCH_METRICS = 1000
MAX_PARAM_CHARS = 6000


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


def param_value(value: Any) -> str:
    """A param's text: lists as JSON, cut to the length MLflow stores."""
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text[:MAX_PARAM_CHARS]


def flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested params as MLflow's flat ``{key: text}``."""
    return {k: param_value(v) for k, v in flatten(params).items()}


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (text and booleans dropped)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def send_params(client, run_id: str, params: Mapping[str, str]) -> None:
    """Log the keys the run does not hold yet; warn about keys it holds with another value."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("MLflow params already logged with other values, kept as they were: %s", ", ".join(changed[:10]))
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), BATCH_PARAMS):
        client.log_batch(run_id, params=new[i:i + BATCH_PARAMS])


def send_metrics(client, run_id: str, metrics: Mapping[str, float], step: int | None,
                 timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, v, ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(items), BATCH_METRICS):
        client.log_batch(run_id, metrics=items[i:i + BATCH_METRICS])


def send_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run_id, tags=items[i:i + BATCH_PARAMS])
