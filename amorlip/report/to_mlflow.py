"""The report's figures in MLflow: the pipeline's bests on the parent run, each gain on its training run.

Parent metrics hold no run names in their keys, so they compare across pipelines.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def parent_metrics(config: Mapping[str, Any], rows: list[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """``eval/<suite>/best_mean_main`` and ``eval/<suite>/best_gain_vs_<baseline>_pct`` (percent), and
    as params which run reached each (``eval.<suite>.best_run``, ``eval.<suite>.best_gain_run``).
    The per-run values live on the training runs (``eval/<suite>/...``)."""
    base_m = config["report"]["baseline_method"]
    metrics: dict[str, float] = {}
    best: dict[str, str] = {}
    for s in config["evaluation"]["suites"]:
        for col, metric, param in ((f"{s}/mean", f"eval/{s}/best_mean_main", f"eval.{s}.best_run"),
                                   (f"{s}/gain_vs_{base_m}_pct", f"eval/{s}/best_gain_vs_{base_m}_pct",
                                    f"eval.{s}.best_gain_run")):
            scored = [(row[col], row["run"]) for row in rows if row.get(col) is not None]
            if scored:
                value, run = max(scored)
                metrics[metric], best[param] = value, run
    return metrics, best


def log_gains_to_training_runs(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict],
                               noise: Mapping[str, Mapping[str, dict]] | None = None) -> None:
    """Each run's gain over its baseline (``eval/<suite>/gain_vs_<baseline>_pct``) on its training run,
    with its noise (``eval/<suite>/gain_noise_sd_pct``, source in the tag ``amorlip.gain_noise.<suite>``)."""
    from amorlip.tracking import attach_run

    base_m = config["report"]["baseline_method"]
    offline_dir = Path(config["paths"]["results"]) / "mlflow-offline"
    for row in rows:
        gains: dict[str, float] = {}
        tags: dict[str, str] = {}
        for s in config["evaluation"]["suites"]:
            if row.get(f"{s}/gain_vs_{base_m}_pct") is None:
                continue
            gains[f"eval/{s}/gain_vs_{base_m}_pct"] = row[f"{s}/gain_vs_{base_m}_pct"]
            sd = (noise or {}).get(row["run"], {}).get(s)
            if sd and sd.get("sd") is not None:
                gains[f"eval/{s}/gain_noise_sd_pct"] = sd["sd"]
                tags[f"amorlip.gain_noise.{s}"] = sd["text"][:5000]
        if not gains:
            continue
        run_id = (data[row["run"]].get("train") or {}).get("mlflow_run_id")
        tracker = attach_run(config, run_id, offline_dir / f"train-report-{row['run']}.jsonl")
        if tracker is not None:
            tracker.log_metrics(gains, step=0)
            if tags:
                tracker.set_tags(tags)
