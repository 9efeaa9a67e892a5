"""amorlip.train.progress: the metrics file and the non-finite check."""

from __future__ import annotations

import math

import torch

from amorlip.train.progress import MetricsFile, nonfinite_terms


def test_nonfinite_terms_names_the_bad_loss():
    assert nonfinite_terms({"loss": torch.tensor(1.0), "lambda_loss": 0.5, "lambda_gap": math.nan}) == {}
    bad = nonfinite_terms({"loss": torch.tensor(float("nan")), "encoder_loss": math.inf, "lambda_loss": 0.1})
    assert set(bad) == {"loss", "encoder_loss"}


def test_metrics_file_is_cut_back_on_resume(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 8):
        metrics.append({"step": step, "loss": 1.0 / step})
    assert metrics.truncate_after(5) == 5
    assert [r["step"] for r in metrics.read()] == [1, 2, 3, 4, 5]
