"""What a result depends on, as digests: the url list, the downloaded sample set, the run settings,
the code and the packages.

Two numbers are comparable only when they were computed from the same data by the same code under
the same settings; with the data order fixed by the index step (amorlip/data/reshard.py) those
inputs pin a CPU run bit for bit. :func:`run_provenance` gathers them for a run's train.json and
its MLflow run, and the report flags comparisons across different ``manifest_sha256`` values.

- ``url_list_sha256``: the file the dataset's ``url_list`` names (``source: url_list``; None for the
  emoji demo, whose corpus is built from packaged art) and ``urls_parquet_sha256``:
  ``resources/{dataset}/urls.parquet``, the list img2dataset actually read.
- ``manifest_sha256``: ``data/{dataset}/manifest.json``, which carries the sample counts, the
  failures by reason and ``samples_sha256`` (every sample's key, image and caption bytes in key
  order), so equal manifests mean the same downloaded sample set.
- ``run_settings_sha256``: the resolved :class:`~amorlip.config.RunConfig` without its name (two runs
  with the same settings under different names have the same digest).
- ``code``: git commit and whether the checkout has uncommitted changes (None outside a checkout),
  and the package version.
- ``packages``: versions of the libraries a result depends on (None when not installed).

A missing file gives None for its digest, never an error: provenance must not stop a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import amorlip

log = logging.getLogger(__name__)

FORMAT = "amorlip-provenance/1"
# distribution names (what pip installs) of the libraries a result depends on
PACKAGES = ("torch", "open_clip_torch", "deepspeed", "numpy", "img2dataset", "webdataset", "pillow")
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str | None:
    """Hex sha256 of a file's bytes; None when it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def settings_sha256(run: Any) -> str:
    """Digest of the resolved run settings (``RunConfig.to_dict()`` minus ``name``), key order fixed."""
    settings = {k: v for k, v in run.to_dict().items() if k != "name"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(Path(amorlip.__file__).resolve().parent), *args],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict[str, Any]:
    """``{"git_commit", "git_dirty", "version"}``; the git fields are None outside a checkout."""
    head = _git("rev-parse", "HEAD")
    commit = (head.stdout.strip() or None) if head is not None and head.returncode == 0 else None
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None and status.returncode == 0:
            dirty = bool(status.stdout.strip())
    return {"git_commit": commit, "git_dirty": dirty, "version": amorlip.__version__}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_provenance(config: Mapping[str, Any], run: Any) -> dict[str, Any]:
    """The digests that pin ``run``'s result (keys in the module docstring); JSON-serialisable."""
    dataset = run.dataset
    ds = config["datasets"][dataset]
    data_dir = Path(config["paths"]["data"]) / dataset
    url_list = ds.get("url_list") if ds.get("source") == "url_list" else None
    manifest_path = data_dir / "manifest.json"
    samples_sha256 = None
    try:
        samples_sha256 = json.loads(manifest_path.read_text()).get("samples_sha256")
    except FileNotFoundError:
        log.warning("provenance: %s not found; the data digests stay empty", manifest_path)
    except ValueError as exc:
        log.warning("provenance: %s is not valid JSON (%s)", manifest_path, exc)
    return {
        "format": FORMAT,
        "dataset": dataset,
        "url_list": url_list,
        "url_list_sha256": file_sha256(url_list) if url_list else None,
        "urls_parquet_sha256": file_sha256(Path(config["paths"]["resources"]) / dataset / "urls.parquet"),
        "manifest_sha256": file_sha256(manifest_path),
        "samples_sha256": samples_sha256,
        "run_settings_sha256": settings_sha256(run),
        "code": code_version(),
        "packages": package_versions(),
        "python": platform.python_version(),
    }


def flat_provenance(prov: Mapping[str, Any], prefix: str = "provenance") -> dict[str, str]:
    """``{"provenance.code.git_commit": "...", ...}``: string values for MLflow params or tags."""
    out: dict[str, str] = {}
    for key, value in prov.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(flat_provenance(value, name))
        else:
            out[name] = "" if value is None else str(value)
    return out
