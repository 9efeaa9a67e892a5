"""The report's two honesty checks: runs compared across different data digests are flagged, and
settings run with several seeds show their seed-to-seed spread next to the comparison.

Three seeds of CLIP and of AmorLIP with results JSONs built by the evaluator's own ``aggregate`` and
train.json files carrying ``provenance.manifest_sha256`` as the trainer records it; one AmorLIP
seed trained on another download.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from amorlip.config import load_config
from amorlip.evaluate import runner
from amorlip.evaluate.suites import Suite, Task
from amorlip.report import collect, data_builds, seed_spread, summary_markdown, summary_rows, write_csv

SUITE = Suite(
    name="emoji-heldout",
    tasks=(Task("category", "category", "classification", "acc1", "classification", Path("x")),
           Task("retrieval", "retrieval", "retrieval", "mean_recall@1", "retrieval", Path("x"))),
    groups={"classification": ("category",), "retrieval": ("retrieval",)},
)
# suite means (category and retrieval equal): clip 40, 42, 44; amorlip 45, 50, 55
MEANS = {"clip-s0": 0.40, "clip-s1": 0.42, "clip-s2": 0.44,
         "amorlip-s0": 0.45, "amorlip-s1": 0.50, "amorlip-s2": 0.55}
DATA_A, DATA_B = "a" * 64, "b" * 64


def _write_run(config: dict, run: str, mean: float, manifest: str | None) -> None:
    tasks = {t.key: {"metrics": {t.main_metric: mean}, "main": mean, "chance": 0.1, "name": t.name,
                     "group": t.group, "main_metric": t.main_metric, "type": t.type} for t in SUITE.tasks}
    res = {"run": run, "suite": SUITE.name, "tasks": tasks, "aggregates": runner.aggregate(SUITE, tasks)}
    out = Path(config["paths"]["results"]) / run
    out.mkdir(parents=True)
    (out / "emoji-heldout.json").write_text(json.dumps(res))
    train = {"run": run, "steps": 10, "wall_time_s": 1.0, "images_per_s": 10.0}
    if manifest is not None:
        train["provenance"] = {"manifest_sha256": manifest, "samples_sha256": "x"}
    (Path(config["paths"]["runs"]) / run).mkdir(parents=True)
    (Path(config["paths"]["runs"]) / run / "train.json").write_text(json.dumps(train))


def _config(tmp_path: Path, seeds: list[int]) -> dict:
    return load_config({
        "name": "spread-test",
        "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "runs": {f"{m}-s{seed}": {"method": m, "seed": seed} for m in ("clip", "amorlip") for seed in seeds},
        "evaluation": {"suites": ["emoji-heldout"]},
    }, check_paths=False)


@pytest.fixture()
def sweep(tmp_path) -> dict:
    config = _config(tmp_path, [0, 1, 2])
    for run, mean in MEANS.items():
        manifest = {"amorlip-s2": DATA_B, "clip-s1": None}.get(run, DATA_A)
        _write_run(config, run, mean, manifest)
    return config


def test_different_data_digests_are_flagged(sweep, tmp_path):
    data = collect(sweep)
    columns, rows = summary_rows(sweep, data)
    by_run = {r["run"]: r for r in rows}
    assert by_run["amorlip-s2"]["baseline_data_differs"] is True
    assert by_run["amorlip-s0"]["baseline_data_differs"] is False
    assert by_run["amorlip-s1"]["baseline_data_differs"] is None  # its clip recorded no digest
    assert by_run["clip-s0"]["baseline_data_differs"] is None  # no baseline
    assert data_builds(data) == {"emoji-demo": {DATA_A: ["clip-s0", "clip-s2", "amorlip-s0",
                                                         "amorlip-s1"], DATA_B: ["amorlip-s2"]}}

    write_csv(tmp_path / "summary.csv", columns, rows)
    with open(tmp_path / "summary.csv") as fh:
        csv_rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert csv_rows["amorlip-s2"]["baseline_data_differs"] == "True"
    assert csv_rows["amorlip-s1"]["baseline_data_differs"] == ""

    md = summary_markdown(sweep, data, rows)
    s2 = next(line for line in md.splitlines() if line.startswith("| amorlip-s2 |"))
    s0 = next(line for line in md.splitlines() if line.startswith("| amorlip-s0 |"))
    assert "+25.00 (different data)" in s2 and "(different data)" not in s0
    assert "**Different data:**" in md and "`amorlip-s2`" in md


def test_same_data_or_no_digest_is_not_flagged(tmp_path):
    config = _config(tmp_path, [0])
    _write_run(config, "clip-s0", 0.4, DATA_A)
    _write_run(config, "amorlip-s0", 0.5, None)
    data = collect(config)
    _, rows = summary_rows(config, data)
    md = summary_markdown(config, data, rows)
    assert all(r["baseline_data_differs"] is None for r in rows)
    assert data_builds(data) == {} and "different data" not in md.lower()
    assert "Seed-to-seed spread" not in md and "Each setting ran with one seed" in md  # no spread to show


def test_seed_spread_is_shown_next_to_the_comparison(sweep):
    data = collect(sweep)
    _, rows = summary_rows(sweep, data)
    spread = {e["method"]: e for e in seed_spread(sweep, rows)}
    amor = spread["amorlip"]["suites"]["emoji-heldout"]
    assert spread["amorlip"]["seeds"] == [0, 1, 2]
    assert amor["mean"]["mean"] == pytest.approx(50.0) and amor["mean"]["std"] == pytest.approx(5.0)
    assert (amor["mean"]["min"], amor["mean"]["max"]) == (pytest.approx(45.0), pytest.approx(55.0))
    # gains at equal seed: 45/40, 50/42, 55/44 - 1
    gains = [100 * (45 / 40 - 1), 100 * (50 / 42 - 1), 100 * (55 / 44 - 1)]
    assert amor["gain"]["n"] == 3 and amor["gain"]["mean"] == pytest.approx(sum(gains) / 3)
    clip = spread["clip"]["suites"]["emoji-heldout"]
    assert clip["mean"]["std"] == pytest.approx(2.0) and clip["gain"]["n"] == 0

    md = summary_markdown(sweep, data, rows)
    assert md.index("## Runs") < md.index("## Seed-to-seed spread") < md.index("## emoji-heldout: per task")
    row = next(line for line in md.splitlines() if line.startswith("| amorlip | published | 64 | 0, 1, 2 |"))
    assert "50.00 ± 5.00" in row and "45.00 – 55.00" in row and f"+{sum(gains) / 3:.2f} ± " in row
