"""Tiny training setups for the trainer tests: real shards, a real config file, the real CLI.

``tiny_setup(root, runs)`` writes shards (tests/helpers_shards.py) under ``root/data/tiny/shards`` and
``root/config.yaml`` with every path inside ``root`` and an MLflow SQLite store in
``root/results``; :func:`train_cmd` / :func:`run_cli` launch ``amorlip train`` as a user would
(one process, or ``torchrun`` with N ranks on gloo).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import yaml
from helpers_shards import make_shards
from PIL import Image

# 4 shards x 48 samples = 192 samples; batch 16 -> 12 steps per epoch on one or two ranks
TINY_RUN = {
    "model": "amorlip-tiny", "dataset": "tiny", "batch_size": 16, "epochs": 2, "lr": 2e-3,
    "warmup_steps": 2, "workers": 0, "seed": 0, "checkpoint_every": 5, "keep_checkpoints": 3,
    "log_every": 1, "weight_decay": 0.0,
    "amorlip": {"beta_epochs": 1, "rho": [0.0]},
}


COLOUR_NAMES = ["black", "blue", "green", "cyan", "red", "magenta", "yellow", "white"]


def colour_name(jpeg: bytes) -> str:
    """One of 8 names from which channels of the image's mean colour are above half intensity."""
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    r, g, b = (mean > 127.5).astype(int)
    return COLOUR_NAMES[4 * r + 2 * g + b]


def recaption_by_colour(shards: Path) -> None:
    """Rewrite each shard's captions as "a {colour} square" so that text and image share a signal.

    helpers_shards draws captions independently of the images; a contrastive loss then cannot drop
    below ln(batch) and "the loss decreases" would test nothing. Keys, order and sizes are unchanged.
    """
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        images = {m.name.rsplit(".", 1)[0]: data for m, data in members if m.name.endswith(".jpg")}
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for member, data in members:
                key = member.name.rsplit(".", 1)[0]
                if member.name.endswith(".txt") and key in images:
                    data = f"a {colour_name(images[key])} square".encode()
                    member.size = len(data)
                tf.addfile(member, io.BytesIO(data))


def tiny_setup(root: str | Path, runs: dict[str, dict], n_shards: int = 4, per_shard: int = 48,
               tracking_uri: str | None = None, defaults: dict | None = None) -> Path:
    """Shards + config.yaml under ``root``; returns the config path."""
    root = Path(root)
    shards = root / "data" / "tiny" / "shards"
    if not (shards / "sizes.json").exists():
        make_shards(shards, n_shards, per_shard, image_size=32, seed=0)
        recaption_by_colour(shards)
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
    # "--" ends torchrun's own options: without it torchrun's argparse takes our "--run" for an
    # abbreviation of its "--run-path" and stops ("ambiguous option")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "amorlip.cli", "--", command, "--config", str(config), "--run", run]


def run_cli(config: Path, run: str, nproc: int = 1, timeout: int = 240, env: dict | None = None,
            command: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, run, nproc, command), env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- shared trained runs

# Runs shared by test_train.py, test_export.py and test_diagnostics.py (one setup per test session,
# under pytest's basetemp): 12 steps per epoch, global batch 16. Tests that must watch a run train
# (signals, kills, a dead MLflow) use their own runs in a fresh folder instead (trainer_root).
SHARED_RUNS = {
    "amor": {"method": "amorlip"},                                                  # 1 rank, ZeRO-1
    "z3": {"method": "siglip", "zero_stage": 3, "max_steps": 6, "max_logit_scale": 10.0},  # partitioned
}


def trainer_root(root: Path, runs: dict[str, dict]) -> Path:
    """Shards, config.yaml and the pipeline's MLflow parent run under ``root``; returns ``root``."""
    from amorlip.config import load_config
    from amorlip.tracking import init_pipeline

    root.mkdir(parents=True, exist_ok=True)
    config_path = tiny_setup(root, runs)
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:  # the pipeline's parent run, as `amorlip mlflow init` would create it
        init_pipeline(load_config(config_path), root / "results" / "mlflow_parent.json")
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    return root


def shared_root(tmp_path_factory) -> Path:
    """The session's shared training folder (created once; later calls reuse it)."""
    root = tmp_path_factory.getbasetemp() / "trainer-runs"
    if not (root / "config.yaml").exists():
        trainer_root(root, SHARED_RUNS)
    return root


def ensure_trained(root: Path, run: str, env: dict | None = None) -> subprocess.CompletedProcess | None:
    """Train ``run`` unless its train.json exists (another test module may have trained it)."""
    if (root / "runs" / run / "train.json").exists():
        return None
    nproc = SHARED_RUNS[run].get("nproc", 1)
    res = run_cli(root / "config.yaml", run, nproc=nproc, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res
