"""The pipeline's last step: one table row per run, plots, and everything on the MLflow parent run.

Reads ``results/{run}/{suite}.json`` (the evaluator's contract) and ``runs/{run}/train.json`` and
``metrics.jsonl`` (the trainer's) for every run of the config, and writes:

- ``results/summary.csv``: one row per run: run, method, variant, batch, seed, each task's main
  metric, group means, suite mean, its coverage, relative gain over the matching baseline, steps.
  Metric values are percentages; a missing task is an empty cell, never 0. Only results: the same
  config and seed give the same file byte for byte (docs/architecture.md, "Determinism").
- ``results/timing.csv``: run, steps, images/s, wall time: measurements of the machine, which vary
  from one rerun to the next, kept apart from the results.
- ``results/summary.md``: the same for people, plus per-task tables with chance levels and which
  AmorLIP variant ran.
- ``results/plots/*.png``: training loss curves per run; per suite, a bar chart of each task's main
  metric with the runs side by side and chance marked.

The relative gain is ``mean / baseline mean - 1`` in percent (the paper's "12.24%" is 24.11 / 21.48
- 1 on Avg 38), against the run of ``report.baseline_method`` with the same dataset, model, batch
size and seed, and only when both runs cover the same tasks (otherwise the means are not comparable).

Two checks keep a comparison honest. Runs whose train.json records different
``provenance.manifest_sha256`` values (amorlip/provenance.py) trained on different downloaded sample
sets: the gain is still computed but flagged (``baseline_data_differs``, a note in summary.md). And
a difference between two methods means little next to the spread of one method over seeds, so where
the config has several seeds of one setting, summary.md shows each setting's mean +- std over seeds
and the spread of its gain right below the runs table.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.config import RunConfig, expand_runs, tracking_uri
from amorlip.fileio import atomic_path, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

VARIANT_TEXT = {
    "published": "what the authors' code ran: Lambda = mixed target, pos_coef 1e-3",
    "paper": "the paper's Eq. 6: Lambda = EMA lambda net, pos_coef 1",
}


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("%s not found; its cells stay empty", path)
    except ValueError as exc:
        log.warning("%s is not valid JSON (%s); its cells stay empty", path, exc)
    return None


def collect(config: Mapping[str, Any]) -> dict[str, dict]:
    """Per run: its RunConfig, train.json, metrics.jsonl records and ``{suite: results}``."""
    runs_dir, results_dir = Path(config["paths"]["runs"]), Path(config["paths"]["results"])
    out = {}
    for name, run in expand_runs(config).items():
        out[name] = {
            "config": run,
            "train": _read_json(runs_dir / name / "train.json") or {},
            "curve": read_jsonl(runs_dir / name / "metrics.jsonl"),
            "suites": {s: _read_json(results_dir / name / f"{s}.json") for s in config["evaluation"]["suites"]},
        }
    return out


# --------------------------------------------------------------------------- the table


def _pct(value: float | None) -> float | None:
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


def _covered_keys(res: Mapping[str, Any] | None) -> frozenset[str]:
    return frozenset(k for k, v in (res or {}).get("tasks", {}).items() if "main" in v)


def data_digest(info: Mapping[str, Any]) -> str | None:
    """The run's ``provenance.manifest_sha256`` from train.json (None when not recorded)."""
    prov = info["train"].get("provenance")
    return prov.get("manifest_sha256") if isinstance(prov, Mapping) else None


def data_differs(info: Mapping[str, Any], other: Mapping[str, Any]) -> bool | None:
    """True when both runs record a data digest and the digests differ; None when either is unknown."""
    a, b = data_digest(info), data_digest(other)
    return None if a is None or b is None else a != b


