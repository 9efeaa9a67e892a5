"""Which method degrades least as the batch shrinks (benchmarks/RESULTS.md, section 4).

Reads what the pipeline wrote for the sweep of ``config/bench-quality.yaml`` (``results/{run}/{suite}.json``
and ``runs/{run}/train.json`` through :func:`amorlip.report.collect`, the report's own reader), groups
runs by method / variant and batch size, and prints:

- per method and batch: ``mean +- std (n seeds)`` of the held-out suite's mean main metric (%);
- same-seed differences to CLIP at each batch, with a 95 % t confidence interval (a seed fixes the
  initialisation and the data order, so pairing removes the spread that methods share);
- the degradation: each method's ``metric(small batch) - metric(large batch)`` per seed, and its
  difference to CLIP's degradation, seed by seed, with a 95 % CI: "which method degrades least as
  the batch shrinks" is answered where that CI excludes 0, and reported as not separable otherwise;
- the minimum detectable difference of each comparison (two-sided 5 %, 80 % power, from the pair
  count and the measured spread of the pair differences);
- the AmorLIP runs' last-epoch amortization figures (the last ``kind: amortization`` record of each
  run's metrics.jsonl), mean over seeds per batch.

Values are percentages (the suite's fractions x 100), as in the pipeline's summary. Writes
``benchmarks/results/quality.json`` and a plot (``quality.png``: mean main metric vs batch size, one
line per method, error bars = std over seeds, dashed line = chance). Runs without results are
counted as missing, never as zero, and every figure says how many pairs it rests on.

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


def ci95(values: list[float]) -> dict:
    """Mean, std, standard error and the two-sided 95 % Student-t interval of ``values`` (paired differences).

    Fewer than two values give no interval (nan bounds): one pair says nothing about the spread.
    """
    from scipy.stats import t

    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    se = std / math.sqrt(n)
    half = float(t.ppf(0.975, n - 1)) * se
    return {"mean": mean, "std": std, "n": n, "se": se, "ci_low": mean - half, "ci_high": mean + half}


def min_detectable_difference(std: float, n: int, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided 5 % paired t-test on ``n`` pairs finds with ``power``.

    ``(t_{0.975, n-1} + t_{power, n-1}) * std / sqrt(n)`` (the usual normal-approximation formula with
    t quantiles), ``std`` the spread of one pair's difference.
    """
    from scipy.stats import t

    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(t.ppf(0.975, n - 1) + t.ppf(power, n - 1)) * std / math.sqrt(n)


def verdict(ci: dict) -> str:
    """"above" / "below" when the 95 % CI excludes 0, "not separable" when it holds 0, "n < 2" without one."""
    if not math.isfinite(ci.get("ci_low", math.nan)):
        return "n < 2"
    if ci["ci_low"] > 0:
        return "above"
    if ci["ci_high"] < 0:
        return "below"
    return "not separable"


def summarize(config: dict, suite: str) -> dict:
    """``{"cells": {label: {batch: {...}}}, "missing": [...], "chance": x}`` from the sweep's results."""
    from amorlip.report import collect
    from amorlip.report.collect import amortization_epochs

    per_cell: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs_of: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    by_seed: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    per_task: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    amort: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    missing, chances = [], []
    for name, rec in collect(config).items():
        run = rec["config"]
        key = label(run.method, run.variant)
        result = rec["suites"].get(suite) or {}
        agg = result.get("aggregates") or {}
        value = agg.get("mean_main")
        runs_of[key][run.batch_size].append(name)
        epochs = amortization_epochs(rec.get("curve") or [])
        if epochs:
            amort[key][run.batch_size].append(epochs[-1])
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
                                 "tasks": {t: statistics.fmean(v) for t, v in sorted(per_task[key][batch].items())},
                                 "amortization": amortization_means(amort[key].get(batch, []))}
    for key, by_batch in cells.items():
        for batch, cell in by_batch.items():
            base = cells.get("clip", {}).get(batch)
            has_base = bool(base and base["n"] and cell["n"])
            cell["minus_clip"] = (cell["mean"] - base["mean"]) if has_base else None
            cell["relative_to_clip"] = (cell["mean"] / base["mean"] - 1.0) if has_base and base["mean"] else None
            cell["paired"] = paired_vs_clip(by_seed[key][batch], by_seed["clip"][batch]) if key != "clip" else None
    by_seed_plain = {k: {b: dict(v) for b, v in by.items()} for k, by in by_seed.items()}
    return {"cells": cells, "missing": missing, "chance": statistics.fmean(chances) if chances else None,
            "by_seed": by_seed_plain, "degradation": degradation(by_seed_plain)}


