"""Quality at small batch (benchmarks/RESULTS.md, section 4): mean +- std over seeds of the held-out suite's mean main metric.

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
    by_seed: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    per_task: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
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
        by_seed[key][run.batch_size][run.seed] = 100.0 * float(value)
        for task, rec_task in (result.get("tasks") or {}).items():
            if rec_task.get("main") is not None:
                per_task[key][run.batch_size][task].append(100.0 * float(rec_task["main"]))
        if agg.get("chance_mean_main") is not None:
            chances.append(100.0 * float(agg["chance_mean_main"]))
    cells: dict[str, dict[int, dict]] = {}
    for key, by_batch in runs_of.items():
        cells[key] = {}
        for batch in sorted(by_batch):
            values = per_cell[key].get(batch, [])
            mean, std = mean_std(values)
            cells[key][batch] = {"mean": mean, "std": std, "n": len(values), "values": values,
                                 "runs": by_batch[batch],
                                 "tasks": {t: statistics.fmean(v) for t, v in sorted(per_task[key][batch].items())}}
    for key, by_batch in cells.items():
        for batch, cell in by_batch.items():
            base = cells.get("clip", {}).get(batch)
            has_base = bool(base and base["n"] and cell["n"])
            cell["minus_clip"] = (cell["mean"] - base["mean"]) if has_base else None
            cell["relative_to_clip"] = (cell["mean"] / base["mean"] - 1.0) if has_base and base["mean"] else None
            cell["paired"] = paired_vs_clip(by_seed[key][batch], by_seed["clip"][batch]) if key != "clip" else None
    return {"cells": cells, "missing": missing, "chance": statistics.fmean(chances) if chances else None}


def paired_vs_clip(method: dict[int, float], clip: dict[int, float]) -> dict | None:
    """Same-seed differences to CLIP (same data order and initialisation seed, so the pairing removes
    the seed-to-seed spread both methods share): mean, std, and how many seeds the method won."""
    seeds = sorted(set(method) & set(clip))
    if not seeds:
        return None
    diffs = [method[s] - clip[s] for s in seeds]
    mean, std = mean_std(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std,
            "wins": sum(d > 0 for d in diffs), "n": len(diffs)}


def pooled_vs_clip(summary: dict) -> dict[str, dict]:
    """Each method's same-seed differences to CLIP pooled over every batch size: the one-line answer."""
    out = {}
    for key, by_batch in summary["cells"].items():
        if key == "clip":
            continue
        diffs = [d for c in by_batch.values() if c.get("paired") for d in c["paired"]["diffs"]]
        clip_means = [summary["cells"]["clip"][b]["mean"] for b, c in by_batch.items() if c.get("paired")]
        if not diffs:
            continue
        mean, std = mean_std(diffs)
        base = statistics.fmean(clip_means) if clip_means else math.nan
        out[key] = {"mean_diff": mean, "std_diff": std, "wins": sum(d > 0 for d in diffs), "n": len(diffs),
                    "relative": mean / base if base else math.nan}
    return out


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
    pooled = pooled_vs_clip(summary)
    if pooled:
        rows = []
        for key, p in sorted(pooled.items()):
            row = [key]
            for b in batches:
                c = summary["cells"][key].get(b) or {}
                pr = c.get("paired")
                row.append("missing" if not pr else f"{pr['mean']:+.2f} +- {pr['std']:.2f} ({pr['wins']}/{pr['n']} won)")
            row.append(f"{p['mean_diff']:+.2f} +- {p['std_diff']:.2f} ({p['wins']}/{p['n']} won; "
                       f"{100 * p['relative']:+.1f} % rel.)")
            rows.append(row)
        print_table("same-seed difference to CLIP (points): mean +- std over seeds (seeds won)",
                    ["method"] + [f"batch {b}" for b in batches] + ["all batches"], rows)
    tasks = sorted({t for by in summary["cells"].values() for c in by.values() for t in c.get("tasks", {})})
    if tasks:
        rows = [[f"{key} b{b}"] + [f"{summary['cells'][key][b]['tasks'].get(t, math.nan):.2f}" for t in tasks]
                for key in sorted(summary["cells"], key=lambda k: (k != "clip", k))
                for b in sorted(summary["cells"][key]) if summary["cells"][key][b]["n"]]
        print_table("per task: main metric (%), mean over seeds", ["method, batch"] + tasks, rows)
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
               "runs_with_results": total - len(summary["missing"]), "runs": total, "pooled_vs_clip": pooled}
    write_result("quality", payload, out_dir)
    return payload


if __name__ == "__main__":
    main()
