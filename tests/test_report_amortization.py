"""The report's amortization section and plot, from train.json and metrics.jsonl as the trainer writes them.

Inputs follow the trainer's contracts: per-epoch ``kind: amortization`` records in metrics.jsonl (the
keys of :func:`amorlip.diagnostics.flat_figures`) and the last epoch's report in train.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_report import pipeline  # noqa: F401  (the fixture: three runs, two suites, an MLflow parent)

from amorlip.diagnostics import flat_figures
from amorlip.report import amortization_epochs, report


def _epoch_report(epoch: int) -> dict:
    """An amortization report as EpochDiagnostics returns it: the lambda net improves each epoch."""
    modalities = {}
    for m, offset in (("image", 0.0), ("text", 0.01)):
        preds = {"ema": {"rmse": 0.30 - 0.05 * epoch + offset, "bias": -0.1, "corr": 0.2 + 0.2 * epoch},
                 "prev": {"rmse": 0.40 + offset, "bias": 0.05, "corr": 0.1},
                 "in_batch": {"rmse": 0.35 + offset, "bias": 0.0, "corr": 0.5},
                 "constant": {"rmse": 0.25 + offset, "bias": 0.0, "corr": None}}
        modalities[m] = {"target": {"mean": 4.0, "std": 0.25 + offset}, "predictors": preds}
    return {"modalities": modalities, "gradient_fidelity": {"cosine": 0.8125, "batch_size": 64, "probe": 1024},
            "logit_scale": 14.3, "batch_size": 64, "probe": 1024}


def test_report_shows_amortization_beside_zero_shot(pipeline):  # noqa: F811
    runs = Path(pipeline["paths"]["runs"])
    with open(runs / "amorlip" / "metrics.jsonl", "a") as fh:
        for epoch in range(3):
            fh.write(json.dumps({"step": 25 * (epoch + 1), "epoch": epoch, "kind": "amortization",
                                 **flat_figures(_epoch_report(epoch)), "time": 0.0}) + "\n")
    train = json.loads((runs / "amorlip" / "train.json").read_text())
    train["amortization"] = {"epoch": 2, "step": 75, **_epoch_report(2)}
    (runs / "amorlip" / "train.json").write_text(json.dumps(train))

    out = report(pipeline)
    md = out["md"].read_text()
    section = md.split("## Amortization (AmorLIP runs)")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[1:]}
    assert list(cells) == ["amorlip", "amorlip-paper-s1"]  # AmorLIP runs only
    amor = dict(zip(header, cells["amorlip"]))
    # zero-shot suite means (the fixture's: 45 % on emoji-heldout, 20 % on datacomp) beside the last epoch
    assert amor["emoji-heldout mean"] == "45.00" and amor["datacomp mean"] == "20.00" and amor["epoch"] == "2"
    assert (amor["image ema rmse"], amor["image in-batch rmse"], amor["image constant rmse"]) == ("0.2000", "0.3500", "0.2500")
    assert (amor["text ema rmse"], amor["text ema corr"], amor["grad cosine"]) == ("0.2100", "0.600", "0.8125")
    # a run without measurements: dashes, never zeros
    paper = dict(zip(header, cells["amorlip-paper-s1"]))
    assert paper["epoch"] == "–" and paper["image ema rmse"] == "–" and paper["grad cosine"] == "–"

    png = Path(pipeline["paths"]["results"]) / "plots" / "amortization.png"
    assert out["amortization"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plot's series: the per-epoch records, in step order, step records left out
    records = [json.loads(line) for line in (runs / "amorlip" / "metrics.jsonl").read_text().splitlines()]
    epochs = amortization_epochs(records)
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert [round(r["amort/image/ema_rmse"], 4) for r in epochs] == [0.30, 0.25, 0.20]
    assert len(records) == 13  # 10 step records + 3 per-epoch ones; the loss-curve plot still draws
    assert out["loss_curves"].exists()
