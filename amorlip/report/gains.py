"""Relative gains over the matching baseline run.

The relative gain is ``mean / baseline mean - 1`` in percent (the paper's "12.24%" is 24.11 / 21.48
- 1 on Avg 38), against the run of ``report.baseline_method`` with the same dataset, model, batch
size and seed, and only when both runs cover the same tasks (otherwise the means are not comparable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amorlip.config import RunConfig


def pct(value: float | None) -> float | None:
    """A fraction as a percentage (rounded to 4 decimals; None stays None)."""
    return None if value is None else round(100.0 * value, 4)


def baseline_for(run: RunConfig, runs: Mapping[str, RunConfig], method: str) -> str | None:
    """The run of ``method`` with the same dataset, model, batch size and seed (None if none or self)."""
    if run.method == method:
        return None
    for name, other in runs.items():
        if (other.method == method and other.batch_size == run.batch_size and other.seed == run.seed
                and other.dataset == run.dataset and other.model == run.model):
            return name
    return None


def relative_gain(mean: float | None, baseline_mean: float | None) -> float | None:
    """``(mean / baseline - 1) * 100``; None when either is unknown or the baseline is 0."""
    if mean is None or not baseline_mean:
        return None
    return 100.0 * (mean / baseline_mean - 1.0)


def covered_keys(res: Mapping[str, Any] | None) -> frozenset[str]:
    """The tasks a suite result scored (a gain needs the same set on both sides)."""
    return frozenset(k for k, v in (res or {}).get("tasks", {}).items() if "main" in v)
