"""The results table: one row per run (``results/summary.csv``) and the machine timings apart
(``results/timing.csv``).

summary.csv: run, method, variant, batch, seed, each task's main metric, group means, suite mean,
its coverage, relative gain over the matching baseline, steps. Metric values are percentages; a
missing task is an empty cell, never 0. Only results: the same config and seed give the same file
byte for byte (docs/architecture.md, "Determinism"). timing.csv: images/s and wall time, which vary
from one rerun to the next.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.config import RunConfig
from amorlip.fileio import atomic_path
from amorlip.report.collect import data_differs, data_digest, variant_of
from amorlip.report.gains import baseline_for, covered_keys, pct, relative_gain

log = logging.getLogger(__name__)

# wall-clock measurements: they differ between two runs of the same config and seed, so they live in
# results/timing.csv and summary.md, not in the results table
TIMING_COLUMNS = ("images_per_s", "wall_time_s")


def summary_rows(config: Mapping[str, Any], data: Mapping[str, dict]) -> tuple[list[str], list[dict]]:
    """CSV columns and one row per run (percentages; None for unknown/missing)."""
    runs = {name: info["config"] for name, info in data.items()}
    baseline_method = config["report"]["baseline_method"]
    suites = config["evaluation"]["suites"]
    columns = ["run", "method", "variant", "dataset", "model", "batch", "seed"]
    task_cols: dict[str, list[str]] = {s: [] for s in suites}
    group_cols: dict[str, list[str]] = {s: [] for s in suites}
    for info in data.values():
        for s in suites:
            res = info["suites"].get(s) or {}
            for key in res.get("tasks", {}):
                if key not in task_cols[s] and (res["tasks"][key].get("main_metric")):
                    task_cols[s].append(key)
            for g in res.get("aggregates", {}).get("groups", {}):
                if g not in group_cols[s]:
                    group_cols[s].append(g)
    for s in suites:
        columns += [f"{s}/{k}" for k in task_cols[s]] + [f"{s}/group/{g}" for g in group_cols[s]]
        columns += [f"{s}/mean", f"{s}/covered", f"{s}/gain_vs_{baseline_method}_pct"]
    columns += ["baseline_run", "baseline_data_differs", "steps", "images_per_s", "wall_time_s"]

    rows = []
    for name, info in data.items():
        run: RunConfig = info["config"]
        base = baseline_for(run, runs, baseline_method)
        row: dict[str, Any] = {"run": name, "method": run.method, "variant": variant_of(info),
                               "dataset": run.dataset, "model": run.model, "batch": run.batch_size,
                               "seed": run.seed, "baseline_run": base,
                               "baseline_data_differs": None if base is None else data_differs(info, data[base])}
        if row["baseline_data_differs"]:
            log.warning("%s vs %s: trained on different data (manifest digests %s vs %s); the gain is flagged",
                        name, base, (data_digest(info) or "")[:12], (data_digest(data[base]) or "")[:12])
        for s in suites:
            res = info["suites"].get(s) or {}
            tasks, agg = res.get("tasks", {}), res.get("aggregates", {})
            for key in task_cols[s]:
                row[f"{s}/{key}"] = pct(tasks.get(key, {}).get("main"))
            for g in group_cols[s]:
                row[f"{s}/group/{g}"] = pct(agg.get("groups", {}).get(g))
            row[f"{s}/mean"] = pct(agg.get("mean_main"))
            row[f"{s}/covered"] = f"{agg['covered']}/{agg['total']}" if agg else None
            gain = None
            if base is not None:
                base_res = data[base]["suites"].get(s)
                if base_res and covered_keys(base_res) == covered_keys(res):
                    gain = relative_gain(agg.get("mean_main"), base_res["aggregates"].get("mean_main"))
                elif base_res:
                    log.warning("%s vs %s on %s: different task coverage; no relative gain", name, base, s)
            row[f"{s}/gain_vs_{baseline_method}_pct"] = None if gain is None else round(gain, 4)
        train = info["train"]
        row["steps"] = train.get("steps")
        row["images_per_s"] = None if train.get("images_per_s") is None else round(float(train["images_per_s"]), 2)
        row["wall_time_s"] = None if train.get("wall_time_s") is None else round(float(train["wall_time_s"]), 1)
        rows.append(row)
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return path
