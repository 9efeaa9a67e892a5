"""``results/summary.md``: the results for people.

The runs table (suite means, coverage, gain over the baseline with its noise), what each gain is
next to its noise (:mod:`amorlip.report.noise`), the seed-to-seed spread where the config has
several seeds, per-task tables with chance levels, each AmorLIP run's amortization figures beside
its zero-shot means, and notes (which AmorLIP variant ran, runs on different downloads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amorlip.config import VARIANT_ORIGIN
from amorlip.report.collect import data_builds, variant_of
from amorlip.report.gains import pct
from amorlip.report.noise import gain_noise, seed_spread, verdict

AMORT_MODALITIES = ("image", "text")


def cell(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def _runs_section(config: Mapping[str, Any], rows: list[dict], noise: dict) -> list[str]:
    base_m = config["report"]["baseline_method"]
    suites = config["evaluation"]["suites"]
    header = ["run", "method", "variant", "batch", "seed"]
    for s in suites:
        header += [f"{s} mean", "covered", f"gain vs {base_m} (%)", "± noise (%)"]
    header += ["steps", "images/s", "wall time (s)"]
    body = []
    for row in rows:
        cells = [row["run"], row["method"], row["variant"], str(row["batch"]), str(row["seed"])]
        for s in suites:
            gain = row[f"{s}/gain_vs_{base_m}_pct"]
            flag = " (different data)" if row.get("baseline_data_differs") else ""
            sd = noise.get(row["run"], {}).get(s, {})
            cells += [cell(row[f"{s}/mean"]), cell(row[f"{s}/covered"]),
                      "–" if gain is None else f"{gain:+.2f}{flag}",
                      "–" if sd.get("sd") is None else f"± {sd['sd']:.2f} ({sd['source']})"]
        cells += [cell(row["steps"]), cell(row["images_per_s"], 1), cell(row["wall_time_s"], 0)]
        body.append(cells)
    lines = ["## Runs", ""] + md_table(header, body) + [""]
    comparisons = []
    for row in rows:
        for s in suites:
            gain, sd = row[f"{s}/gain_vs_{base_m}_pct"], noise.get(row["run"], {}).get(s)
            if gain is None or sd is None:
                continue
            spread = "" if sd["sd"] is None else f" ± {sd['sd']:.2f} %"
            comparisons.append(f"- `{row['run']}` vs `{row['baseline_run']}` on {s}: **{gain:+.2f} %{spread}** "
                               f"({verdict(gain, sd['sd'])}; noise: {sd['text']}).")
    if comparisons:
        lines += ["Each gain with its noise, the standard deviation of a one-seed gain (source in brackets: "
                  "`seeds` = this config's seeds, `sweep` = the benchmark sweep's measured spread, "
                  "`constant` = the spread benchmarks/RESULTS.md records). A gain within two standard "
                  "deviations of zero is no verdict either way:", ""] + comparisons + [""]
    return lines


def _pm(stats: Mapping[str, Any], sign: str = "", spread: str = "std") -> str:
    if not stats["n"]:
        return "–"
    mean = f"{stats['mean']:{sign}.2f}"
    return mean if stats[spread] is None else f"{mean} ± {stats[spread]:.2f}"


def _seed_spread_section(config: Mapping[str, Any], spread: list[dict], rows: list[dict]) -> list[str]:
    if not spread:
        if len(rows) < 2:
            return []
        return ["Each setting ran with one seed, so this report cannot measure the seed-to-seed spread "
                "itself (the noise above is the benchmark sweep's); a difference smaller than that spread "
                "is noise. Add seeds (`sweep.seed`, or runs that differ only in `seed`) to see it here.", ""]
    base_m = config["report"]["baseline_method"]
    lines = ["## Seed-to-seed spread", "",
             "Settings run with several seeds: the suite mean over seeds (mean ± sample std, and the range), "
             f"the gain vs `{base_m}` at equal seed (mean ± std), and the same-seed difference to `{base_m}` in "
             "points (mean ± standard error, n pairs). A difference between methods smaller than these "
             "spreads is within seed noise; a same-seed rerun on CPU repeats bit for bit, so seeds are the "
             "noise that matters.", ""]
    header = ["method", "variant", "batch", "seeds"]
    for s in config["evaluation"]["suites"]:
        header += [f"{s} mean", "range", f"gain vs {base_m} (%)", f"difference vs {base_m} (points, ± s.e.)"]
    body = []
    for entry in spread:
        cells = [entry["method"], entry["variant"], str(entry["batch"]), ", ".join(map(str, entry["seeds"]))]
        for s in config["evaluation"]["suites"]:
            mean, gain, diff = (entry["suites"][s][k] for k in ("mean", "gain", "diff"))
            rng = "–" if not mean["n"] else f"{mean['min']:.2f} – {mean['max']:.2f}"
            paired = "–" if not diff["n"] else f"{_pm(diff, '+', 'se')} (n={diff['n']})"
            cells += [_pm(mean), rng, _pm(gain, "+"), paired]
        body.append(cells)
    return lines + md_table(header, body) + [""]


def _suite_sections(config: Mapping[str, Any], data: Mapping[str, dict]) -> list[str]:
    lines: list[str] = []
    for s in config["evaluation"]["suites"]:
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
            body.append([key, entry["main_metric"], entry.get("group") or "", cell(pct(chance))]
                        + [cell(pct((r or {}).get("tasks", {}).get(key, {}).get("main"))) for r in per_run.values()])
        groups = any_res["aggregates"].get("groups", {})
        for g in groups:
            body.append([f"**{g}**", "group mean", "", ""]
                        + [cell(pct((r or {}).get("aggregates", {}).get("groups", {}).get(g))) for r in per_run.values()])
        body.append(["**mean**", "", "", cell(pct(any_res["aggregates"].get("chance_mean_main")))]
                    + [cell(pct((r or {}).get("aggregates", {}).get("mean_main"))) for r in per_run.values()])
        lines += md_table(header, body) + [""]
        missing = [k for k, v in any_res["tasks"].items() if v.get("main_metric") and k not in covered_by_any]
        if missing:
            lines += [f"Not evaluated by any run ({len(missing)} of {any_res['aggregates']['total']}; eval set "
                      "missing or unsupported, see results/<run>/" + s + ".json): "
                      + ", ".join(f"`{k}`" for k in missing), ""]
    return lines


def _amortization_section(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict]) -> list[str]:
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
        cells += [cell(by_run.get(name, {}).get(f"{s}/mean")) for s in suites]
        for m in AMORT_MODALITIES:
            preds = ((last or {}).get("modalities", {}).get(m) or {}).get("predictors", {})
            cells += [cell((preds.get(p) or {}).get("rmse"), 4) for p in ("ema", "in_batch", "constant")]
            cells += [cell((preds.get("ema") or {}).get("corr"), 3)]
        cells += [cell(((last or {}).get("gradient_fidelity") or {}).get("cosine"), 4)]
        body.append(cells)
    lines += md_table(header, body) + [""]
    lines += ["Over epochs: `plots/amortization.png` (EMA-net vs in-batch RMSE per epoch, from metrics.jsonl). "
              "A dash: no measurement (diagnostics_every_epochs 0, or a run trained before it existed).", ""]
    return lines


def _notes(data: Mapping[str, dict]) -> list[str]:
    notes = []
    for name, info in data.items():
        if info["config"].method == "amorlip":
            run = info["config"]
            variant = variant_of(info)
            notes.append(f"- `{name}` ran AmorLIP variant **{variant}** ({VARIANT_ORIGIN.get(variant, variant)}; "
                         f"pos_coef {run.amorlip.pos_coef:g}, encoder partition `{run.amorlip.encoder_partition}`, "
                         f"lambda loss `{run.amorlip.lambda_loss}`).")
    for dataset, builds in data_builds(data).items():
        listed = "; ".join(f"`{d[:12]}`: {', '.join(f'`{r}`' for r in runs)}" for d, runs in builds.items())
        notes.append(f"- **Different data:** runs on `{dataset}` trained on {len(builds)} different downloads "
                     f"(train.json `provenance.manifest_sha256`: {listed}); numbers across them are not "
                     "comparable as they stand.")
    notes.append("- Chance: 1/classes for top-1 accuracy and mean per-class recall, 1/images for retrieval "
                 "recall@1; the suite's chance mean averages the covered tasks' chance levels.")
    return ["## Notes", ""] + notes + [""]


def summary_markdown(config: Mapping[str, Any], data: Mapping[str, dict], rows: list[dict]) -> str:
    base_m = config["report"]["baseline_method"]
    lines = [f"# {config['name']}: summary", "",
             "Zero-shot main metric of each task, in %; a dash is a task that was not evaluated (its eval set "
             "is missing), which never counts as 0. "
             f"Gain = suite mean / mean of the `{base_m}` run with the same dataset, model, batch and seed - 1, "
             "in %, shown with its seed-to-seed noise.", ""]
    lines += _runs_section(config, rows, gain_noise(config, rows))
    lines += _seed_spread_section(config, seed_spread(config, rows), rows)
    lines += _suite_sections(config, data)
    lines += _amortization_section(config, data, rows)
    lines += _notes(data)
    return "\n".join(lines)
