"""The determinism contract: same url list, config and seed -> the same bits, on CPU.

``test_two_data_builds_and_two_trainings_are_bit_identical`` runs config/tiny.yaml's AmorLIP run
through the real Snakefile twice, on two data builds: the session's download (``tiny_data``) and a
second download of the same url list through img2dataset and the loopback server, whose tars are
then put in reverse sample order (the order a download whose fetches complete the other way round
writes). Both must give the same index, bit-identical ``model.pt`` weights and lambda nets, the same
losses at every logged step, the same evaluation JSON and the same summary row, wall times and run
ids aside. ``apply_determinism`` (the ``deterministic: true`` setting) is tested for what it sets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from tinydata import copy_tiny_data, tiny_config

from amorlip.config import get_run, load_config
from amorlip.determinism import CUBLAS_WORKSPACE, apply_determinism

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
DATASET = "emoji-tiny"


# --------------------------------------------------------------------------- apply_determinism


@pytest.fixture()
def restore_torch_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _run(deterministic: bool | None):
    runs = {"r": {"method": "clip"} if deterministic is None else {"method": "clip", "deterministic": deterministic}}
    return get_run(load_config({"runs": runs}, check_paths=False), "r")


def test_deterministic_setting_defaults_to_off_and_changes_nothing(restore_torch_flags):
    run = _run(None)
    assert run.deterministic is False and run.to_dict()["deterministic"] is False
    torch.backends.cudnn.benchmark = True
    assert apply_determinism(run) == {"deterministic": False}
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is True and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_setting_turns_on_torch_deterministic_algorithms(restore_torch_flags):
    torch.backends.cudnn.benchmark = True
    settings = apply_determinism(_run(True))
    assert settings == {"deterministic": True, "cublas_workspace_config": CUBLAS_WORKSPACE, "cudnn_benchmark": False}
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    # a reproducible value the user already chose is kept
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    assert apply_determinism(_run(True))["cublas_workspace_config"] == ":16:8"


# --------------------------------------------------------------------------- two builds, two trainings


def _snakemake(workdir: Path, *targets: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "1", *targets]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 900) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def _sample_order(shards: Path) -> list[list[str]]:
    order = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            order.append(list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile())))
    return order


def _reverse_samples(shards: Path) -> None:
    """Rewrite each tar with its samples in reverse order (members of a sample stay together)."""
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        samples: dict[str, list] = {}
        for member, data in members:
            samples.setdefault(member.name.split(".", 1)[0], []).append((member, data))
        with tarfile.open(tar_path, "w") as tf:
            for key in reversed(list(samples)):
                for member, data in samples[key]:
                    tf.addfile(member, io.BytesIO(data))


def _stable(obj):
    """``obj`` without what legitimately differs between reruns: wall times, rates, run ids."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items()
                if not (k.endswith("_s") or k == "time" or k.endswith("run_id"))}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _assert_identical(x, y, where: str = "model.pt") -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x, y), f"{where}: differs (max |diff| {(x.double() - y.double()).abs().max()})"
    elif isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), where
        for k in x:
            _assert_identical(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _assert_identical(a, b, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def _summary(root: Path) -> list[dict]:
    with open(root / "results" / "summary.csv") as fh:
        return [_stable(row) for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_two_data_builds_and_two_trainings_are_bit_identical(tmp_path: Path, tiny_data: Path) -> None:
    config = tiny_config()
    config["runs"] = {"amorlip": {"method": "amorlip"}}  # the method with the most state (lambda nets)
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    copy_tiny_data(tiny_data, a)  # build 1: the session's download, indexed
    for part in ("resources", "data/evalsets"):  # build 2: the same url list, downloaded again
        shutil.copytree(tiny_data / part, b / part, symlinks=True, copy_function=shutil.copy2)

    run_a = _snakemake(a, "all")
    _finish(_snakemake(b, f"data/{DATASET}/shards"))
    _reverse_samples(b / "data" / DATASET / "shards")
    assert _sample_order(b / "data" / DATASET / "shards") != _sample_order(a / "data" / DATASET / "shards")
    run_b = _snakemake(b, "all")
    _finish(run_a)
    _finish(run_b)

    for name in ("sizes.json", "manifest.json"):
        assert (a / "data" / DATASET / name).read_bytes() == (b / "data" / DATASET / name).read_bytes(), name
    assert _sample_order(a / "data" / DATASET / "shards") == _sample_order(b / "data" / DATASET / "shards")

    model_a = torch.load(a / "runs/amorlip/model.pt", weights_only=True, map_location="cpu")
    model_b = torch.load(b / "runs/amorlip/model.pt", weights_only=True, map_location="cpu")
    assert model_a["lambda_nets"] is not None
    _assert_identical(model_a, model_b)

    train_a, train_b = (json.loads((r / "runs/amorlip/train.json").read_text()) for r in (a, b))
    assert _stable(train_a) == _stable(train_b)
    curve_a, curve_b = ([_stable(json.loads(line)) for line in (r / "runs/amorlip/metrics.jsonl").read_text().splitlines()]
                        for r in (a, b))
    assert len(curve_a) >= 4 and curve_a == curve_b
    eval_a, eval_b = (json.loads((r / "results/amorlip/emoji-heldout.json").read_text()) for r in (a, b))
    assert eval_a["aggregates"]["covered"] == 3 and _stable(eval_a) == _stable(eval_b)
    assert _summary(a) == _summary(b)
    # the results table holds results only (timings are in timing.csv): byte-identical
    assert (a / "results" / "summary.csv").read_bytes() == (b / "results" / "summary.csv").read_bytes()
