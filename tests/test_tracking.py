"""MLflow tracking against a real SQLite store, and the outage path against a closed port."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from amorlip.config import load_config
from amorlip.tracking import child_run, flatten, init_pipeline, log_to_parent
from amorlip.tracking.replay import replay


def _config(tmp_path, uri=None):
    return load_config({
        "name": "pipe-test",
        "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "mlflow": {"tracking_uri": uri, "experiment": "exp-test"},
        "runs": {"r1": {"method": "clip", "model": "amorlip-tiny"}},
    }, check_paths=False)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (./mlruns)
    monkeypatch.setenv("SNAKEMAKE_RULE", "train_run")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    yield
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_nests_with_dots():
    assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {"a": 1, "b.c": [1, 2], "b.d.e": None}


def test_parent_and_child_visible_in_sqlite_store(tmp_path):
    config = _config(tmp_path)
    parent = init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    assert json.loads((tmp_path / "results" / "mlflow_parent.json").read_text()) == parent
    assert parent["tracking_uri"] == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"

    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with child_run(config, "r1", "train", tags={"method": "clip"}) as tracker:
        tracker.log_params({"lr": 1e-3, "amorlip": {"rho": [8.5, -8.5]}})
        for step in range(3):
            tracker.log_metrics({"loss": 3.0 - step, "note": "not a number"}, step=step)
        tracker.log_artifact(artifact)
        tracker.log_dict({"a": 1}, "summary.json")
        child_id = tracker.run_id
    assert not tracker.offline

    client = MlflowClient(parent["tracking_uri"])
    run = client.get_run(child_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
    assert run.data.tags["amorlip.kind"] == "train"
    assert run.data.tags["snakemake.rule"] == "train_run"
    assert run.data.tags["slurm.job_id"] == "4242"
    assert run.data.tags["method"] == "clip"
    assert run.data.params == {"lr": "0.001", "amorlip.rho": "[8.5, -8.5]"}
    history = client.get_metric_history(child_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert sorted(a.path for a in client.list_artifacts(child_id)) == ["note.txt", "summary.json"]
    # artifacts live beside the database, not in the cwd's ./mlruns
    assert (tmp_path / "results" / "mlartifacts").is_dir()

    log_to_parent(config, metrics={"mean_main": 0.5}, artifacts=[artifact])
    prun = client.get_run(parent["run_id"])
    assert prun.data.metrics["mean_main"] == 0.5 and prun.info.status == "FINISHED"
    assert prun.info.run_name == parent["run_name"]


def test_experiment_kind_description_and_unique_parent_names(tmp_path):
    """The UI opens a model-training experiment with a description; two launches get two names."""
    from amorlip.tracking import EXPERIMENT_KIND, parent_run_name

    config = _config(tmp_path)
    first = init_pipeline(config, tmp_path / "results" / "p1.json")
    second = init_pipeline(config, tmp_path / "results" / "p2.json")
    client = MlflowClient(first["tracking_uri"])
    exp = client.get_experiment(first["experiment_id"])
    assert EXPERIMENT_KIND == "custom_model_development"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "AmorLIP" in exp.tags["mlflow.note.content"]
    names = [client.get_run(p["run_id"]).info.run_name for p in (first, second)]
    assert names == [first["run_name"], second["run_name"]]
    # config name, UTC timestamp and a config digest; the digest is shared, the runs are not the same
    assert all(n.startswith("pipe-test-") for n in names) and first["run_id"] != second["run_id"]
    assert names[0].rsplit("-", 1)[1] == names[1].rsplit("-", 1)[1]
    assert parent_run_name(config, now=0) == f"pipe-test-19700101-000000-{names[0].rsplit('-', 1)[1]}"
    assert parent_run_name(config, now=1) != parent_run_name(config, now=0)
    # a description a person wrote is kept
    client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", "mine")
    init_pipeline(config, tmp_path / "results" / "p3.json")
    assert client.get_experiment(exp.experiment_id).tags["mlflow.note.content"] == "mine"


def test_child_run_marks_failure_and_reopens(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(RuntimeError):
        with child_run(config, "r1", "train") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    client = MlflowClient(tracker.uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    # a resumed job continues the same run; an already-logged param keeps its value without error
    with child_run(config, "r1", "train", resume_run_id=tracker.run_id) as again:
        again.log_params({"lr": 1})
        again.log_params({"lr": 2})
        again.log_metrics({"loss": 0.5}, step=2)
    assert again.run_id == tracker.run_id and not again.offline
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2]
    assert client.get_run(tracker.run_id).data.params["lr"] == "1"


def test_unreachable_server_keeps_events_then_replays(tmp_path, caplog):
    dead = f"http://127.0.0.1:{_closed_port()}"
    config = _config(tmp_path, uri=dead)
    t0 = time.monotonic()
    parent = init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    assert parent["run_id"] is None and "error" in parent
    offline = tmp_path / "runs" / "r1" / "mlflow-offline.jsonl"
    artifact = tmp_path / "curve.png"
    artifact.write_bytes(b"png")
    with child_run(config, "r1", "train", offline_path=offline) as tracker:
        tracker.log_params({"lr": 0.1})
        for step in (10, 20):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.set_tags({"extra": "x"})
        tracker.log_artifact(artifact)
        tracker.log_dict({"steps": 20}, "train.json")
    assert time.monotonic() - t0 < 60, "a dead server must cost seconds, not minutes"
    assert tracker.offline and tracker.run_id is None
    warnings = [r.getMessage() for r in caplog.records if "MLflow unreachable" in r.getMessage()]
    assert len([w for w in warnings if "amorlip mlflow replay" in w]) == 1
    events = [json.loads(line) for line in offline.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "params", "metrics", "metrics", "tags", "artifact",
                                             "dict", "end"]

    store = f"sqlite:///{tmp_path / 'later.db'}"
    (run_id,) = replay(offline, tracking_uri=store)
    assert not offline.exists() and offline.with_name(offline.name + ".replayed").exists()
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["extra"] == "x" and run.data.tags["amorlip.kind"] == "train"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(10, 0.1), (20, 0.05)]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["curve.png", "train.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # beside later.db


def test_disabled_tracker_does_nothing(tmp_path):
    config = _config(tmp_path)
    with child_run(config, "r1", "train", enabled=False) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_params({"a": 1})
    assert tracker.run_id is None
    assert not (tmp_path / "results").exists()


def _manifest(tmp_path, dataset="emoji-demo"):
    path = tmp_path / "data" / dataset / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dataset": dataset, "samples": 120, "shards": 2, "urls": 130, "failed": 10,
                                "image_size": 256, "samples_sha256": "ab" * 32}))
    return path


def test_dataset_input_from_manifest(tmp_path):
    """The training data as an MLflow dataset input: name, manifest digest, source, counts."""
    from amorlip.provenance import file_sha256
    from amorlip.tracking import manifest_dataset

    config = _config(tmp_path)
    assert manifest_dataset(config, "emoji-demo") is None  # not downloaded yet: nothing to log
    manifest = _manifest(tmp_path)
    init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    with child_run(config, "r1", "train") as tracker:
        tracker.log_dataset(**manifest_dataset(config, "emoji-demo"), context="train")
    client = MlflowClient(tracker.uri)
    (inp,) = client.get_run(tracker.run_id).inputs.dataset_inputs
    sha = file_sha256(manifest)
    assert inp.dataset.name == "emoji-demo" and inp.dataset.digest == sha[:36]
    assert inp.dataset.source_type == "local"
    assert json.loads(inp.dataset.source) == {"uri": str((tmp_path / "data" / "emoji-demo").resolve())}
    profile = json.loads(inp.dataset.profile)
    assert (profile["num_rows"], profile["shards"], profile["manifest_sha256"]) == (120, 2, sha)
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}


def test_dataset_input_replays_after_an_outage(tmp_path):
    from amorlip.tracking import manifest_dataset

    config = _config(tmp_path, uri=f"http://127.0.0.1:{_closed_port()}")
    _manifest(tmp_path)
    offline = tmp_path / "offline.jsonl"
    with child_run(config, "r1", "train", offline_path=offline) as tracker:
        tracker.log_dataset(**manifest_dataset(config, "emoji-demo"))
        (tmp_path / "model.pt").write_bytes(b"weights")
        tracker.log_model(tmp_path / "model.pt", "r1", step=3)
    assert tracker.offline
    (run_id,) = replay(offline, tracking_uri=f"sqlite:///{tmp_path / 'later.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'later.db'}")
    run = client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "emoji-demo" and json.loads(inp.dataset.profile)["num_rows"] == 120
    (output,) = run.outputs.model_outputs
    assert output.step == 3 and client.get_logged_model(output.model_id).name == "r1"


def test_exported_model_is_an_artifact_of_the_training_run(tmp_path):
    import torch

    from amorlip.train.export import log_export

    config = _config(tmp_path)
    init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    with child_run(config, "r1", "train") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=5)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
    model = run_dir / "model.pt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "step": 5}, model)
    log_export(config, "r1", model, 5)
    client = MlflowClient(tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/model.pt"]
    assert run.data.tags["amorlip.model_artifact"] == "model/model.pt" and run.data.tags["amorlip.model_step"] == "5"
    got = client.download_artifacts(tracker.run_id, "model/model.pt", str(tmp_path / "dl"))
    assert torch.equal(torch.load(got, weights_only=True)["state_dict"]["w"], torch.arange(4.0))
    # and a logged model: the run's output at the exported step, READY, holding model.pt
    (output,) = run.outputs.model_outputs
    assert output.step == 5
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("r1", tracker.run_id, "READY")
    assert logged.params["step"] == "5"
    assert [a.path for a in client.list_logged_model_artifacts(output.model_id)] == ["model.pt"]
    # a run trained against another store (or never tracked) is skipped without error
    (run_dir / "train.json").write_text(json.dumps({"mlflow_run_id": "0" * 32}))
    log_export(config, "r1", model, 5)
    (run_dir / "train.json").write_text(json.dumps({"mlflow_run_id": None}))
    log_export(config, "r1", model, 5)


def test_training_runs_are_named_by_what_ran(tmp_path):
    """method-variant-batch-seed; the config's name is kept when it says more, and as the tag
    ``amorlip.run`` (lookups go by run id, from train.json)."""
    from amorlip.config import expand_runs
    from amorlip.tracking import training_run_name

    config = load_config({
        "name": "names", "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "runs": {"amorlip": {"method": "amorlip"}, "baseline": {"method": "clip", "seed": 2},
                 "amorlip-paper-s1": {"method": "amorlip", "variant": "paper", "seed": 1, "batch_size": 32}},
    }, check_paths=False)
    runs = expand_runs(config)
    assert {n: training_run_name(r) for n, r in runs.items()} == {
        "amorlip": "amorlip-published-b64-s0", "baseline": "clip-b64-s2-baseline",
        "amorlip-paper-s1": "amorlip-paper-b32-s1"}
    with child_run(config, "amorlip", "train", display_name=training_run_name(runs["amorlip"])) as tracker:
        pass
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.run_name == "amorlip-published-b64-s0" and run.data.tags["amorlip.run"] == "amorlip"


def test_parent_run_carries_the_resolved_config(tmp_path):
    config = _config(tmp_path)
    parent = init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    client = MlflowClient(parent["tracking_uri"])
    run = client.get_run(parent["run_id"])
    assert run.data.params["config.name"] == "pipe-test"
    assert run.data.params["config.mlflow.experiment"] == "exp-test"
    assert run.data.params["config.runs.r1.method"] == "clip"
    got = client.download_artifacts(parent["run_id"], "config.yaml", str(tmp_path / "dl"))
    import yaml

    assert yaml.safe_load(open(got)) == json.loads(json.dumps(config, default=str))
    # a parent started late by the report (init never ran in this store) carries it too
    other = _config(tmp_path / "late")
    late_id = log_to_parent(other, metrics={"m": 1.0})
    late = MlflowClient(f"sqlite:///{(tmp_path / 'late' / 'results' / 'mlflow.db').resolve()}").get_run(late_id)
    assert late.data.params["config.runs.r1.method"] == "clip" and late.data.tags["amorlip.kind"] == "pipeline"


def test_attach_logs_onto_a_finished_run_without_ending_it(tmp_path):
    from amorlip.tracking import Tracker

    config = _config(tmp_path)
    with child_run(config, "r1", "train") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    later = Tracker(tracker.uri, tmp_path / "later.jsonl")
    assert later.attach(tracker.run_id) and not later.offline
    later.log_metrics({"eval/acc": 50.0}, step=1)
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.data.metrics["eval/acc"] == 50.0 and run.info.status == "FINISHED"
    assert not Tracker(tracker.uri, tmp_path / "x.jsonl").attach("0" * 32)  # not in this store
    dead = Tracker(f"http://127.0.0.1:{_closed_port()}", tmp_path / "dead.jsonl")
    assert dead.attach(tracker.run_id) and dead.offline  # kept for replay, onto the same run id
    dead.log_metrics({"eval/acc": 51.0}, step=2)
    (run_id,) = replay(tmp_path / "dead.jsonl", tracking_uri=tracker.uri)
    assert run_id == tracker.run_id
    assert [m.value for m in MlflowClient(tracker.uri).get_metric_history(run_id, "eval/acc")] == [50.0, 51.0]


def test_system_metrics_on_a_training_run(tmp_path, caplog):
    config = _config(tmp_path)
    config["mlflow"]["system_metrics_interval_s"] = 0.2
    with child_run(config, "r1", "train", system_metrics=True) as tracker:
        time.sleep(1.0)
    metrics = MlflowClient(tracker.uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    # off in the config: none; a dead store: skipped with a log line, the job goes on
    config["mlflow"]["system_metrics"] = False
    with child_run(config, "r2", "train", system_metrics=True) as quiet:
        pass
    assert not [k for k in MlflowClient(tracker.uri).get_run(quiet.run_id).data.metrics if k.startswith("system/")]
    dead = _config(tmp_path / "dead", uri=f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level("INFO", logger="amorlip.tracking.system_metrics"):
        with child_run(dead, "r1", "train", system_metrics=True) as offline:
            pass
    assert offline.offline and "no system metrics" in caplog.text


def test_logged_model_loads_back_into_open_clip_and_registers(tmp_path):
    """The exported model, downloaded from the store through MLflow, rebuilds the same model with the
    project's loader and with open_clip alone; ``mlflow.register_model`` adds a registry version."""
    import open_clip
    import torch
    from mlflow.artifacts import download_artifacts

    from amorlip.model_file import load_exported, write_model_file
    from amorlip.models import create_model, model_config
    from amorlip.train.export import log_export

    config = _config(tmp_path)
    config["mlflow"]["register_model"] = "amorlip-tiny-test"
    init_pipeline(config, tmp_path / "results" / "mlflow_parent.json")
    with child_run(config, "r1", "train") as tracker:
        pass
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
    torch.manual_seed(0)
    model, _, _ = create_model("amorlip-tiny")
    model.eval()
    payload = write_model_file(run_dir / "model.pt", model_name="amorlip-tiny", model_config=model_config("amorlip-tiny"),
                               model_kwargs={}, state_dict=model.state_dict(), run={"name": "r1"}, lambda_nets=None,
                               step=7, checkpoint_tag="step-0000007", method="clip", variant="none")
    log_export(config, "r1", run_dir / "model.pt", 7, {k: payload[k] for k in ("model_name", "model_config", "model_kwargs")})

    client = MlflowClient(tracker.uri)
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.params["model_name"], str(logged.status)) == ("r1", "amorlip-tiny", "READY")
    local = Path(download_artifacts(artifact_uri=logged.artifact_location, dst_path=str(tmp_path / "dl"),
                                    tracking_uri=tracker.uri))
    assert sorted(p.name for p in local.iterdir()) == ["README.md", "model.pt", "open_clip_config.json"]

    loaded, _, tokenizer, meta = load_exported(local / "model.pt")
    cfg = json.loads((local / "open_clip_config.json").read_text())
    plain = open_clip.CLIP(**cfg["model_cfg"], **cfg["model_kwargs"], output_dict=True)
    plain.load_state_dict(torch.load(local / "model.pt", weights_only=True)["state_dict"])
    plain.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = tokenizer(["a red square", "a blue circle", "a green star"])
    with torch.no_grad():
        want_img, want_txt = model.encode_image(images), model.encode_text(texts)
        for other in (loaded, plain):
            torch.testing.assert_close(other.encode_image(images), want_img, rtol=0, atol=0)
            torch.testing.assert_close(other.encode_text(texts), want_txt, rtol=0, atol=0)
    assert meta["step"] == 7

    (version,) = client.search_model_versions("name='amorlip-tiny-test'")
    assert (version.run_id, version.source, int(version.version)) == (tracker.run_id, logged.artifact_location, 1)
    log_export(config, "r1", run_dir / "model.pt", 7)  # a second export: a second version
    assert len(client.search_model_versions("name='amorlip-tiny-test'")) == 2
