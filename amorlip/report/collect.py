"""Reading what the pipeline left: per run its config, train.json, metrics.jsonl and suite results.

Reads ``results/{run}/{suite}.json`` (the evaluator's contract) and ``runs/{run}/train.json`` and
``metrics.jsonl`` (the trainer's) for every run of the config. A missing or broken file is a warning
and empty cells, never a zero. Also the data checks: runs whose train.json records different
``provenance.manifest_sha256`` values (amorlip/provenance.py) trained on different downloads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.config import RunConfig, expand_runs
from amorlip.fileio import read_jsonl

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("%s not found; its cells stay empty", path)
    except ValueError as exc:
        log.warning("%s is not valid JSON (%s); its cells stay empty", path, exc)
    return None


def collect(config: Mapping[str, Any]) -> dict[str, dict]:
    """Per run: its RunConfig, train.json, metrics.jsonl records and ``{suite: results}``."""
    runs_dir, results_dir = Path(config["paths"]["runs"]), Path(config["paths"]["results"])
    out = {}
    for name, run in expand_runs(config).items():
        out[name] = {
            "config": run,
            "train": _read_json(runs_dir / name / "train.json") or {},
            "curve": read_jsonl(runs_dir / name / "metrics.jsonl"),
            "suites": {s: _read_json(results_dir / name / f"{s}.json") for s in config["evaluation"]["suites"]},
        }
    return out


def variant_of(info: Mapping[str, Any]) -> str:
    """The variant that ran (train.json's record, else the config's)."""
    run: RunConfig = info["config"]
    return info["train"].get("variant") or run.variant


def amortization_epochs(records: list[dict]) -> list[dict]:
    """The trainer's per-epoch amortization records of a metrics.jsonl (``kind: amortization``), by step."""
    return sorted((r for r in records if r.get("kind") == "amortization"), key=lambda r: r["step"])


def data_digest(info: Mapping[str, Any]) -> str | None:
    """The run's ``provenance.manifest_sha256`` from train.json (None when not recorded)."""
    prov = info["train"].get("provenance")
    return prov.get("manifest_sha256") if isinstance(prov, Mapping) else None


def data_differs(info: Mapping[str, Any], other: Mapping[str, Any]) -> bool | None:
    """True when both runs record a data digest and the digests differ; None when either is unknown."""
    a, b = data_digest(info), data_digest(other)
    return None if a is None or b is None else a != b


def data_builds(data: Mapping[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per dataset with more than one recorded data digest: ``{digest: [runs]}`` (runs on different
    builds of the same dataset, whose numbers are not comparable as they stand)."""
    by_dataset: dict[str, dict[str, list[str]]] = {}
    for name, info in data.items():
        digest = data_digest(info)
        if digest is not None:
            by_dataset.setdefault(info["config"].dataset, {}).setdefault(digest, []).append(name)
    return {ds: builds for ds, builds in by_dataset.items() if len(builds) > 1}
