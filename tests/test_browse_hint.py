"""`amorlip demo-summary`'s closing hint is a command that works as printed from the repository root.

The real CLI prints it; the test then runs the printed line itself (the real `mlflow ui` from the
venv, no PATH lookup) and asks the server for the pipeline's experiment over HTTP.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import yaml

from amorlip.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path) -> Path:
    config = {"name": "hint", "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
              "mlflow": {"experiment": "hint-test"}, "datasets": {"d": {"source": "emoji"}},
              "runs": {"clip": {"method": "clip", "dataset": "d"}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_summary_prints_an_mlflow_ui_command_that_runs_as_printed(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.md").write_text("# Summary\n")
    store = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("hint-test")
    mlflow.set_tracking_uri(None)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers for this look
    printed = subprocess.run([str(Path(sys.executable).with_name("amorlip")), "demo-summary", "--config",
                              str(_config(tmp_path))], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    lines = [line.strip() for line in printed.stdout.splitlines() if " ui --backend-store-uri " in line]
    assert lines, printed.stdout
    # every printed command names the venv's mlflow as a path: a bare `mlflow` is not on a fresh PATH
    for line in lines:
        assert shlex.split(line)[0] in (".venv/bin/mlflow", str(Path(sys.executable).with_name("mlflow"))), line
    argv = shlex.split(lines[0])
    assert argv[argv.index("--backend-store-uri") + 1] == store
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)  # the printed default may be taken on a test machine
    argv += ["--workers", "1"]  # `mlflow ui` starts 4 by default: minutes of imports on 2 busy cores
    log = tmp_path / "mlflow-ui.log"
    with open(log, "w") as fh:  # its own session: the server forks workers, stopped with it below
        server = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=hint-test"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.load(resp)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow ui did not answer within 240 s:\n" + log.read_text()[-3000:]
                time.sleep(0.5)
        assert body["experiment"]["name"] == "hint-test"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
