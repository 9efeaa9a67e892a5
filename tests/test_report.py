"""The report: one row per run, relative gains against the matching baseline, plots, MLflow parent.

Inputs are synthetic but follow the contracts exactly: results JSONs whose aggregates come from the
evaluator's own ``aggregate``, and train.json / metrics.jsonl as the trainer writes them. MLflow is a
real SQLite store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from amorlip.config import load_config
from amorlip.evaluate import runner
from amorlip.evaluate.suites import Suite, Task, datacomp_suite
from amorlip.report import print_demo_summary, relative_gain, report

EMOJI = Suite(
    name="emoji-heldout",
    tasks=(Task("category", "category", "classification", "acc1", "classification", Path("x")),
           Task("subcategory", "subcategory", "classification", "acc1", "classification", Path("x")),
           Task("retrieval", "retrieval", "retrieval", "mean_recall@1", "retrieval", Path("x"))),
    groups={"classification": ("category", "subcategory"), "retrieval": ("retrieval",)},
)


def results_json(suite: Suite, run: str, mains: dict[str, float], chance: dict[str, float]) -> dict:
    tasks = {}
    for t in suite.tasks:
        info = {"name": t.name, "group": t.group, "main_metric": t.main_metric, "type": t.type}
        if t.key in mains:
            tasks[t.key] = {"metrics": {t.main_metric: mains[t.key]}, "main": mains[t.key],
                            "chance": chance.get(t.key), **info}
        else:
            tasks[t.key] = {"missing": "eval set not found", **info}
    return {"run": run, "suite": suite.name, "tasks": tasks, "aggregates": runner.aggregate(suite, tasks),
            "chance": {k: v.get("chance") for k, v in tasks.items() if "main" in v}}


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config({
        "name": "report-test",
        "paths": {"data": str(tmp_path / "data"), "runs": str(tmp_path / "runs"), "results": str(tmp_path / "results")},
        "runs": {"clip": {"method": "clip"}, "amorlip": {"method": "amorlip"},
                 "amorlip-paper-s1": {"method": "amorlip", "variant": "paper", "seed": 1}},
        "evaluation": {"suites": ["emoji-heldout", "datacomp"]},
    }, check_paths=False)
    runs, results = Path(config["paths"]["runs"]), Path(config["paths"]["results"])
    chance = {"category": 0.1, "subcategory": 0.05, "retrieval": 0.01}
    emoji = {"clip": {"category": 0.5, "subcategory": 0.3, "retrieval": 0.4},      # mean 0.40
             "amorlip": {"category": 0.6, "subcategory": 0.3, "retrieval": 0.45},  # mean 0.45
             "amorlip-paper-s1": {"category": 0.2, "subcategory": 0.1, "retrieval": 0.3}}
    dc = datacomp_suite(tmp_path / "dc")
    datacomp = {"clip": {"cifar10": 0.2, "imagenet1k": 0.1}, "amorlip": {"cifar10": 0.3, "imagenet1k": 0.1},
                "amorlip-paper-s1": {"cifar10": 0.3}}
    for i, run in enumerate(emoji):
        (results / run).mkdir(parents=True)
        (results / run / "emoji-heldout.json").write_text(json.dumps(results_json(EMOJI, run, emoji[run], chance)))
        (results / run / "datacomp.json").write_text(json.dumps(
            results_json(dc, run, datacomp[run], {"cifar10": 0.1, "imagenet1k": 0.001})))
        (runs / run).mkdir(parents=True)
        method = "clip" if run == "clip" else "amorlip"
        (runs / run / "train.json").write_text(json.dumps({
            "run": run, "method": method, "variant": "none" if run == "clip" else ("paper" if "paper" in run else "published"),
            "steps": 100 + i, "epochs": 4, "samples_seen": 6400, "wall_time_s": 61.25, "images_per_s": 104.5,
            "final_losses": {"loss": 1.0}, "skipped_samples": 0, "mlflow_run_id": None, "world_size": 1}))
        with open(runs / run / "metrics.jsonl", "w") as fh:
            for step in range(10, 101, 10):
                rec = {"step": step, "epoch": step // 50, "loss": 4.0 / step, "lr": 1e-3, "logit_scale": 14.3}
                if method == "amorlip":
                    rec["lambda_loss"] = 1.0 / step
                fh.write(json.dumps(rec) + "\n")
    from amorlip.tracking import init_pipeline

    init_pipeline(config, results / "mlflow_parent.json")
    return config


def test_relative_gain():
    assert relative_gain(0.2411, 0.2148) == pytest.approx(12.24, abs=0.01)  # the paper's headline number
    assert relative_gain(None, 0.2) is None and relative_gain(0.3, 0.0) is None


def test_report_table_plots_and_parent_run(pipeline, capsys):
    from mlflow import MlflowClient

    out = report(pipeline)
    results = Path(pipeline["paths"]["results"])
    with open(results / "summary.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["clip", "amorlip", "amorlip-paper-s1"]
    clip, amor, paper = rows["clip"], rows["amorlip"], rows["amorlip-paper-s1"]
    assert (amor["method"], amor["variant"], amor["batch"], amor["seed"]) == ("amorlip", "published", "64", "0")
    assert paper["variant"] == "paper"
    assert float(clip["emoji-heldout/mean"]) == pytest.approx(40.0)
    assert float(amor["emoji-heldout/category"]) == pytest.approx(60.0)
    assert float(amor["emoji-heldout/group/classification"]) == pytest.approx(45.0)
    # 0.45 / 0.40 - 1 = 12.5 %, against the clip run with the same batch and seed
    assert float(amor["emoji-heldout/gain_vs_clip_pct"]) == pytest.approx(12.5)
    assert amor["baseline_run"] == "clip"
    assert clip["emoji-heldout/gain_vs_clip_pct"] == "" and paper["emoji-heldout/gain_vs_clip_pct"] == ""  # seed 1: none
    # datacomp: partial coverage is shown; a missing task is an empty cell, never 0
    assert amor["datacomp/covered"] == "2/38" and paper["datacomp/covered"] == "1/38"
    assert paper["datacomp/imagenet1k"] == "" and paper["datacomp/sun397"] == ""
    assert float(amor["datacomp/gain_vs_clip_pct"]) == pytest.approx(100 * (0.2 / 0.15 - 1), abs=1e-3)
    assert float(amor["datacomp/group/ImageNet-1k"]) == pytest.approx(10.0)
    assert amor["steps"] == "101" and "images_per_s" not in amor and "wall_time_s" not in amor
    # machine timings are kept apart from the results (they differ between identical reruns)
    with open(results / "timing.csv") as fh:
        timing = {r["run"]: r for r in csv.DictReader(fh)}
    assert float(timing["amorlip"]["images_per_s"]) == 104.5 and float(timing["amorlip"]["wall_time_s"]) == 61.2

    md = (results / "summary.md").read_text()
    assert "| amorlip | amorlip | published | 64 | 0 | 45.00 | 3/3 | +12.50 |" in md
    assert "variant **published**" in md and "variant **paper**" in md
    assert "Chance" in md and "| category | acc1 | classification | 10.00 |" in md
    for name in ("loss_curves.png", "emoji-heldout_tasks.png", "datacomp_tasks.png"):
        png = results / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert set(out) >= {"csv", "md", "loss_curves", "emoji-heldout_tasks"}

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    parent_id = json.loads((results / "mlflow_parent.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"summary.csv", "summary.md"}
    assert {a.path for a in client.list_artifacts(parent_id, "plots")} >= {
        "plots/loss_curves.png", "plots/emoji-heldout_tasks.png"} or \
        {a.path for a in client.list_artifacts(parent_id)} >= {"loss_curves.png", "emoji-heldout_tasks.png"}
    # no run names in the parent's keys: the run is a param beside the value
    assert parent.data.metrics["eval/emoji-heldout/best_gain_vs_clip_pct"] == pytest.approx(12.5)
    assert parent.data.metrics["eval/emoji-heldout/best_mean_main"] == pytest.approx(45.0)
    assert parent.data.params["eval.emoji-heldout.best_run"] == "amorlip"
    assert parent.data.params["eval.emoji-heldout.best_gain_run"] == "amorlip"
    assert not [k for k in parent.data.metrics if any(run in k.split("/") for run in rows)]
    assert parent.info.status == "FINISHED"

    print_demo_summary(pipeline)
    printed = capsys.readouterr().out
    assert "| amorlip | amorlip | published |" in printed


def test_gains_land_on_the_training_runs(pipeline):
    """Each training run gets its gain over the baseline next to its zero-shot results."""
    from mlflow import MlflowClient

    from amorlip.tracking import child_run

    runs = Path(pipeline["paths"]["runs"])
    ids = {}
    for name in ("clip", "amorlip"):
        with child_run(pipeline, name, "train") as tracker:
            tracker.log_params({"method": name})
        ids[name] = tracker.run_id
        summary = json.loads((runs / name / "train.json").read_text())
        (runs / name / "train.json").write_text(json.dumps(summary | {"mlflow_run_id": tracker.run_id}))
    report(pipeline)
    client = MlflowClient(f"sqlite:///{Path(pipeline['paths']['results']) / 'mlflow.db'}")
    amor = client.get_run(ids["amorlip"])
    assert amor.data.metrics["eval/emoji-heldout/gain_vs_clip_pct"] == pytest.approx(12.5)
    # with its noise: the standard deviation of a one-seed gain, and where that figure comes from
    from amorlip.report import collect, gain_noise, summary_rows

    noise = gain_noise(pipeline, summary_rows(pipeline, collect(pipeline))[1])["amorlip"]["emoji-heldout"]
    assert amor.data.metrics["eval/emoji-heldout/gain_noise_sd_pct"] == pytest.approx(noise["sd"])
    assert amor.data.tags["amorlip.gain_noise.emoji-heldout"] == noise["text"]
    assert amor.info.status == "FINISHED"
    assert "eval/emoji-heldout/gain_vs_clip_pct" not in client.get_run(ids["clip"]).data.metrics


def test_loss_panels_separate_lambda_axis_and_drop_duplicates(pipeline):
    """lambda_loss on its own log axis, CLIP's `loss` (= clip_loss) drawn once, no doubled names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amorlip.report import collect, draw_loss_panel, loss_series, panel_title, plot_loss_curves

    clip = [{"step": s, "loss": 5.0 / s, "clip_loss": 5.0 / s} for s in range(1, 21)]
    amor = [{"step": s, "loss": 2.0 / s, "amorlip_loss": 2.0 / s + 1, "lambda_loss": 37.0 if s % 10 == 1 else 0.01}
            for s in range(1, 21)]
    encoder, lam = loss_series(clip)
    assert list(encoder) == ["clip_loss"] and lam == {}
    encoder, lam = loss_series(amor)
    assert list(encoder) == ["amorlip_loss", "loss"] and list(lam) == ["lambda_loss"]
    assert panel_title("clip-b64-s0", "clip") == "clip-b64-s0"
    assert panel_title("baseline", "clip") == "baseline (clip)"

    fig, (a1, a2) = plt.subplots(1, 2)
    draw_loss_panel(a1, "clip", "clip", clip)
    draw_loss_panel(a2, "amorlip-b64-s0", "amorlip", amor)
    assert [line.get_label() for line in a1.get_lines()] == ["clip_loss"] and a1.get_title() == "clip"
    assert a1.get_yscale() == "linear" and len(fig.axes) == 3  # one twin axis, for the AmorLIP panel only
    twin = next(ax for ax in fig.axes if ax not in (a1, a2))
    assert twin.get_yscale() == "log" and [line.get_label() for line in twin.get_lines()] == ["lambda_loss"]
    assert [line.get_label() for line in a2.get_lines()] == ["amorlip_loss", "loss"]
    assert max(max(line.get_ydata()) for line in a2.get_lines()) < 5  # the spikes are not on this axis
    assert [t.get_text() for t in a2.get_legend().get_texts()] == ["amorlip_loss", "loss", "lambda_loss"]
    plt.close(fig)

    # the pipeline's report plot draws through the same panels
    out = plot_loss_curves(collect(pipeline), Path(pipeline["paths"]["results"]) / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
