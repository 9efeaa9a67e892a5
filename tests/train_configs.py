"""Tiny training setups for the trainer tests: real shards, a real config file, the real CLI.

``tiny_setup(root, runs)`` writes shards (tests/helpers_shards.py) under ``root/data/tiny/shards`` and
``root/config.yaml`` with every path inside ``root`` and an MLflow SQLite store in
``root/results``; :func:`train_cmd` / :func:`run_cli` launch ``amorlip train`` as a user would
(one process, or ``torchrun`` with N ranks on gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers_shards import make_shards

# 4 shards x 48 samples = 192 samples; batch 16 -> 12 steps per epoch on one or two ranks
TINY_RUN = {
    "model": "amorlip-tiny", "dataset": "tiny", "batch_size": 16, "epochs": 2, "lr": 2e-3,
    "warmup_steps": 2, "workers": 0, "seed": 0, "checkpoint_every": 5, "keep_checkpoints": 3,
    "log_every": 1, "weight_decay": 0.0,
    "amorlip": {"beta_epochs": 1, "rho": [0.0]},
}


def tiny_setup(root: str | Path, runs: dict[str, dict], n_shards: int = 4, per_shard: int = 48,
               tracking_uri: str | None = None, defaults: dict | None = None) -> Path:
    """Shards + config.yaml under ``root``; returns the config path."""
    root = Path(root)
    shards = root / "data" / "tiny" / "shards"
    if not (shards / "sizes.json").exists():
        make_shards(shards, n_shards, per_shard, image_size=32, seed=0)
        (shards.parent / "sizes.json").write_text((shards / "sizes.json").read_text())
    config = {
        "name": "train-tests",
        "paths": {k: str(root / k) for k in ("data", "runs", "results", "resources")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "train-tests"},
        "datasets": {"tiny": {"source": "emoji"}},
        "defaults": {**TINY_RUN, **(defaults or {})},
        "runs": runs,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "MLFLOW_TRACKING_URI", "SLURM_NTASKS", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def train_cmd(config: Path, run: str, nproc: int = 1, command: str = "train") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "amorlip.cli", command, "--config", str(config), "--run", run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "amorlip.cli", command, "--config", str(config), "--run", run]


def run_cli(config: Path, run: str, nproc: int = 1, timeout: int = 240, env: dict | None = None,
            command: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, run, nproc, command), env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
