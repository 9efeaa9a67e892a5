"""A real `mlflow server` for tests, and what a researcher relies on, read through its REST API.

:func:`mlflow_server` starts the venv's ``mlflow server`` on a free loopback port over a given store
(the cluster setup of tests/test_mlflow_server.py, or the SQLite store a finished pipeline left, as
``mlflow ui`` would browse it). :func:`check_researcher_view` then asks that server, with plain HTTP
requests to ``/api/2.0/mlflow/...`` (the endpoints the MLflow UI itself calls; no Python client), for
what the runs table and a run's page show: the experiment's kind, the parent run and its children,
the zero-shot results on each training run, its dataset input, its logged model (downloadable and
loadable), its system metrics and the shared validation metric.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, root: Path, artifacts: Path | None = None, timeout: float = 240.0
                  ) -> Iterator[dict]:
    """``{"url", "port", "root"}`` of a running ``mlflow server`` (stopped, with its workers, on exit).

    ``artifacts``: the server's ``--artifacts-destination`` (runs that logged through it proxy there;
    runs whose artifact URI is a local path are read from that path)."""
    root = Path(root)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(MLFLOW), "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    log_path = root / f"mlflow-server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up in {timeout:.0f} s:\n"
                                     + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield {"url": url, "port": port, "root": root}
    finally:
        # the server forks uvicorn workers into its own session: stop exactly that group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class Rest:
    """GET / POST JSON against one server; an HTTP error is raised with the server's message."""

    def __init__(self, url: str):
        self.url = url

    def _open(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{request.get_method()} {request.full_url}: {exc.code} {exc.read()[:500]!r}") from exc

    def get(self, path: str, **query) -> dict:
        q = urllib.parse.urlencode(query)
        return json.loads(self._open(urllib.request.Request(f"{self.url}{path}{'?' + q if q else ''}")))

    def post(self, path: str, body: dict) -> dict:
        return json.loads(self._open(urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})))

    def raw(self, path: str, **query) -> bytes:
        return self._open(urllib.request.Request(f"{self.url}{path}?{urllib.parse.urlencode(query)}"))


def _pairs(items: list[dict] | None) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items or []}


def runs_by_id(rest: Rest, experiment_id: str) -> dict[str, dict]:
    """Every run of the experiment, as the runs table loads it (``runs/search``), paged."""
    runs, token = {}, None
    while True:
        body = {"experiment_ids": [experiment_id], "max_results": 200, **({"page_token": token} if token else {})}
        page = rest.post("/api/2.0/mlflow/runs/search", body)
        for run in page.get("runs", []):
            runs[run["info"]["run_id"]] = run
        token = page.get("next_page_token")
        if not token:
            return runs


