"""The figures: per-metric panels with log scales where a metric spans decades and epoch boundaries
marked, the methods on the shared validation metric, task bars that name their metric."""

from __future__ import annotations

import json
from pathlib import Path

from test_report import pipeline  # noqa: F401  (fixture: three runs, two suites, an MLflow parent)

from amorlip.loss_curves import (
    epoch_starts,
    plot_run_curves,
    pyplot,
    run_panels,
    scale_for,
    validation_records,
)
from amorlip.report import collect, report
from amorlip.report.plots import draw_suite_bars

PNG = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    """An AmorLIP run as the trainer logs it: 10 steps an epoch, lambda_loss spiking at epoch starts,
    a validation record and an amortization record per epoch."""
    recs = []
    for step in range(1, 31):
        epoch = (step - 1) // 10
        recs.append({"step": step, "epoch": epoch, "loss": 3.0 / step, "amorlip_loss": 3.0 / step + 1,
                     "lambda_loss": 37.0 if step % 10 == 1 else 0.01, "lr": 1e-3, "logit_scale": 14.3})
        if step % 10 == 0:
            recs.append({"step": step, "epoch": epoch, "kind": "validation", "val_infonce": 2.0 - epoch / 10,
                         "val_batch": 64, "time": 0.0})
            recs.append({"step": step, "epoch": epoch, "kind": "amortization", "amort/grad_cosine": 0.5, "time": 0.0})
    return recs


def test_run_figure_has_one_panel_per_metric(tmp_path):
    recs = _records()
    panels = run_panels(recs)
    assert list(panels) == ["amorlip_loss", "loss", "lambda_loss", "logit_scale", "lr",
                            "val_infonce (fixed batch)"]
    assert scale_for(v for _, v in panels["lambda_loss"]) == "log"  # 0.01 .. 37
    assert scale_for(v for _, v in panels["loss"]) == "linear"  # 0.1 .. 3
    assert scale_for([0.0, 0.01, 5.0]) == "symlog" and scale_for([]) == "linear"
    assert epoch_starts(recs) == [11, 21]  # from the step records; per-epoch records are not steps
    assert [r["step"] for r in validation_records(recs)] == [10, 20, 30]
    out = plot_run_curves(recs, tmp_path / "run" / "loss_curves.png", title="amorlip")
    assert out.read_bytes()[:8] == PNG
    # no step record (fewer steps than log_every): still a figure, since the PNG is a rule output
    empty = plot_run_curves([{"step": 1, "kind": "amortization"}], tmp_path / "none.png")
    assert empty == tmp_path / "none.png" and empty.read_bytes()[:8] == PNG


def test_report_compares_methods_on_the_validation_metric(pipeline):  # noqa: F811
    out = report(pipeline)
    assert "validation" not in out  # no run logged it: no figure, no error
    runs = Path(pipeline["paths"]["runs"])
    for run, offset in (("clip", 0.0), ("amorlip", -0.1)):
        with open(runs / run / "metrics.jsonl", "a") as fh:
            for step in (50, 100):
                fh.write(json.dumps({"step": step, "epoch": step // 50 - 1, "kind": "validation",
                                     "val_infonce": 2.0 + offset - step / 1000, "val_batch": 64, "time": 0.0}) + "\n")
    out = report(pipeline)
    assert out["validation"].read_bytes()[:8] == PNG
    assert out["loss_curves"].exists()  # validation records stay out of the loss panels


def test_task_bars_name_their_metric(pipeline):  # noqa: F811
    plt = pyplot()
    data = collect(pipeline)
    fig, ax = plt.subplots()
    draw_suite_bars(ax, "emoji-heldout", {n: i["suites"]["emoji-heldout"] for n, i in data.items()})
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["category\n(top-1 acc)", "subcategory\n(top-1 acc)", "retrieval\n(recall@1 (mean i2t, t2i))"]
    assert ax.get_ylabel() == "main metric (%), per task as labelled"  # two metrics in one suite
    plt.close(fig)