def data_builds(data: Mapping[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per dataset with more than one recorded data digest: ``{digest: [runs]}`` (runs on different
    builds of the same dataset, whose numbers are not comparable as they stand)."""
    by_dataset: dict[str, dict[str, list[str]]] = {}
    for name, info in data.items():
        digest = data_digest(info)
        if digest is not None:
            by_dataset.setdefault(info["config"].dataset, {}).setdefault(digest, []).append(name)
    return {ds: builds for ds, builds in by_dataset.items() if len(builds) > 1}


def _variant(info: Mapping[str, Any]) -> str:
    run: RunConfig = info["config"]
    return info["train"].get("variant") or run.variant


def summary_rows(config: Mapping[str, Any], data: Mapping[str, dict]) -> tuple[list[str], list[dict]]:
    """CSV columns and one row per run (percentages; None for unknown/missing)."""
    runs = {name: info["config"] for name, info in data.items()}
    baseline_method = config["report"]["baseline_method"]
    suites = config["evaluation"]["suites"]
    columns = ["run", "method", "variant", "dataset", "model", "batch", "seed"]
    task_cols: dict[str, list[str]] = {s: [] for s in suites}
    group_cols: dict[str, list[str]] = {s: [] for s in suites}
    for info in data.values():
        for s in suites:
            res = info["suites"].get(s) or {}
            for key in res.get("tasks", {}):
                if key not in task_cols[s] and (res["tasks"][key].get("main_metric")):
                    task_cols[s].append(key)
            for g in res.get("aggregates", {}).get("groups", {}):
                if g not in group_cols[s]:
                    group_cols[s].append(g)
    for s in suites:
        columns += [f"{s}/{k}" for k in task_cols[s]] + [f"{s}/group/{g}" for g in group_cols[s]]
        columns += [f"{s}/mean", f"{s}/covered", f"{s}/gain_vs_{baseline_method}_pct"]
    columns += ["baseline_run", "baseline_data_differs", "steps", "images_per_s", "wall_time_s"]

    rows = []
    for name, info in data.items():
        run: RunConfig = info["config"]
        base = baseline_for(run, runs, baseline_method)
        row: dict[str, Any] = {"run": name, "method": run.method, "variant": _variant(info),
                               "dataset": run.dataset, "model": run.model, "batch": run.batch_size,
                               "seed": run.seed, "baseline_run": base,
                               "baseline_data_differs": None if base is None else data_differs(info, data[base])}
        if row["baseline_data_differs"]:
            log.warning("%s vs %s: trained on different data (manifest digests %s vs %s); the gain is flagged",
                        name, base, (data_digest(info) or "")[:12], (data_digest(data[base]) or "")[:12])
        for s in suites:
            res = info["suites"].get(s) or {}
            tasks, agg = res.get("tasks", {}), res.get("aggregates", {})
            for key in task_cols[s]:
                row[f"{s}/{key}"] = _pct(tasks.get(key, {}).get("main"))
            for g in group_cols[s]:
                row[f"{s}/group/{g}"] = _pct(agg.get("groups", {}).get(g))
            row[f"{s}/mean"] = _pct(agg.get("mean_main"))
            row[f"{s}/covered"] = f"{agg['covered']}/{agg['total']}" if agg else None
            gain = None
            if base is not None:
                base_res = data[base]["suites"].get(s)
                if base_res and _covered_keys(base_res) == _covered_keys(res):
                    gain = relative_gain(agg.get("mean_main"), base_res["aggregates"].get("mean_main"))
                elif base_res:
                    log.warning("%s vs %s on %s: different task coverage; no relative gain", name, base, s)
            row[f"{s}/gain_vs_{baseline_method}_pct"] = None if gain is None else round(gain, 4)
        train = info["train"]
        row["steps"] = train.get("steps")
        row["images_per_s"] = None if train.get("images_per_s") is None else round(float(train["images_per_s"]), 2)
        row["wall_time_s"] = None if train.get("wall_time_s") is None else round(float(train["wall_time_s"]), 1)
        rows.append(row)
    return columns, rows


# wall-clock measurements: they differ between two runs of the same config and seed, so they live in
# results/timing.csv and summary.md, not in the results table
TIMING_COLUMNS = ("images_per_s", "wall_time_s")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return path


# --------------------------------------------------------------------------- markdown


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def summary_markdown(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict]) -> str:
    suites = config["evaluation"]["suites"]
    base_m = config["report"]["baseline_method"]
    lines = [f"# {config['name']}: summary", "",
             "Zero-shot main metric of each task, in %; a dash is a task that was not evaluated (its eval set "
             "is missing), which never counts as 0. "
             f"Gain = suite mean / mean of the `{base_m}` run with the same dataset, model, batch and seed - 1, in %.",
             ""]
    header = ["run", "method", "variant", "batch", "seed"]
    for s in suites:
        header += [f"{s} mean", "covered", f"gain vs {base_m} (%)"]
    header += ["steps", "images/s", "wall time (s)"]
    body = []
    for row in rows:
        cells = [row["run"], row["method"], row["variant"], str(row["batch"]), str(row["seed"])]
        for s in suites:
            gain = row[f"{s}/gain_vs_{base_m}_pct"]
            flag = " (different data)" if row.get("baseline_data_differs") else ""
            cells += [_cell(row[f"{s}/mean"]), _cell(row[f"{s}/covered"]),
                      "–" if gain is None else f"{gain:+.2f}{flag}"]
        cells += [_cell(row["steps"]), _cell(row["images_per_s"], 1), _cell(row["wall_time_s"], 0)]
        body.append(cells)
    lines += ["## Runs", ""] + _md_table(header, body) + [""]
    lines += _seed_spread_markdown(config, seed_spread(config, rows), rows)

    for s in suites:
        per_run = {name: info["suites"].get(s) for name, info in data.items()}
        any_res = next((r for r in per_run.values() if r), None)
        if any_res is None:
            lines += [f"## {s}", "", "No results.", ""]
            continue
        lines += [f"## {s}: per task (%)", ""]
        header = ["task", "main metric", "group", "chance"] + list(per_run)
        body = []
        covered_by_any = {k for r in per_run.values() if r for k, v in r["tasks"].items() if "main" in v}
        for key, entry in any_res["tasks"].items():
            if not entry.get("main_metric") or key not in covered_by_any:
                continue  # listed below as not evaluated
            chance = next((r["tasks"].get(key, {}).get("chance") for r in per_run.values()
                           if r and r["tasks"].get(key, {}).get("chance") is not None), None)
            body.append([key, entry["main_metric"], entry.get("group") or "", _cell(_pct(chance))]
                        + [_cell(_pct((r or {}).get("tasks", {}).get(key, {}).get("main"))) for r in per_run.values()])
        groups = any_res["aggregates"].get("groups", {})
        for g in groups:
            body.append([f"**{g}**", "group mean", "", ""]
                        + [_cell(_pct((r or {}).get("aggregates", {}).get("groups", {}).get(g))) for r in per_run.values()])
        body.append(["**mean**", "", "", _cell(_pct(any_res["aggregates"].get("chance_mean_main")))]
                    + [_cell(_pct((r or {}).get("aggregates", {}).get("mean_main"))) for r in per_run.values()])
        lines += _md_table(header, body) + [""]
        missing = [k for k, v in any_res["tasks"].items() if v.get("main_metric") and k not in covered_by_any]
        if missing:
            lines += [f"Not evaluated by any run ({len(missing)} of {any_res['aggregates']['total']}; eval set "
                      "missing or unsupported, see results/<run>/" + s + ".json): "
                      + ", ".join(f"`{k}`" for k in missing), ""]

    lines += _amortization_markdown(config, data, rows)

    notes = []
    for name, info in data.items():
        if info["config"].method == "amorlip":
            run = info["config"]
            variant = _variant(info)
            notes.append(f"- `{name}` ran AmorLIP variant **{variant}** ({VARIANT_TEXT.get(variant, variant)}; "
                         f"pos_coef {run.amorlip.pos_coef:g}, encoder partition `{run.amorlip.encoder_partition}`, "
                         f"lambda loss `{run.amorlip.lambda_loss}`).")
    for dataset, builds in data_builds(data).items():
        listed = "; ".join(f"`{d[:12]}`: {', '.join(f'`{r}`' for r in runs)}" for d, runs in builds.items())
        notes.append(f"- **Different data:** runs on `{dataset}` trained on {len(builds)} different downloads "
                     f"(train.json `provenance.manifest_sha256`: {listed}); numbers across them are not "
                     "comparable as they stand.")
    notes.append("- Chance: 1/classes for top-1 accuracy and mean per-class recall, 1/images for retrieval "
                 "recall@1; the suite's chance mean averages the covered tasks' chance levels.")
    lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- amortization


AMORT_MODALITIES = ("image", "text")


def amortization_epochs(records: list[dict]) -> list[dict]:
    """The trainer's per-epoch amortization records of a metrics.jsonl (``kind: amortization``), by step."""
    return sorted((r for r in records if r.get("kind") == "amortization"), key=lambda r: r["step"])


def _amortization_markdown(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict]) -> list[str]:
    """Each AmorLIP run's last-epoch amortization figures (train.json) beside its zero-shot suite means."""
    amor = [name for name, info in data.items() if info["config"].method == "amorlip"]
    if not amor:
        return []
    suites = config["evaluation"]["suites"]
    by_run = {row["run"]: row for row in rows}
    lines = ["## Amortization (AmorLIP runs)", "",
             "The lambda nets' log-partition estimates at the end of the last epoch, on a probe of training "
             "samples, against the population target at the run's global batch (docs/architecture.md, "
             "\"Amortization diagnostics\"): RMSE of the EMA net, of the batch's own in-batch estimate and of "
             "a constant (the target's spread), the EMA net's correlation with the target, and the gradient "
             "fidelity (cosine between one batch's encoder gradient and the whole probe's). A lambda net "
             "whose RMSE is not below the constant's has learnt nothing sample-specific; one not below the "
             "in-batch RMSE gives the encoders nothing a plain batch would not.", ""]
    header = ["run", "epoch"] + [f"{s} mean" for s in suites]
    for m in AMORT_MODALITIES:
        header += [f"{m} ema rmse", f"{m} in-batch rmse", f"{m} constant rmse", f"{m} ema corr"]
    header += ["grad cosine"]
    body = []
    for name in amor:
        last = data[name]["train"].get("amortization")
        cells = [name, "–" if not last else str(last["epoch"])]
        cells += [_cell(by_run.get(name, {}).get(f"{s}/mean")) for s in suites]
        for m in AMORT_MODALITIES:
            preds = ((last or {}).get("modalities", {}).get(m) or {}).get("predictors", {})
            cells += [_cell((preds.get(p) or {}).get("rmse"), 4) for p in ("ema", "in_batch", "constant")]
            cells += [_cell((preds.get("ema") or {}).get("corr"), 3)]
        cells += [_cell(((last or {}).get("gradient_fidelity") or {}).get("cosine"), 4)]
        body.append(cells)
    lines += _md_table(header, body) + [""]
    lines += ["Over epochs: `plots/amortization.png` (EMA-net vs in-batch RMSE per epoch, from metrics.jsonl). "
              "A dash: no measurement (diagnostics_every_epochs 0, or a run trained before it existed).", ""]
    return lines


def plot_amortization(data: Mapping[str, dict], out: Path) -> Path | None:
    """One panel per AmorLIP run: EMA lambda-net RMSE and in-batch RMSE against epoch, per modality."""
    curves = {name: amortization_epochs(info["curve"]) for name, info in data.items()
              if info["config"].method == "amorlip"}
    curves = {name: recs for name, recs in curves.items() if recs}
    if not curves:
        return None
    plt = _pyplot()
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
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- seed spread


def _spread(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def seed_spread(config: Mapping[str, Any], rows: list[dict]) -> list[dict]:
    """Settings (method, variant, dataset, model, batch) run with two or more seeds: per suite, the
    spread over seeds of the suite mean (``mean``) and of the gain over the baseline (``gain``), each
    ``{"n", "mean", "std" (sample), "min", "max"}`` in the summary's units (% and % gain)."""
    base_m = config["report"]["baseline_method"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["method"], row["variant"], row["dataset"], row["model"], row["batch"])
        groups.setdefault(key, []).append(row)
    out = []
    for (method, variant, dataset, model, batch), members in groups.items():
        seeds = sorted({r["seed"] for r in members})
        if len(seeds) < 2:
            continue
        suites = {}
        for s in config["evaluation"]["suites"]:
            suites[s] = {
                "mean": _spread([r[f"{s}/mean"] for r in members if r.get(f"{s}/mean") is not None]),
                "gain": _spread([r[f"{s}/gain_vs_{base_m}_pct"] for r in members
                                 if r.get(f"{s}/gain_vs_{base_m}_pct") is not None]),
            }
        out.append({"method": method, "variant": variant, "dataset": dataset, "model": model, "batch": batch,
                    "seeds": seeds, "runs": [r["run"] for r in members], "suites": suites})
    return out


def _pm(stats: Mapping[str, Any], sign: str = "") -> str:
    if not stats["n"]:
        return "–"
    mean = f"{stats['mean']:{sign}.2f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.2f}"


def _seed_spread_markdown(config: Mapping[str, Any], spread: list[dict], rows: list[dict]) -> list[str]:
    if not spread:
        if len(rows) < 2:
            return []
        return ["Each setting ran with one seed, so the seed-to-seed spread is not known from this report; "
                "a difference smaller than that spread is noise. Add seeds (`sweep.seed`, or runs that "
                "differ only in `seed`) to see it here.", ""]
    base_m = config["report"]["baseline_method"]
    lines = ["## Seed-to-seed spread", "",
             "Settings run with several seeds: the suite mean over seeds (mean ± sample std, and the range) "
             f"and the gain vs `{base_m}` at equal seed. A difference between methods smaller than these "
             "spreads is within seed noise; a same-seed rerun on CPU repeats bit for bit, so seeds are the "
             "noise that matters.", ""]
    header = ["method", "variant", "batch", "seeds"]
    for s in config["evaluation"]["suites"]:
        header += [f"{s} mean", "range", f"gain vs {base_m} (%)"]
    body = []
    for entry in spread:
        cells = [entry["method"], entry["variant"], str(entry["batch"]), ", ".join(map(str, entry["seeds"]))]
        for s in config["evaluation"]["suites"]:
            mean, gain = entry["suites"][s]["mean"], entry["suites"][s]["gain"]
            rng = "–" if not mean["n"] else f"{mean['min']:.2f} – {mean['max']:.2f}"
            cells += [_pm(mean), rng, _pm(gain, "+")]
        body.append(cells)
    return lines + _md_table(header, body) + [""]


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_series(records: list[dict]) -> tuple[dict[str, list], dict[str, list]]:
    """``(encoder, lambda)``: each loss term's ``(step, value)`` points, the lambda-net losses apart.

    A term that repeats another point for point (CLIP logs its objective as both ``clip_loss`` and
    ``loss``) is kept once, under its specific name.
    """
    keys = sorted({k for r in records for k in r if k == "loss" or k.endswith("_loss")},
                  key=lambda k: (k == "loss", k))  # specific names first: they win over "loss"
    series: dict[str, list] = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts and pts not in series.values():
            series[key] = pts
    lam = {k: v for k, v in series.items() if k.startswith("lambda")}
    return {k: v for k, v in series.items() if k not in lam}, lam


def panel_title(name: str, method: str) -> str:
    """The run name, with the method only when the name does not already say it."""
    return name if method in name.split("-") else f"{name} ({method})"


def draw_loss_panel(ax, name: str, method: str, records: list[dict]) -> None:
    """Encoder losses on the left axis (linear); lambda-net losses, whose spikes at epoch starts span
    decades, on their own log-scale right axis, so neither flattens the other."""
    encoder, lam = loss_series(records)
    lines = [ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)[0] for key, pts in encoder.items()]
    ax.set_ylabel("encoder loss")
    if lam:
        right = ax.twinx()
        for i, (key, pts) in enumerate(lam.items()):
            lines += right.plot([p[0] for p in pts], [p[1] for p in pts], label=key, color=f"C{len(encoder) + i}",
                                alpha=0.7, linewidth=0.8)
        values = [v for pts in lam.values() for _, v in pts]
        right.set_yscale("log" if min(values) > 0 else "symlog")
        right.set_ylabel("lambda loss (log)" if min(values) > 0 else "lambda loss (symlog)")
    ax.set_title(panel_title(name, method))
    ax.set_xlabel("step")
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)


