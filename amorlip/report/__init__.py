"""The pipeline's report: one table row per run, plots, and everything on the MLflow parent run.

One module per job:

- :mod:`.collect`: read results/{run}/{suite}.json, runs/{run}/train.json and metrics.jsonl;
  data-digest checks;
- :mod:`.gains`: the matching baseline run and the relative gain;
- :mod:`.tables`: ``results/summary.csv`` (results only, byte-identical for identical runs) and
  ``results/timing.csv``;
- :mod:`.noise`: the noise next to every gain (config seeds, else the benchmark sweep's spread);
- :mod:`.markdown`: ``results/summary.md``;
- :mod:`.plots`: task bars per suite, amortization over epochs (loss and validation curves:
  :mod:`amorlip.loss_curves`);
- :mod:`.to_mlflow`: the parent run's metrics, each gain on its training run;
- :mod:`.build`: ``amorlip report`` (all of the above); :mod:`.demo_summary`: ``amorlip demo-summary``.

The names below are the package's public interface (cli, benchmarks and tests use them).
"""

from amorlip.loss_curves import draw_loss_panel, loss_series, panel_title, plot_loss_curves, plot_validation
from amorlip.report.build import report
from amorlip.report.collect import amortization_epochs, collect, data_builds, data_differs, data_digest
from amorlip.report.demo_summary import print_demo_summary
from amorlip.report.gains import baseline_for, relative_gain
from amorlip.report.markdown import summary_markdown
from amorlip.report.noise import gain_noise, seed_spread
from amorlip.report.tables import TIMING_COLUMNS, summary_rows, write_csv

__all__ = [
    "TIMING_COLUMNS", "amortization_epochs", "baseline_for", "collect", "data_builds", "data_differs",
    "data_digest", "draw_loss_panel", "gain_noise", "loss_series", "panel_title", "plot_loss_curves",
    "plot_validation", "print_demo_summary", "relative_gain", "report", "seed_spread", "summary_markdown",
    "summary_rows", "write_csv",
]
