"""``amorlip report``: the pipeline's last step, from the collected results to files and MLflow."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.fileio import atomic_write_text
from amorlip.loss_curves import plot_loss_curves, plot_validation
from amorlip.report.collect import collect
from amorlip.report.markdown import summary_markdown
from amorlip.report.noise import gain_noise
from amorlip.report.plots import plot_amortization, plot_suite_bars
from amorlip.report.tables import TIMING_COLUMNS, summary_rows, write_csv
from amorlip.report.to_mlflow import log_gains_to_training_runs, parent_metrics

log = logging.getLogger(__name__)


def report(config: Mapping[str, Any]) -> dict[str, Path]:
    """summary.csv, timing.csv, summary.md and plots/*.png, all logged to the MLflow parent run; each
    gain (with its noise) also on its training run. Returns ``{"csv", "md", <plot stem>: path}``."""
    from amorlip.tracking import log_to_parent

    results_dir = Path(config["paths"]["results"])
    plots = results_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    data = collect(config)
    columns, rows = summary_rows(config, data)
    csv_path = write_csv(results_dir / "summary.csv", [c for c in columns if c not in TIMING_COLUMNS], rows)
    write_csv(results_dir / "timing.csv", ["run", "steps", *TIMING_COLUMNS], rows)
    md_path = results_dir / "summary.md"
    atomic_write_text(md_path, summary_markdown(config, data, rows))
    pngs = [p for p in [plot_loss_curves(data, plots / "loss_curves.png"),
                        plot_validation(data, plots / "validation.png"),
                        plot_amortization(data, plots / "amortization.png")]
            + [plot_suite_bars(s, data, plots / f"{s}_tasks.png") for s in config["evaluation"]["suites"]] if p]

    base_m = config["report"]["baseline_method"]
    metrics, best = parent_metrics(config, rows)
    log_gains_to_training_runs(config, data, rows, gain_noise(config, rows))
    log_to_parent(config, metrics=metrics, artifacts=[csv_path, md_path, *pngs],
                  params={"runs": ",".join(data), "suites": ",".join(config["evaluation"]["suites"]),
                          "baseline_method": base_m, **best})
    log.info("report: %d run(s) -> %s, %s, %d plot(s) in %s", len(rows), csv_path, md_path, len(pngs), plots)
    return {"csv": csv_path, "md": md_path, **{p.stem: p for p in pngs}}
