"""The training data as an MLflow dataset input (the runs table's Dataset column), from manifest.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


def send_dataset(client, run_id: str, payload: Mapping[str, Any]) -> None:
    """Log one dataset input (``payload`` as :meth:`Tracker.log_dataset` records it) to ``run_id``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(payload["name"], payload["digest"], payload["source_type"], payload["source"],
                      profile=payload.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset, tags=[InputTag("mlflow.data.context", payload.get("context") or "train")])])
