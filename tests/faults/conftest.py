"""Shared machinery of the fault tests: tiny real runs, process control, a real MLflow server.

Every fault is injected into real components: ``amorlip train`` runs as a subprocess exactly as
Snakemake starts it (so ``kill -9`` and signals hit the real trainer), shards are real tars, the
tracking server is a real ``mlflow server``. What this module adds is only the plumbing: configs
under a temporary root, polling with deadlines, and the figures the tests print.

Cost matters (the whole folder must stay within a few minutes on two cores): one ``amorlip train``
process pays ~15 s of imports, so tests start as few as they can, and every run's MLflow store is a
copy of one SQLite file whose tables were created once (creating them costs each process seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.helpers_shards` whatever pytest's import mode
    sys.path.insert(0, str(REPO))

from tests.helpers_shards import make_shards  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent

# 4 shards x 48 samples = 192; global batch 16 -> 12 steps per epoch; 2 epochs = 24 steps.
TINY_RUN = {
    "model": "amorlip-tiny", "dataset": "tiny", "batch_size": 16, "epochs": 2, "lr": 2e-3,
    "warmup_steps": 2, "workers": 0, "seed": 0, "checkpoint_every": 5, "keep_checkpoints": 3,
    "log_every": 1, "weight_decay": 0.0, "method": "amorlip",
    "amorlip": {"beta_epochs": 1, "rho": [0.0]},
}
N_SHARDS, PER_SHARD = 4, 48


# --------------------------------------------------------------------------- small utilities


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
             what: str = "condition", proc: subprocess.Popen | None = None):
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` s (or if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"process exited (rc {proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written when a process was killed
            out.append(json.loads(line))
    return out


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a job: no inherited rank or tracking variables, one thread, CPU DeepSpeed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "MLFLOW_TRACKING_URI", "SLURM_NTASKS", "SLURM_PROCID", "AMORLIP_DEBUG_KEYS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- tiny runs


def write_tiny_config(root: Path, run: str = "tiny-run", run_overrides: dict | None = None,
                      tracking_uri: str | None = None, shards: Callable[[Path], object] | None = None,
                      **top: object) -> Path:
    """Shards (``shards(folder)`` or clean ones) + ``config.yaml`` under ``root``; returns the config.

    The dataset is declared ``source: emoji`` so no url-list file has to exist: training reads
    ``data/tiny/shards`` and ``data/tiny/sizes.json`` whatever built them.
    """
    root = Path(root)
    shard_dir = root / "data" / "tiny" / "shards"
    if not (shard_dir / "sizes.json").exists():
        (shards or (lambda d: make_shards(d, N_SHARDS, PER_SHARD, image_size=32, seed=0)))(shard_dir)
        shutil.copy(shard_dir / "sizes.json", shard_dir.parent / "sizes.json")
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    if tracking_uri is None:
        db = results / "mlflow.db"
        if not db.exists() and _TEMPLATE_DB.get("path"):
            shutil.copy(_TEMPLATE_DB["path"], db)
        tracking_uri = f"sqlite:///{db}"
    config = {
        "name": "fault-tests",
        "paths": {k: str(root / k) for k in ("data", "runs", "results", "resources")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "fault-tests"},
        "datasets": {"tiny": {"source": "emoji"}},
        "defaults": TINY_RUN,
        "runs": {run: run_overrides or {}},
        **top,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_LIVE_JOBS: list[Job] = []


@pytest.fixture(autouse=True)
def reap_jobs():
    """A test that fails half-way must not leave a trainer running (it would eat the CPU of the next)."""
    yield
    while _LIVE_JOBS:
        job = _LIVE_JOBS.pop()
        if job.proc.poll() is None:
            job.kill9()


class Job:
    """One ``amorlip <command>`` subprocess (its own process group), its log in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "w")  # noqa: SIM115 -- closed in wait()
        self.started = time.monotonic()
        _LIVE_JOBS.append(self)
        self.proc = subprocess.Popen([PY, "-m", "amorlip.cli", *args], cwd=REPO, env=env or child_env(),
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"job did not finish in {timeout} s; log {self.log}:\n{self.text()[-3000:]}"
                                 ) from None
        finally:
            self._fh.close()
        return rc

    def kill9(self) -> None:
        """SIGKILL the whole process group: nothing runs a handler, exactly as the OOM killer or a node loss."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._fh.close()

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def train_job(config: Path, run: str, log: Path, **env: str) -> Job:
    return Job(["train", "--config", str(config), "--run", run], log, child_env(**env))


def train_to_end(config: Path, run: str, log: Path, timeout: float = 300, **env: str) -> str:
    job = train_job(config, run, log, **env)
    rc = job.wait(timeout)
    assert rc == 0, f"training failed (rc {rc}); log {log}:\n{job.text()[-4000:]}"
    return job.text()


def run_dir(root: Path, run: str = "tiny-run") -> Path:
    return Path(root) / "runs" / run


# --------------------------------------------------------------------------- fixtures

_TEMPLATE_DB: dict[str, str] = {}


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables created once; each run starts from a copy."""
    from mlflow import MlflowClient  # imported here once anyway: tests read their runs back with it

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    _TEMPLATE_DB["path"] = str(path)
    return path