AMORT_FIGURES = (("image", "ema", "rmse"), ("image", "in_batch", "rmse"), ("text", "ema", "rmse"),
                 ("text", "in_batch", "rmse"), ("image", "ema", "corr"), ("text", "ema", "corr"))


def amortization_means(records: list[dict]) -> dict | None:
    """Mean over seeds of the last-epoch amortization figures (lambda-net RMSE vs the in-batch estimate's,
    EMA-net correlation, gradient cosine) of a cell's AmorLIP runs; None for other methods.

    ``records``: each run's last ``kind: amortization`` line of metrics.jsonl (flat ``amort/<modality>/
    <predictor>_<stat>`` figures). metrics.jsonl rather than train.json: it holds every epoch's record
    whatever happened to the process that wrote it (a run resumed after its last epoch end by an older
    version reports none in train.json)."""
    if not records:
        return None
    out: dict[str, float | int] = {"n": len(records), "epoch": max(r.get("epoch", -1) for r in records)}
    for modality, predictor, stat in AMORT_FIGURES:
        vals = [r.get(f"amort/{modality}/{predictor}_{stat}") for r in records]
        vals = [float(v) for v in vals if v is not None]
        out[f"{modality}_{predictor}_{stat}"] = statistics.fmean(vals) if vals else math.nan
    cos = [float(r["amort/grad_cosine"]) for r in records if r.get("amort/grad_cosine") is not None]
    out["grad_cosine"] = statistics.fmean(cos) if cos else math.nan
    return out


def degradation(by_seed: dict[str, dict[int, dict[int, float]]]) -> dict:
    """Per method: metric(small batch) - metric(large batch), seed by seed, and its difference to CLIP's.

    Small and large are the smallest and the largest batch of the sweep. ``drop`` < 0 means the method
    loses quality as the batch shrinks; ``vs_clip`` > 0 means it loses less than CLIP (same seeds only).
    """
    batches = sorted({b for by in by_seed.values() for b in by})
    if len(batches) < 2:
        return {}
    small, large = batches[0], batches[-1]

    def drops(key: str) -> dict[int, float]:
        cells = by_seed.get(key, {})
        lo, hi = cells.get(small, {}), cells.get(large, {})
        return {s: lo[s] - hi[s] for s in sorted(set(lo) & set(hi))}

    clip = drops("clip")
    out = {}
    for key in sorted(by_seed):
        own = drops(key)
        entry = {"small": small, "large": large, "drop": {**ci95(list(own.values())), "seeds": sorted(own)}}
        if key != "clip":
            seeds = sorted(set(own) & set(clip))
            entry["vs_clip"] = {**ci95([own[s] - clip[s] for s in seeds]), "seeds": seeds}
        out[key] = entry
    return out


