"""How much a gain would move with another seed: the noise printed next to every gain.

A same-seed rerun on CPU repeats bit for bit, so seeds are the noise that matters. A one-seed demo
that prints "AmorLIP vs CLIP: -15.85 %" says little when the seed-to-seed spread of that difference
is as large. Three sources, best first:

1. ``seeds``: the config ran the setting and its baseline with two or more shared seeds. The
   per-seed gains give the spread of a one-seed gain (sample std) and the paired differences in
   points give the setting's mean +- standard error (:func:`paired_differences`).
2. ``sweep``: the recorded spread of the benchmark sweep (``make bench-quality``,
   ``benchmarks/results/quality.json``): the std over 9 same-seed pairs of the method's difference
   to CLIP on that sweep's suite, in points, as a fraction of this run's baseline mean.
3. ``constant``: without that file, the spread benchmarks/RESULTS.md section 4 reports: the suite
   mean's std over seeds of 1-2.6 points (emoji-heldout, 36 runs at batch 32-128); the upper end
   is used, named as such.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SWEEP_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quality.json"
SWEEP_COMMAND = "make bench-quality"
# benchmarks/RESULTS.md section 4: std of the emoji-heldout mean over 3 seeds, per method and batch
SWEEP_SPREAD_POINTS = (1.0, 2.6)
SWEEP_SPREAD_TEXT = (f"seed spread 1-2.6 points measured by {SWEEP_COMMAND}, benchmarks/RESULTS.md section 4 "
                     "(std of the emoji-heldout mean over 3 seeds; the upper end is used)")


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "se": None, "min": None, "max": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"n": len(values), "mean": statistics.fmean(values), "std": std,
            "se": None if std is None else std / math.sqrt(len(values)), "min": min(values), "max": max(values)}


def _setting(row: Mapping[str, Any]) -> tuple:
    return (row["method"], row["variant"], row["dataset"], row["model"], row["batch"])


def seed_spread(config: Mapping[str, Any], rows: list[dict]) -> list[dict]:
    """Settings (method, variant, dataset, model, batch) run with two or more seeds: per suite, the
    spread over seeds of the suite mean (``mean``), of the gain over the baseline (``gain``, %) and
    of the same-seed difference to the baseline (``diff``, points), each ``{"n", "mean", "std"
    (sample), "se" (std / sqrt n), "min", "max"}`` in the summary's units."""
    base_m = config["report"]["baseline_method"]
    by_run = {r["run"]: r for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_setting(row), []).append(row)
    out = []
    for (method, variant, dataset, model, batch), members in groups.items():
        seeds = sorted({r["seed"] for r in members})
        if len(seeds) < 2:
            continue
        suites = {}
        for s in config["evaluation"]["suites"]:
            diffs = []
            for r in members:
                base = by_run.get(r.get("baseline_run") or "")
                if base and r.get(f"{s}/mean") is not None and base.get(f"{s}/mean") is not None:
                    diffs.append(r[f"{s}/mean"] - base[f"{s}/mean"])
            suites[s] = {
                "mean": _stats([r[f"{s}/mean"] for r in members if r.get(f"{s}/mean") is not None]),
                "gain": _stats([r[f"{s}/gain_vs_{base_m}_pct"] for r in members
                                if r.get(f"{s}/gain_vs_{base_m}_pct") is not None]),
                "diff": _stats(diffs),
            }
        out.append({"method": method, "variant": variant, "dataset": dataset, "model": model, "batch": batch,
                    "seeds": seeds, "runs": [r["run"] for r in members], "suites": suites})
    return out


def read_sweep(path: Path = SWEEP_FILE) -> dict | None:
    """The benchmark sweep's summary (``benchmarks/quality_summary.py`` writes it); None when absent."""
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return sweep if isinstance(sweep, dict) and isinstance(sweep.get("pooled_vs_clip"), dict) else None


def _sweep_points(sweep: Mapping[str, Any], method: str, variant: str) -> tuple[float, str] | None:
    """The std (points) of the sweep's same-seed differences to CLIP for this method (or, for a method
    the sweep did not run, the largest of its methods'), with the words that name it."""
    pooled = sweep["pooled_vs_clip"]
    key = method if variant in (None, "none") else f"{method}-{variant}"
    entry = pooled.get(key)
    if entry and entry.get("std_diff") is not None:
        return float(entry["std_diff"]), f"{key} - clip over {entry.get('n')} same-seed pairs"
    known = [(float(e["std_diff"]), k) for k, e in pooled.items() if e.get("std_diff") is not None]
    if not known:
        return None
    value, k = max(known)
    return value, f"largest of the sweep's methods ({k}); {key} was not in the sweep"


def gain_noise(config: Mapping[str, Any], rows: list[dict], sweep_path: Path = SWEEP_FILE) -> dict[str, dict[str, dict]]:
    """Per run with a gain, per suite: ``{"sd": std of a one-seed gain in % (None if unknown),
    "source": "seeds" | "sweep" | "constant", "text": what it is and where it was measured}``."""
    base_m = config["report"]["baseline_method"]
    by_run = {r["run"]: r for r in rows}
    spread = {(e["method"], e["variant"], e["dataset"], e["model"], e["batch"]): e for e in seed_spread(config, rows)}
    sweep = read_sweep(sweep_path)
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        for s in config["evaluation"]["suites"]:
            if row.get(f"{s}/gain_vs_{base_m}_pct") is None:
                continue
            base_mean = (by_run.get(row["baseline_run"]) or {}).get(f"{s}/mean")
            seeds = spread.get(_setting(row), {}).get("suites", {}).get(s, {}).get("gain", {})
            if seeds.get("std") is not None:
                noise = {"sd": seeds["std"], "source": "seeds",
                         "text": f"std of the gain over this config's {seeds['n']} seeds"}
            elif sweep is not None and base_m == "clip" and sweep.get("suite") == s and \
                    (found := _sweep_points(sweep, row["method"], row["variant"])) and base_mean:
                points, what = found
                noise = {"sd": 100.0 * points / base_mean, "source": "sweep",
                         "text": f"{points:.2f} points ({what}) measured by {SWEEP_COMMAND} "
                                 f"(benchmarks/results/quality.json, {sweep.get('date', 'undated')}), "
                                 f"over this baseline's {base_mean:.2f} %"}
            elif base_mean:
                noise = {"sd": 100.0 * SWEEP_SPREAD_POINTS[1] / base_mean, "source": "constant",
                         "text": f"{SWEEP_SPREAD_TEXT}, over this baseline's {base_mean:.2f} %"}
            else:
                noise = {"sd": None, "source": "constant", "text": "baseline mean 0: no relative noise"}
            out.setdefault(row["run"], {})[s] = noise
    return out


def verdict(gain: float, sd: float | None) -> str:
    """Words for a gain next to its noise: a gain within two standard deviations is not a result."""
    if sd is None or sd <= 0:
        return "noise unknown"
    ratio = abs(gain) / sd
    return f"within seed noise ({ratio:.1f} sd)" if ratio < 2 else f"{ratio:.1f} sd from zero"
