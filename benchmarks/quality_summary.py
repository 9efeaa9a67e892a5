"""Quality at small batch (issue 7, item 4): mean +- std over seeds of the held-out suite's mean main metric.

Reads what the pipeline wrote for the sweep of ``config/bench-quality.yaml`` (``results/{run}/{suite}.json``
through :func:`amorlip.report.collect`, the report's own reader), groups runs by method / variant and
batch size, and prints one row per method with ``mean +- std (n seeds)`` per batch, plus the
difference to CLIP at the same batch. Values are percentages (the suite's fractions x 100), as in
the pipeline's summary. Writes ``benchmarks/results/quality.json`` and a plot
(``quality.png``: mean main metric vs batch size, one line per method, error bars = std over seeds,
dashed line = chance). Runs without results are counted as missing, never as zero.

    make bench-quality                         # the sweep through Snakemake, then this summary
    python -m benchmarks.quality_summary [--config config/bench-quality.yaml] [--suite emoji-heldout]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.common import REPO, RESULTS_DIR, print_table, setup_logging, write_result

log = logging.getLogger(__name__)


def label(method: str, variant: str) -> str:
    return method if variant in ("none", "", None) else f"{method}-{variant}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed; nan for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(config: dict, suite: str) -> dict:
    """``{"cells": {label: {batch: {...}}}, "missing": [...], "chance": x}`` from the sweep's results."""
    from amorlip.report import collect

    per_cell: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs_of: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    missing, chances = [], []
    for name, rec in collect(config).items():
        run = rec["config"]
        key = label(run.method, run.variant)
        result = rec["suites"].get(suite) or {}
        agg = result.get("aggregates") or {}
        value = agg.get("mean_main")
        runs_of[key][run.batch_size].append(name)
        if value is None:
            missing.append(name)
            continue
        per_cell[key][run.batch_size].append(100.0 * float(value))
        if agg.get("chance_mean_main") is not None:
            chances.append(100.0 * float(agg["chance_mean_main"]))
    cells: dict[str, dict[int, dict]] = {}
    for key, by_batch in runs_of.items():
        cells[key] = {}
        for batch in sorted(by_batch):
            values = per_cell[key].get(batch, [])
            mean, std = mean_std(values)
            cells[key][batch] = {"mean": mean, "std": std, "n": len(values), "values": values,
                                 "runs": by_batch[batch]}
    for by_batch in cells.values():
        for batch, cell in by_batch.items():
            base = cells.get("clip", {}).get(batch)
            cell["minus_clip"] = (cell["mean"] - base["mean"]) if base and base["n"] and cell["n"] else None
    return {"cells": cells, "missing": missing, "chance": statistics.fmean(chances) if chances else None}


def plot(summary: dict, path: Path, suite: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, by_batch in sorted(summary["cells"].items()):
        pts = [(b, c["mean"], c["std"]) for b, c in sorted(by_batch.items()) if c["n"]]
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=key)
    if summary["chance"] is not None:
        ax.axhline(summary["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    batches = sorted({b for by in summary["cells"].values() for b in by})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"{suite}: mean main metric (%)")
    ax.set_title("quality at small batch (mean +- std over seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "bench-quality.yaml"))
    parser.add_argument("--suite", default="emoji-heldout")
    parser.add_argument("--workdir", default=None,
                        help="folder the config's relative paths are relative to (Snakemake's --directory; default cwd)")
    parser.add_argument("--out-dir", default=None, help="where quality.json/png go (default benchmarks/results)")
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("amorlip.report").setLevel(logging.ERROR)  # missing runs are listed below instead
    from amorlip.config import load_config

    config = load_config(args.config, check_paths=False)
    if args.workdir:
        for key, value in config["paths"].items():
            if not os.path.isabs(value):
                config["paths"][key] = str(Path(args.workdir) / value)
    summary = summarize(config, args.suite)
    batches = sorted({b for by in summary["cells"].values() for b in by})
    rows = []
    for key in sorted(summary["cells"], key=lambda k: (k != "clip", k)):
        row = [key]
        for b in batches:
            c = summary["cells"][key].get(b)
            if not c or not c["n"]:
                row.append("missing")
                continue
            delta = "" if c["minus_clip"] is None or key == "clip" else f" [{c['minus_clip']:+.2f}]"
            row.append(f"{c['mean']:.2f} +- {c['std']:.2f} ({c['n']}){delta}")
        rows.append(row)
    print_table(f"{args.suite}: mean main metric (%), mean +- std over seeds (n) [minus CLIP at the same batch]",
                ["method"] + [f"batch {b}" for b in batches], rows)
    total = sum(len(c["runs"]) for by in summary["cells"].values() for c in by.values())
    print(f"{total - len(summary['missing'])} of {total} runs have results"
          + (f"; missing: {', '.join(summary['missing'][:8])}{' ...' if len(summary['missing']) > 8 else ''}"
             if summary["missing"] else "")
          + (f"; chance level {summary['chance']:.2f} %" if summary["chance"] is not None else ""))
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    png = plot(summary, out_dir / "quality.png", args.suite)
    cells = {k: {str(b): c for b, c in v.items()} for k, v in summary["cells"].items()}
    payload = {"config": args.config, "suite": args.suite, "cells": cells, "missing": summary["missing"],
               "chance_mean_main": summary["chance"], "plot": _display_path(png) if png else None,
               "runs_with_results": total - len(summary["missing"]), "runs": total}
    write_result("quality", payload, out_dir)
    return payload


if __name__ == "__main__":
    main()