def paired_vs_clip(method: dict[int, float], clip: dict[int, float]) -> dict | None:
    """Same-seed differences to CLIP (same data order and initialisation seed, so the pairing removes
    the seed-to-seed spread both methods share): mean, std, and how many seeds the method won."""
    seeds = sorted(set(method) & set(clip))
    if not seeds:
        return None
    diffs = [method[s] - clip[s] for s in seeds]
    return {**ci95(diffs), "seeds": seeds, "diffs": diffs, "wins": sum(d > 0 for d in diffs)}


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
        ci = ci95(diffs)
        base = statistics.fmean(clip_means) if clip_means else math.nan
        out[key] = {"mean_diff": ci["mean"], "std_diff": ci["std"], "wins": sum(d > 0 for d in diffs), "n": len(diffs),
                    "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                    "relative": ci["mean"] / base if base else math.nan}
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


def _ci_text(ci: dict) -> str:
    if not ci.get("n", 1):
        return "missing"
    if not math.isfinite(ci.get("ci_low", math.nan)):
        return f"{ci['mean']:+.2f} [n < 2]"
    return f"{ci['mean']:+.2f} [{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}]"


def detectable(summary: dict, pooled: dict) -> dict[str, dict]:
    """Minimum detectable difference of each comparison the sweep makes, from its own pair spread.

    Per batch (method - CLIP, pairs = seeds), pooled over batches, and the degradation difference
    (pairs = seeds): the spread used is the pooled std of that comparison's pair differences over methods.
    """
    out = {}
    batches = sorted({b for by in summary["cells"].values() for b in by})
    for b in batches:
        pairs = [c["paired"] for by in summary["cells"].values() for bb, c in by.items()
                 if bb == b and c.get("paired") and c["paired"]["n"] > 1]
        if pairs:
            n = min(p["n"] for p in pairs)
            std = math.sqrt(statistics.fmean([p["std"] ** 2 for p in pairs]))
            out[f"method - CLIP at batch {b}"] = {"n": n, "std": std, "mde": min_detectable_difference(std, n)}
    pools = [p for p in pooled.values() if p["n"] > 1]
    if pools:
        n = min(p["n"] for p in pools)
        std = math.sqrt(statistics.fmean([p["std_diff"] ** 2 for p in pools]))
        out["method - CLIP, all batches"] = {"n": n, "std": std, "mde": min_detectable_difference(std, n)}
    degs = [d["vs_clip"] for d in summary["degradation"].values() if d.get("vs_clip") and d["vs_clip"]["n"] > 1]
    if degs:
        n = min(d["n"] for d in degs)
        std = math.sqrt(statistics.fmean([d["std"] ** 2 for d in degs]))
        out["degradation minus CLIP's"] = {"n": n, "std": std, "mde": min_detectable_difference(std, n)}
    return out


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
                row.append("missing" if not pr else f"{_ci_text(pr)} ({pr['wins']}/{pr['n']} won)")
            row.append(f"{_ci_text({'mean': p['mean_diff'], **p})} ({p['wins']}/{p['n']} won; "
                       f"{100 * p['relative']:+.1f} % rel.)")
            rows.append(row)
        print_table("same-seed difference to CLIP (points): mean [95 % CI] (seeds won)",
                    ["method"] + [f"batch {b}" for b in batches] + ["all batches"], rows)
    deg = summary["degradation"]
    if deg:
        small, large = next(iter(deg.values()))["small"], next(iter(deg.values()))["large"]
        rows = []
        for key in sorted(deg, key=lambda k: (k != "clip", k)):
            d = deg[key]
            vs = d.get("vs_clip")
            rows.append([key, f"{_ci_text(d['drop'])} (n {d['drop']['n']})",
                         "–" if vs is None else f"{_ci_text(vs)} (n {vs['n']})",
                         "–" if vs is None else verdict(vs)])
        print_table(f"degradation batch {large} -> {small} (points; < 0: worse at the small batch): mean [95 % CI]",
                    ["method", f"metric(b{small}) - metric(b{large})", "minus CLIP's (same seeds)",
                     "vs CLIP (CI excludes 0?)"], rows)
    mde = detectable(summary, pooled)
    if mde:
        rows = [[name, str(m["n"]), f"{m['std']:.2f}", f"{m['mde']:.2f}"] for name, m in mde.items()]
        print_table("minimum detectable difference (two-sided 5 %, 80 % power) from the measured spread of the "
                    "pair differences", ["comparison", "pairs", "std of a pair (points)", "MDE (points)"], rows)
    amort_rows = [[f"{key} b{b}", str(c["amortization"]["n"]), str(c["amortization"]["epoch"])]
                  + [f"{c['amortization'][f'{m}_{p}_{st}']:.4f}" for m, p, st in AMORT_FIGURES]
                  + [f"{c['amortization']['grad_cosine']:.4f}"]
                  for key in sorted(summary["cells"]) for b, c in sorted(summary["cells"][key].items())
                  if c.get("amortization")]
    if amort_rows:
        print_table("AmorLIP amortization at the last epoch (metrics.jsonl), mean over seeds: lambda-net (ema) vs "
                    "in-batch RMSE of log Z, ema correlation, gradient cosine",
                    ["method, batch", "runs", "epoch"] + [f"{m} {p} {st}" for m, p, st in AMORT_FIGURES]
                    + ["grad cosine"], amort_rows)
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
               "runs_with_results": total - len(summary["missing"]), "runs": total, "pooled_vs_clip": pooled,
               "degradation": summary["degradation"], "detectable": mde}
    write_result("quality", payload, out_dir)
    return payload


if __name__ == "__main__":
    main()
