"""The exported model as an MLflow logged model that loads back into open_clip, optionally registered.

The logged model holds three files: ``model.pt`` (the export format of docs/architecture.md, "Model
export"), ``open_clip_config.json`` (``model_name``, the open_clip ``model_cfg`` and the extra
constructor kwargs) and ``README.md`` saying how to load them. A person with only open_clip builds
the towers from the JSON (``open_clip.CLIP(**model_cfg, **model_kwargs)``) and loads the state dict;
this project loads the downloaded ``model.pt`` with ``amorlip.model_file.load_exported``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
LOADER_NOTE = """# Loading this model

Files: `model.pt` (a `torch.save` dict: `state_dict` in fp32, `model_name`, `model_config`, the run's
settings, the lambda nets for AmorLIP) and `open_clip_config.json`.

With the project installed:

    from amorlip.model_file import load_exported
    model, preprocess, tokenizer, meta = load_exported("model.pt")

With open_clip only:

    import json, open_clip, torch
    cfg = json.load(open("open_clip_config.json"))
    model = open_clip.CLIP(**cfg["model_cfg"], **cfg["model_kwargs"], output_dict=True)
    model.load_state_dict(torch.load("model.pt", weights_only=True)["state_dict"])

Download from MLflow with `mlflow.artifacts.download_artifacts("models:/<model_id>")`.
"""


def _stage(payload: Mapping[str, Any], folder: Path) -> None:
    dst = folder / Path(payload["path"]).name
    try:
        os.link(payload["path"], dst)  # no copy of a large file when the filesystem allows
    except OSError:
        shutil.copy2(payload["path"], dst)
    if payload.get("open_clip_config") is not None:
        (folder / CONFIG_FILE).write_text(json.dumps(payload["open_clip_config"], indent=1, sort_keys=True))
        (folder / "README.md").write_text(LOADER_NOTE)


def send_logged_model(client, run_id: str, payload: Mapping[str, Any]) -> str:
    """Create a logged model (``payload`` as :meth:`Tracker.log_model` records it) as an output of
    ``run_id`` at ``step``, mark it READY and, with ``register_as``, register a new version of that
    name; returns the model id."""
    from mlflow.entities import LoggedModelOutput

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=payload["name"], source_run_id=run_id,
                                       params=payload.get("params") or None, model_type="open_clip")
    with tempfile.TemporaryDirectory() as tmp:
        _stage(payload, Path(tmp))
        client.log_model_artifacts(model.model_id, tmp)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, payload.get("step") or 0)])
    client.finalize_logged_model(model.model_id, "READY")
    if payload.get("register_as"):
        try:
            register(client, payload["register_as"], model.model_id, run_id)
        except Exception as exc:  # noqa: BLE001 -- the model is logged; only the registry entry is missing
            log.warning("logged model %s not registered as %r (%s: %s); register it later with "
                        "mlflow.register_model('models:/%s', %r)", model.model_id, payload["register_as"],
                        type(exc).__name__, str(exc)[:200], model.model_id, payload["register_as"])
    return model.model_id


def register(client, name: str, model_id: str, run_id: str):
    """A new version of registered model ``name`` (created when missing) pointing at ``model_id``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="open_clip models exported by amorlip "
                                       "(each version: model.pt + open_clip_config.json)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # the physical location: a "models:/" source would be resolved through MLflow's global tracking URI
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
    log.info("registered model %s version %s (logged model %s)", name, version.version, model_id)
    return version