def plot_loss_curves(data: Mapping[str, dict], out: Path) -> Path | None:
    """One panel per run: every logged loss term against step (objectives differ in scale)."""
    curves = {name: info["curve"] for name, info in data.items() if info["curve"]}
    if not curves:
        log.warning("no metrics.jsonl found; no loss-curve plot")
        return None
    plt = _pyplot()
    ncols = min(4, len(curves))
    nrows = -(-len(curves) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (name, records) in zip(axes.flat, curves.items()):
        draw_loss_panel(ax, name, data[name]["config"].method, records)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_suite_bars(suite: str, data: Mapping[str, dict], out: Path) -> Path | None:
    """Each task's main metric (%), runs side by side, chance as a black tick; missing tasks: no bar."""
    per_run = {name: info["suites"].get(suite) for name, info in data.items() if info["suites"].get(suite)}
    if not per_run:
        return None
    keys = [k for k, v in next(iter(per_run.values()))["tasks"].items() if v.get("main_metric")]
    plt = _pyplot()
    width = 0.8 / len(per_run)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(keys) * max(1, len(per_run)) + 2), 3.8))
    for i, (name, res) in enumerate(per_run.items()):
        xs = [j + (i - (len(per_run) - 1) / 2) * width for j in range(len(keys))]
        vals = [_pct(res["tasks"].get(k, {}).get("main")) for k in keys]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width, label=name)
    labelled = False
    for j, key in enumerate(keys):
        chance = next((r["tasks"].get(key, {}).get("chance") for r in per_run.values()
                       if r["tasks"].get(key, {}).get("chance") is not None), None)
        if chance is not None:
            ax.hlines(100 * chance, j - 0.45, j + 0.45, colors="black", linestyles="--", linewidth=1,
                      label=None if labelled else "chance")
            labelled = True
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=45 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center", fontsize=8)
    ax.set_ylabel("main metric (%)")
    ax.set_title(f"{suite}: zero-shot main metric per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- the pipeline step


def parent_metrics(config: Mapping[str, Any], rows: list[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """The pipeline's results with keys that hold no run name, so they compare across pipelines:
    ``eval/<suite>/best_mean_main`` and ``eval/<suite>/best_gain_vs_<baseline>_pct`` (percent), and
    as params which run reached each (``eval.<suite>.best_run``, ``eval.<suite>.best_gain_run``).
    The per-run values live on the training runs (``eval/<suite>/...``)."""
    base_m = config["report"]["baseline_method"]
    metrics: dict[str, float] = {}
    best: dict[str, str] = {}
    for s in config["evaluation"]["suites"]:
        for col, metric, param in ((f"{s}/mean", f"eval/{s}/best_mean_main", f"eval.{s}.best_run"),
                                   (f"{s}/gain_vs_{base_m}_pct", f"eval/{s}/best_gain_vs_{base_m}_pct",
                                    f"eval.{s}.best_gain_run")):
            scored = [(row[col], row["run"]) for row in rows if row.get(col) is not None]
            if scored:
                value, run = max(scored)
                metrics[metric], best[param] = value, run
    return metrics, best


def log_gains_to_training_runs(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict]) -> None:
    """Each run's gain over its baseline (``eval/<suite>/gain_vs_<baseline>_pct``) on its training run."""
    from amorlip.tracking import attach_run

    base_m = config["report"]["baseline_method"]
    offline_dir = Path(config["paths"]["results"]) / "mlflow-offline"
    for row in rows:
        gains = {f"eval/{s}/gain_vs_{base_m}_pct": row.get(f"{s}/gain_vs_{base_m}_pct")
                 for s in config["evaluation"]["suites"]}
        gains = {k: v for k, v in gains.items() if v is not None}
        if not gains:
            continue
        run_id = (data[row["run"]].get("train") or {}).get("mlflow_run_id")
        tracker = attach_run(config, run_id, offline_dir / f"train-report-{row['run']}.jsonl")
        if tracker is not None:
            tracker.log_metrics(gains, step=0)


def report(config: Mapping[str, Any]) -> dict[str, Path]:
    """``amorlip report``: summary.csv / summary.md / plots, all logged to the MLflow parent run."""
    from amorlip.tracking import log_to_parent

    results_dir = Path(config["paths"]["results"])
    plots = results_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    data = collect(config)
    columns, rows = summary_rows(config, data)
    csv_path = write_csv(results_dir / "summary.csv", [c for c in columns if c not in TIMING_COLUMNS], rows)
    write_csv(results_dir / "timing.csv", ["run", "steps", *TIMING_COLUMNS], rows)
    md_path = results_dir / "summary.md"
    atomic_write_text(md_path, summary_markdown(config, data, rows))
    pngs = [p for p in [plot_loss_curves(data, plots / "loss_curves.png"),
                        plot_amortization(data, plots / "amortization.png")]
            + [plot_suite_bars(s, data, plots / f"{s}_tasks.png") for s in config["evaluation"]["suites"]] if p]

    base_m = config["report"]["baseline_method"]
    metrics, best = parent_metrics(config, rows)
    log_gains_to_training_runs(config, data, rows)
    log_to_parent(config, metrics=metrics, artifacts=[csv_path, md_path, *pngs],
                  params={"runs": ",".join(data), "suites": ",".join(config["evaluation"]["suites"]),
                          "baseline_method": base_m, **best})
    log.info("report: %d run(s) -> %s, %s, %d plot(s) in %s", len(rows), csv_path, md_path, len(pngs), plots)
    return {"csv": csv_path, "md": md_path, **{p.stem: p for p in pngs}}


def print_demo_summary(config: Mapping[str, Any]) -> None:
    """Print summary.md, where the outputs are, and the command that opens MLflow."""
    results_dir = Path(config["paths"]["results"])
    md = results_dir / "summary.md"
    if not md.exists():
        print(f"No summary yet ({md} not found): run the pipeline first (make demo).")
        return
    print(md.read_text())
    print("Outputs:")
    print(f"  table   {results_dir / 'summary.csv'}  and  {md}")
    print(f"  plots   {results_dir / 'plots'}/")
    print(f"  per run {results_dir}/<run>/<suite>.json, {config['paths']['runs']}/<run>/train.json")
    print("Browse every run (parent pipeline run with one child per train / evaluate job):")
    print(f"  mlflow ui --backend-store-uri {tracking_uri(config)}")