class ReferenceRun:
    """One uninterrupted tiny run (24 steps) with per-step sample keys: what the faults are compared to.

    It starts when first requested and runs beside the test that asked for it (two cores: the kill
    test's first attempt and this run overlap); :meth:`get` waits for it.
    """

    def __init__(self, root: Path):
        self.root = root
        self.config = write_tiny_config(root)
        self.keys = root / "keys"
        self.job = Job(["train", "--config", str(self.config), "--run", "tiny-run"], root / "train.log",
                       child_env(AMORLIP_DEBUG_KEYS=str(self.keys)))
        self._result: dict | None = None

    def get(self) -> dict:
        if self._result is None:
            rc = self.job.wait(300)
            assert rc == 0, f"reference run failed (rc {rc}):\n{self.job.text()[-4000:]}"
            summary = json.loads((run_dir(self.root) / "train.json").read_text())
            print(f"\nreference run: {summary['steps']} steps in {time.monotonic() - self.job.started:.1f} s")
            self._result = {"root": self.root, "config": self.config, "summary": summary,
                            "records": read_jsonl(f"{self.keys}.rank0.jsonl")}
        return self._result


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, mlflow_template_db) -> ReferenceRun:
    ref = ReferenceRun(tmp_path_factory.mktemp("reference"))
    _LIVE_JOBS.remove(ref.job)  # session-long: not reaped after the first test that uses it
    yield ref
    if ref.job.proc.poll() is None:
        ref.job.kill9()


def steps_and_keys(records: list[dict]) -> dict[int, list[str]]:
    """step -> sample keys, the last attempt winning (a killed attempt's steps are trained again)."""
    out: dict[int, list[str]] = {}
    for rec in records:
        if "keys" in rec:
            out[rec["step"]] = rec["keys"]
    return out


def keys_per_epoch(records: list[dict], steps_per_epoch: int) -> dict[int, list[str]]:
    """epoch -> sorted sample keys consumed in it (multiset, as a sorted list)."""
    epochs: dict[int, list[str]] = {}
    for step, keys in steps_and_keys(records).items():
        epochs.setdefault(step // steps_per_epoch, []).extend(keys)
    return {e: sorted(k) for e, k in epochs.items()}


# --------------------------------------------------------------------------- a real MLflow server


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend; can be stopped and started again."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db = self.root / "server.db"
        if not self.db.exists() and _TEMPLATE_DB.get("path"):
            shutil.copy(_TEMPLATE_DB["path"], self.db)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> MlflowServer:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")  # noqa: SIM115 -- lives with the server
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                                     start_new_session=True)
        wait_for(self.healthy, timeout, interval=0.3, what=f"mlflow server on {self.uri}", proc=self.proc)
        return self

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole server (gunicorn/uvicorn and its workers) and wait until the port is closed."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        wait_for(lambda: not self.healthy(), 20, what="mlflow server to go away")

    def pids(self) -> list[int]:
        """Every process of the server's group (the listening socket may belong to a worker)."""
        import psutil

        if self.proc is None:
            return []
        main = psutil.Process(self.proc.pid)
        return [main.pid] + [c.pid for c in main.children(recursive=True)]


@pytest.fixture
def mlflow_server(tmp_path, mlflow_template_db):
    server = MlflowServer(tmp_path / "mlflow-server")
    yield server
    server.stop()