def check_researcher_view(url: str, parent: dict, runs_dir: Path, results_dir: Path, suites: list[str],
                          expect_system_metrics: bool = True) -> dict:
    """Assert what the MLflow UI shows a researcher for a finished pipeline; returns the training runs
    by name (REST JSON) for further checks.

    ``parent`` is ``results/mlflow_parent.json``; ``runs_dir`` / ``results_dir`` hold each run's
    train.json and ``<suite>.json``, the local truth the server's figures must match."""
    import torch

    from amorlip.evaluate.runner import metric_name

    rest = Rest(url)
    experiment = rest.get("/api/2.0/mlflow/experiments/get", experiment_id=parent["experiment_id"])["experiment"]
    tags = _pairs(experiment.get("tags"))
    # the kind the UI reads to open the runs table (not the GenAI traces view), and a description
    assert tags.get("mlflow.experimentKind") == "custom_model_development", tags
    assert tags.get("mlflow.note.content"), tags

    runs = runs_by_id(rest, parent["experiment_id"])
    top = runs[parent["run_id"]]
    assert top["info"]["status"] == "FINISHED" and top["info"]["run_name"] == parent["run_name"], top["info"]
    children = {rid: r for rid, r in runs.items()
                if _pairs(r["data"].get("tags")).get("mlflow.parentRunId") == parent["run_id"]}
    kinds = [_pairs(r["data"]["tags"]).get("amorlip.kind", "?") for r in children.values()]
    names = sorted(p.name for p in Path(runs_dir).iterdir() if (p / "train.json").exists())
    # one train child per run; at least one evaluate child per run and suite (a job killed after its
    # MLflow run ended and then rerun leaves a second one; the training run links the latest)
    assert kinds.count("train") == len(names) and kinds.count("evaluate") >= len(names) * len(suites), kinds
    assert set(kinds) == {"train", "evaluate"}, kinds

    training = {}
    for name in names:
        summary = json.loads((Path(runs_dir) / name / "train.json").read_text())
        run = runs[summary["mlflow_run_id"]]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_id"] in children, run["info"]
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        run_tags = _pairs(run["data"].get("tags"))
        # zero-shot results on the training run itself, in percent, equal to the evaluation JSON
        for suite in suites:
            result = json.loads((Path(results_dir) / name / f"{suite}.json").read_text())
            assert metrics[f"eval/{suite}/mean_main"] == \
                _approx(100 * result["aggregates"]["mean_main"]), (name, suite, metrics)
            for key, task in result["tasks"].items():
                if task.get("main") is not None:
                    assert metrics[metric_name(f"eval/{suite}/{key}")] == _approx(100 * task["main"]), (name, key)
            eval_id = run_tags[f"amorlip.eval_run_id.{suite}"]
            assert eval_id in children and runs[eval_id]["info"]["status"] == "FINISHED", (name, suite)
            assert _pairs(runs[eval_id]["data"]["tags"])["amorlip.train_run_id"] == run["info"]["run_id"]
        # the shared validation metric, the same figure as train.json's last one
        assert metrics["val/infonce"] == _approx(summary["validation"]["val_infonce"]), (name, metrics)
        # the dataset input: the manifest's digest, its counts in the profile
        inputs = (run.get("inputs") or {}).get("dataset_inputs") or []
        assert len(inputs) == 1, (name, inputs)
        dataset = inputs[0]["dataset"]
        digest = summary["provenance"]["manifest_sha256"]
        assert dataset["name"] == summary["dataset"] and digest and dataset["digest"] == digest[:36], dataset
        assert json.loads(dataset["profile"])["num_rows"] > 0, dataset
        # system metrics (CPU, memory) sampled while the job ran
        if expect_system_metrics:
            system = [k for k in metrics if k.startswith("system/")]
            assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system, \
                (name, sorted(metrics))
        # the logged model: an output of the run, READY, its files downloadable, model.pt loadable
        outputs = (run.get("outputs") or {}).get("model_outputs") or []
        assert len(outputs) == 1, (name, outputs)
        model_id = outputs[0]["model_id"]
        model = rest.get(f"/api/2.0/mlflow/logged-models/{model_id}")["model"]
        assert model["info"]["status"] == "LOGGED_MODEL_READY" and model["info"]["source_run_id"] == run["info"]["run_id"]
        files = {f["path"] for f in rest.get(f"/api/2.0/mlflow/logged-models/{model_id}/artifacts/directories")
                 .get("files", [])}
        assert {"model.pt", "open_clip_config.json"} <= files, files
        blob = rest.raw(f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files", artifact_file_path="model.pt")
        config = json.loads(rest.raw(f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files",
                                     artifact_file_path="open_clip_config.json"))
        exported = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        _load_into_open_clip(config, exported["state_dict"])
        training[name] = run
    return training


def _load_into_open_clip(config: dict, state_dict: dict) -> None:
    """Build the towers from the logged open_clip config alone and load the downloaded weights (strict)."""
    import open_clip

    model = open_clip.CLIP(**config["model_cfg"], **config.get("model_kwargs", {}), output_dict=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=True)
    assert not missing and not unexpected


def _approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-6, abs=1e-6)


def chromium() -> str | None:
    """Debian's headless browser (``apt-get install chromium``), if installed."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def runs_page_dom(url: str, experiment_id: str, workdir: Path, budget_ms: int = 30000) -> str:
    """The runs page of the experiment as the browser renders it (the UI is a JavaScript app: the
    DOM is dumped after ``budget_ms`` of virtual time, once its REST calls have answered)."""
    browser = chromium()
    assert browser, "chromium is not installed"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={Path(workdir) / 'chromium-profile'}", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", f"{url}/#/experiments/{experiment_id}/runs"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
