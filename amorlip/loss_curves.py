"""Training curves from metrics.jsonl records: the per-run figure and the report's panels, one owner.

The trainer draws ``runs/{run}/loss_curves.png`` with :func:`plot_run_curves`; the report draws every
run side by side (:func:`plot_loss_curves`) and the methods on their shared validation metric
(:func:`plot_validation`). Both read the same records (docs/architecture.md, "Training outputs"):
step records (no ``kind``), per-epoch ``kind: amortization`` and ``kind: validation`` records.

Choices that keep a curve readable: one panel per metric (objectives differ in scale, and
``lambda_loss`` spikes to ~37 at epoch starts while it sits near 0.01 otherwise), a log axis where a
metric spans two decades or more, a term that repeats another point for point drawn once (CLIP logs
its objective as both ``clip_loss`` and ``loss``), and dotted lines at epoch boundaries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from amorlip.fileio import atomic_path

log = logging.getLogger(__name__)

# scalar diagnostics of the step records worth a panel of their own, after the losses
DIAGNOSTICS = ("logit_scale", "lambda_gap", "lr")
VALIDATION_KEY = "val_infonce"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def step_records(records: Iterable[dict]) -> list[dict]:
    """The per-step records (the per-epoch amortization and validation records carry a ``kind``)."""
    return [r for r in records if r.get("kind") is None]


def validation_records(records: Iterable[dict]) -> list[dict]:
    """The fixed-batch validation records (``kind: validation``, key ``val_infonce``), by step."""
    return sorted((r for r in records if r.get("kind") == "validation" and r.get(VALIDATION_KEY) is not None),
                  key=lambda r: r["step"])


def loss_series(records: list[dict]) -> tuple[dict[str, list], dict[str, list]]:
    """``(encoder, lambda)``: each loss term's ``(step, value)`` points, the lambda-net losses apart.

    A term that repeats another point for point (CLIP logs its objective as both ``clip_loss`` and
    ``loss``) is kept once, under its specific name.
    """
    records = step_records(records)
    keys = sorted({k for r in records for k in r if k == "loss" or k.endswith("_loss")},
                  key=lambda k: (k == "loss", k))  # specific names first: they win over "loss"
    series: dict[str, list] = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts and pts not in series.values():
            series[key] = pts
    lam = {k: v for k, v in series.items() if k.startswith("lambda")}
    return {k: v for k, v in series.items() if k not in lam}, lam


def scale_for(values: Iterable[float]) -> str:
    """``"log"`` for positive values spanning two decades or more, ``"symlog"`` for such values with
    zeros or negatives, else ``"linear"``."""
    values = [abs(v) for v in values if v is not None]
    positive = [v for v in values if v > 0]
    if not positive or max(positive) < 100 * min(positive):
        return "linear"
    return "log" if len(positive) == len(values) and all(v > 0 for v in values) else "symlog"


def epoch_starts(records: Iterable[dict]) -> list[int]:
    """The steps at which a new epoch's records begin (the boundaries worth marking)."""
    starts, last = [], None
    for r in step_records(records):
        epoch = r.get("epoch")
        if epoch is not None and last is not None and epoch != last:
            starts.append(r["step"])
        last = epoch if epoch is not None else last
    return starts


def mark_epochs(ax, records: Iterable[dict]) -> None:
    """Dotted grey lines at epoch boundaries (a collection, not lines: legends stay the metrics')."""
    starts = epoch_starts(records)
    if starts:
        ax.vlines(starts, 0, 1, transform=ax.get_xaxis_transform(), colors="grey", linestyles=":",
                  linewidth=0.8, label="_epoch")


def panel_title(name: str, method: str) -> str:
    """The run name, with the method only when the name does not already say it."""
    return name if method in name.split("-") else f"{name} ({method})"


