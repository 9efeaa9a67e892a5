"""Every gain with its noise: from the config's seeds when it has several, else the benchmark sweep's
recorded spread (benchmarks/results/quality.json), else the spread benchmarks/RESULTS.md records.

Reuses the report fixtures: ``pipeline`` (one seed per setting; AmorLIP 45 % vs CLIP 40 % on
emoji-heldout, +12.5 %) and ``sweep`` (three seeds: CLIP 40/42/44, AmorLIP 45/50/55).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_report import pipeline  # noqa: F401  (fixture)
from test_report_spread import sweep  # noqa: F401  (fixture)

from amorlip.report import collect, gain_noise, print_demo_summary, report, seed_spread, summary_rows
from amorlip.report.noise import SWEEP_FILE, SWEEP_SPREAD_POINTS, verdict


def test_one_seed_gain_takes_the_sweeps_recorded_spread(pipeline, tmp_path, capsys):  # noqa: F811
    rows = summary_rows(pipeline, collect(pipeline))[1]
    # without the sweep's file: the documented constant (2.6 points) over the baseline's 40 %
    noise = gain_noise(pipeline, rows, sweep_path=tmp_path / "absent.json")
    amor = noise["amorlip"]["emoji-heldout"]
    assert amor["source"] == "constant" and amor["sd"] == pytest.approx(100 * SWEEP_SPREAD_POINTS[1] / 40.0)
    assert "make bench-quality" in amor["text"] and "benchmarks/RESULTS.md section 4" in amor["text"]
    assert "clip" not in noise  # the baseline has no gain, so no noise
    assert "amorlip-paper-s1" not in noise  # no same-seed baseline: no gain

    # with it: that method's same-seed difference spread vs CLIP, from the file as written
    sweep_file = tmp_path / "quality.json"
    sweep_file.write_text(json.dumps({"suite": "emoji-heldout", "date": "2026-11-29", "pooled_vs_clip": {
        "amorlip-published": {"mean_diff": -0.5, "std_diff": 1.7, "n": 9}}}))
    amor = gain_noise(pipeline, rows, sweep_path=sweep_file)["amorlip"]
    assert amor["emoji-heldout"]["source"] == "sweep"
    assert amor["emoji-heldout"]["sd"] == pytest.approx(100 * 1.7 / 40.0)
    assert "9 same-seed pairs" in amor["emoji-heldout"]["text"]
    # another suite than the sweep's: the constant, over that suite's baseline (datacomp 15 %)
    assert amor["datacomp"]["source"] == "constant" and amor["datacomp"]["sd"] == pytest.approx(100 * 2.6 / 15.0)

    # the report and the demo summary print it next to the gain, with a verdict
    md = report(pipeline)["md"].read_text()
    sd = gain_noise(pipeline, rows)["amorlip"]["emoji-heldout"]
    assert f"| 45.00 | 3/3 | +12.50 | ± {sd['sd']:.2f} ({sd['source']}) |" in md
    assert f"`amorlip` vs `clip` on emoji-heldout: **+12.50 % ± {sd['sd']:.2f} %** ({verdict(12.5, sd['sd'])}" in md
    print_demo_summary(pipeline)
    assert f"+12.50 % ± {sd['sd']:.2f} %" in capsys.readouterr().out


def test_the_committed_sweep_record_is_read(pipeline):  # noqa: F811
    if not SWEEP_FILE.exists():
        pytest.skip(f"{SWEEP_FILE} not in this checkout (make bench-quality writes it)")
    recorded = json.loads(SWEEP_FILE.read_text())["pooled_vs_clip"]["amorlip-published"]["std_diff"]
    rows = summary_rows(pipeline, collect(pipeline))[1]
    amor = gain_noise(pipeline, rows)["amorlip"]["emoji-heldout"]
    assert amor["source"] == "sweep" and amor["sd"] == pytest.approx(100 * recorded / 40.0)


def test_several_seeds_give_their_own_noise(sweep):  # noqa: F811
    rows = summary_rows(sweep, collect(sweep))[1]
    gains = [100 * (a / c - 1) for a, c in ((45, 40), (50, 42), (55, 44))]
    noise = gain_noise(sweep, rows, sweep_path=Path("/nonexistent"))
    assert {n["emoji-heldout"]["source"] for n in noise.values()} == {"seeds"}
    assert noise["amorlip-s0"]["emoji-heldout"]["sd"] == pytest.approx(statistics.stdev(gains))
    (amor,) = [e for e in seed_spread(sweep, rows) if e["method"] == "amorlip"]
    diff = amor["suites"]["emoji-heldout"]["diff"]  # same-seed differences 5, 8, 11 points
    assert (diff["n"], diff["mean"], diff["std"]) == (3, pytest.approx(8.0), pytest.approx(3.0))
    assert diff["se"] == pytest.approx(3.0 / 3 ** 0.5)


def test_verdict_words():
    assert verdict(-15.85, 17.0).startswith("within seed noise")
    assert verdict(12.5, 4.0) == "3.1 sd from zero"
    assert verdict(1.0, None) == "noise unknown"
