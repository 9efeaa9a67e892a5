"""Zero-shot evaluation during training (run key ``zeroshot_during_training``): the config checks, and a
tiny real run through ``amorlip train`` whose per-epoch records equal an independent evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from train_configs import COLOUR_NAMES, read_jsonl, run_cli, trainer_root

from amorlip.config import ConfigError, RunConfig, get_run, load_config

ZS = {"every_epochs": 1, "suite": "emoji-heldout"}


def _colour_png(index: int, shade: int) -> bytes:
    """A solid square of colour ``COLOUR_NAMES[index]`` (the names' channel bits), shaded a little."""
    r, g, b = (index >> 2) & 1, (index >> 1) & 1, index & 1
    hi, lo = 200 + shade, 30 + shade
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (hi if r else lo, hi if g else lo, hi if b else lo)).save(buf, format="PNG")
    return buf.getvalue()


def _write_eval_sets(data: Path) -> None:
    """The emoji-heldout layout (tasks.json) with two tasks on the training data's signal: colour
    classification ("a {colour} square") and image-text retrieval."""
    root = data / "evalsets" / "emoji-heldout"
    cls_dir, ret_dir = root / "colour", root / "retrieval"
    for folder in (cls_dir, ret_dir):
        (folder / "test").mkdir(parents=True, exist_ok=True)
        (folder / "test" / "nshards.txt").write_text("1\n")
    (cls_dir / "classnames.txt").write_text("\n".join(COLOUR_NAMES) + "\n")
    (cls_dir / "zeroshot_classification_templates.txt").write_text("a {c} square\n")
    with wds.TarWriter(str(cls_dir / "test" / "0.tar")) as sink:
        for i in range(24):
            sink.write({"__key__": f"c{i:04d}", "png": _colour_png(i % 8, 3 * (i // 8)), "cls": str(i % 8).encode()})
    (ret_dir / "dataset_type.txt").write_text("retrieval\n")
    with wds.TarWriter(str(ret_dir / "test" / "0.tar")) as sink:
        for i in range(8):
            sink.write({"__key__": f"r{i:04d}", "png": _colour_png(i, 5),
                        "txt": f"a {COLOUR_NAMES[i]} square\na square in {COLOUR_NAMES[i]}".encode()})
    (root / "tasks.json").write_text(json.dumps({"suite": "emoji-heldout", "tasks": [
        {"key": "colour", "type": "classification", "path": "colour", "main_metric": "acc1",
         "group": "classification", "num_classes": 8},
        {"key": "retrieval", "type": "retrieval", "path": "retrieval", "main_metric": "mean_recall@1",
         "group": "retrieval"},
    ]}))


# --------------------------------------------------------------------------- config


def _config(run: dict, **top) -> dict:
    return load_config({"runs": {"x": run}, **top}, check_paths=False)


def test_config_default_off_round_trip_and_checks():
    run = get_run(_config({}), "x")
    assert run.zeroshot_during_training.every_epochs == 0 and not run.zeroshot_during_training.enabled
    on = get_run(_config({"zeroshot_during_training": {"every_epochs": 2}}), "x")
    assert on.zeroshot_during_training.every_epochs == 2 and on.zeroshot_during_training.suite == "emoji-heldout"
    back = RunConfig.from_dict(json.loads(json.dumps(on.to_dict())))
    assert back == on and back.to_dict()["zeroshot_during_training"] == {"every_epochs": 2, "suite": "emoji-heldout"}
    # a run config saved before the key existed (an older model.pt / checkpoint) still loads, switched off
    old = {k: v for k, v in on.to_dict().items() if k != "zeroshot_during_training"}
    assert not RunConfig.from_dict(old).zeroshot_during_training.enabled

    # a suite that evaluation.suites does not list fails at load, naming the key
    with pytest.raises(ConfigError, match=r"runs\.x\.zeroshot_during_training\.suite.*'datacomp'"):
        _config({"zeroshot_during_training": {"every_epochs": 1, "suite": "datacomp"}})
    with pytest.raises(ConfigError, match=r"runs\.x\.zeroshot_during_training\.suite.*'nope'"):
        _config({"zeroshot_during_training": {"every_epochs": 1, "suite": "nope"}})
    # ... but only when the option is on (the default suite need not exist in a datacomp config)
    assert not get_run(_config({"zeroshot_during_training": {"suite": "nope"}}), "x").zeroshot_during_training.enabled
    with pytest.raises(ConfigError, match=r"zeroshot_during_training\.every_epochs.*ZeRO-3"):
        _config({"zero_stage": 3, "zeroshot_during_training": {"every_epochs": 1}})
    with pytest.raises(ConfigError, match="zeroshot_during_training"):
        _config({"zeroshot_during_training": {"every_epochs": 1, "max_samples": 3}})


# --------------------------------------------------------------------------- a real run


def test_two_epochs_record_what_the_exported_model_scores(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from amorlip.evaluate.runner import evaluate_suite
    from amorlip.evaluate.suites import get_suite
    from amorlip.model_file import load_exported
    from amorlip.train.export import export

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = trainer_root(tmp_path / "root", {"zs": {"method": "clip", "zeroshot_during_training": ZS}})
    _write_eval_sets(root / "data")
    res = run_cli(root / "config.yaml", "zs")
    assert res.returncode == 0, res.stderr[-4000:]

    run_dir = root / "runs" / "zs"
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "zeroshot"]
    assert [(r["step"], r["epoch"]) for r in records] == [(12, 0), (24, 1)]  # 12 steps per epoch
    for r in records:
        assert r["suite"] == "emoji-heldout" and set(r["tasks"]) == {"colour", "retrieval"}
        assert (r["covered"], r["total"]) == (2, 2)
        assert r["mean"] == pytest.approx(sum(r["tasks"].values()) / 2, abs=1e-9)
    # the current weights, not the initial ones: the colour signal the run learns shows (chance is 12.5%)
    assert records[0]["tasks"] != records[1]["tasks"] and records[-1]["tasks"]["colour"] > 50.0
    summary = json.loads((run_dir / "train.json").read_text())
    assert summary["zeroshot_during_training"] == {k: v for k, v in records[-1].items() if k not in ("kind", "time")}
    # the step records still carry no kind (the loss curves read those)
    assert sum(1 for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") is None) == 24

    # an independent evaluation of the final weights: exported from the last checkpoint, loaded back
    config = load_config(root / "config.yaml")
    export(config, "zs")
    model, transform, tokenizer, meta = load_exported(run_dir / "model.pt", "cpu")
    assert meta["step"] == 24
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training job's OMP_NUM_THREADS
    try:
        results = evaluate_suite(model, tokenizer, transform, get_suite(config, "emoji-heldout"), device="cpu",
                                 batch_size=config["evaluation"]["batch_size"], workers=config["evaluation"]["workers"])
    finally:
        torch.set_num_threads(threads)
    assert records[-1]["tasks"] == {k: 100.0 * e["main"] for k, e in results["tasks"].items()}
    assert records[-1]["mean"] == 100.0 * results["aggregates"]["mean_main"]

    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "zeroshot/emoji-heldout/mean")
    assert sorted((m.step, m.value) for m in history) == [(12, records[0]["mean"]), (24, records[1]["mean"])]
    per_task = client.get_metric_history(summary["mlflow_run_id"], "zeroshot/emoji-heldout/colour")
    assert sorted((m.step, m.value) for m in per_task) == [(12, records[0]["tasks"]["colour"]),
                                                          (24, records[1]["tasks"]["colour"])]

    # train.json lost after the end: the rerun resumes at step 24, reports the same last record and
    # does not evaluate again (metrics.jsonl keeps one record per due step)
    (run_dir / "train.json").unlink()
    res = run_cli(root / "config.yaml", "zs")
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((run_dir / "train.json").read_text())["zeroshot_during_training"] == \
        summary["zeroshot_during_training"]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "zeroshot"] == [12, 24]
