"""The report's figures besides the loss curves (:mod:`amorlip.loss_curves`): per-suite task bars
and the AmorLIP runs' amortization over epochs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from amorlip.fileio import atomic_path
from amorlip.loss_curves import pyplot
from amorlip.report.collect import amortization_epochs
from amorlip.report.gains import pct

# how each main metric reads on an axis
METRIC_LABELS = {"acc1": "top-1 acc", "mean_per_class_recall": "mean per-class recall",
                 "mean_recall@1": "recall@1 (mean i2t, t2i)"}


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def task_label(key: str, metric: str | None) -> str:
    """``"category\\n(top-1 acc)"``: a bar group names the metric it shows."""
    return key if not metric else f"{key}\n({METRIC_LABELS.get(metric, metric)})"


def draw_suite_bars(ax, suite: str, per_run: Mapping[str, dict]) -> None:
    """Each task's main metric (%), runs side by side, chance as a dashed black tick; each task labelled
    with its metric (acc1, recall@k, ...); missing tasks: no bar."""
    first = next(iter(per_run.values()))["tasks"]
    keys = [k for k, v in first.items() if v.get("main_metric")]
    width = 0.8 / len(per_run)
    for i, (name, res) in enumerate(per_run.items()):
        xs = [j + (i - (len(per_run) - 1) / 2) * width for j in range(len(keys))]
        vals = [pct(res["tasks"].get(k, {}).get("main")) for k in keys]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width, label=name)
    labelled = False
    for j, key in enumerate(keys):
        chance = next((r["tasks"].get(key, {}).get("chance") for r in per_run.values()
                       if r["tasks"].get(key, {}).get("chance") is not None), None)
        if chance is not None:
            ax.hlines(100 * chance, j - 0.45, j + 0.45, colors="black", linestyles="--", linewidth=1,
                      label=None if labelled else "chance")
            labelled = True
    metrics = {first[k].get("main_metric") for k in keys}
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([task_label(k, first[k].get("main_metric")) for k in keys],
                       rotation=45 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center", fontsize=8)
    only = next(iter(metrics)) if len(metrics) == 1 else None
    ax.set_ylabel(f"{METRIC_LABELS.get(only, only)} (%)" if only else "main metric (%), per task as labelled")
    ax.set_title(f"{suite}: zero-shot main metric per task")
    ax.legend(fontsize=8)


def plot_suite_bars(suite: str, data: Mapping[str, dict], out: Path) -> Path | None:
    """:func:`draw_suite_bars` for the runs with results on ``suite``; None when none has."""
    per_run = {name: info["suites"].get(suite) for name, info in data.items() if info["suites"].get(suite)}
    if not per_run:
        return None
    n_tasks = sum(1 for v in next(iter(per_run.values()))["tasks"].values() if v.get("main_metric"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n_tasks * max(1, len(per_run)) + 2), 4.2))
    draw_suite_bars(ax, suite, per_run)
    out = _save(fig, out)
    plt.close(fig)
    return out


def plot_amortization(data: Mapping[str, dict], out: Path) -> Path | None:
    """One panel per AmorLIP run: EMA lambda-net RMSE and in-batch RMSE against epoch, per modality."""
    curves = {name: amortization_epochs(info["curve"]) for name, info in data.items()
              if info["config"].method == "amorlip"}
    curves = {name: recs for name, recs in curves.items() if recs}
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), squeeze=False)
    styles = {"image": "tab:blue", "text": "tab:orange"}
    for ax, (name, recs) in zip(axes.flat, curves.items()):
        epochs = [r["epoch"] for r in recs]
        for m, colour in styles.items():
            for predictor, line, label in (("ema", "-", "lambda (ema)"), ("in_batch", "--", "in-batch")):
                key = f"amort/{m}/{predictor}_rmse"
                pts = [(e, r[key]) for e, r in zip(epochs, recs) if r.get(key) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], line, color=colour, marker="o",
                            label=f"{m} {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("RMSE vs population log-partition")
        ax.set_title(name)
        ax.legend(fontsize=7)
    out = _save(fig, out)
    plt.close(fig)
    return out