def draw_loss_panel(ax, name: str, method: str, records: list[dict]) -> None:
    """Encoder losses on the left axis; lambda-net losses, whose spikes at epoch starts span decades,
    on their own right axis (log scale), so neither flattens the other; epoch boundaries dotted."""
    encoder, lam = loss_series(records)
    lines = [ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)[0] for key, pts in encoder.items()]
    ax.set_ylabel("encoder loss")
    if encoder:
        ax.set_yscale(scale_for(v for pts in encoder.values() for _, v in pts))
    if lam:
        right = ax.twinx()
        for i, (key, pts) in enumerate(lam.items()):
            lines += right.plot([p[0] for p in pts], [p[1] for p in pts], label=key, color=f"C{len(encoder) + i}",
                                alpha=0.7, linewidth=0.8)
        values = [v for pts in lam.values() for _, v in pts]
        right.set_yscale("log" if min(values) > 0 else "symlog")
        right.set_ylabel("lambda loss (log)" if min(values) > 0 else "lambda loss (symlog)")
    mark_epochs(ax, records)
    ax.set_title(panel_title(name, method))
    ax.set_xlabel("step")
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def run_panels(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The per-run figure's panels: each loss term (duplicates dropped), the diagnostics, and the
    fixed-batch validation loss when the run logged it; ``{title: [(step, value)]}``."""
    encoder, lam = loss_series(records)
    panels = {**encoder, **lam}
    steps = step_records(records)
    for key in DIAGNOSTICS:
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            panels[key] = pts
    val = validation_records(records)
    if val:
        panels[f"{VALIDATION_KEY} (fixed batch)"] = [(r["step"], r[VALIDATION_KEY]) for r in val]
    return panels


def panel_grid(plt, count: int, max_cols: int, panel_size: tuple[float, float]):
    """``(fig, axes)``: ``count`` axes in rows of at most ``max_cols``, the grid's spare cells hidden."""
    ncols = min(max_cols, count)
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat[:count]


def plot_run_curves(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """One run's figure: one panel per metric (log scale where it spans decades), epoch boundaries
    dotted. A run that logged no step record (fewer steps than ``log_every``) still gets its figure,
    saying so: the PNG is a rule output, and a missing one would fail a finished training job."""
    panels = run_panels(records)
    plt = pyplot()
    if panels:
        fig, axes = panel_grid(plt, len(panels), 3, (4.6, 3.2))
        for ax, (key, pts) in zip(axes, panels.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, markersize=3)
            scale = scale_for(v for _, v in pts)
            ax.set_yscale(scale)
            ax.set_title(key if scale == "linear" else f"{key} ({scale})", fontsize=10)
            ax.set_xlabel("step")
            mark_epochs(ax, records)
    else:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no step metrics logged\n(the run had fewer steps than log_every)",
                ha="center", va="center")
    if title:
        fig.suptitle(title)
    out = _save(fig, out)
    plt.close(fig)
    return out


def plot_loss_curves(data: Mapping[str, dict], out: str | os.PathLike) -> Path | None:
    """The report's loss figure: one panel per run (:func:`draw_loss_panel`), from each run's records
    (``data[run]["curve"]``) and method (``data[run]["config"].method``)."""
    curves = {name: info["curve"] for name, info in data.items() if step_records(info["curve"])}
    if not curves:
        log.warning("no metrics.jsonl found; no loss-curve plot")
        return None
    plt = pyplot()
    fig, axes = panel_grid(plt, len(curves), 4, (4.5, 3.4))
    for ax, (name, records) in zip(axes, curves.items()):
        draw_loss_panel(ax, name, data[name]["config"].method, records)
    out = _save(fig, out)
    plt.close(fig)
    return out


def plot_validation(data: Mapping[str, dict], out: str | os.PathLike) -> Path | None:
    """The methods compared on one metric: the plain InfoNCE on a fixed held-out batch (the same batch
    size for every method), one line per run against step; None when no run logged it."""
    curves = {name: validation_records(info["curve"]) for name, info in data.items()}
    curves = {name: recs for name, recs in curves.items() if recs}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    batches = set()
    for name, recs in curves.items():
        ax.plot([r["step"] for r in recs], [r[VALIDATION_KEY] for r in recs], marker="o", markersize=3,
                label=panel_title(name, data[name]["config"].method))
        batches.update(r.get("val_batch") for r in recs if r.get("val_batch"))
    ax.set_yscale(scale_for(r[VALIDATION_KEY] for recs in curves.values() for r in recs))
    ax.set_xlabel("step")
    ax.set_ylabel("validation InfoNCE (lower is better)")
    batch = f", batch {batches.pop()}" if len(batches) == 1 else ""
    ax.set_title(f"All methods on one metric: InfoNCE on a fixed held-out batch{batch}", fontsize=10)
    ax.legend(fontsize=8)
    out = _save(fig, out)
    plt.close(fig)
    return out
