"""Training on damaged shards: 5% truncated JPEGs, undecodable bytes, empty captions, missing ``.txt``
and a tar cut in the middle of a sample. The run must complete, never train on a damaged sample, and
count every skip in ``train.json`` (``skipped_samples``) and in MLflow (metric ``skipped``).

The expected count is computed independently of the trainer: the same :class:`TrainLoader` geometry
replayed in this process (decoding only; the transform and tokenizer are trivial here because they do
not decide what is skipped).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from amorlip.data.loader import TrainLoader

from .conftest import (
    N_SHARDS,
    PER_SHARD,
    read_jsonl,
    run_dir,
    steps_and_keys,
    train_to_end,
    write_tiny_config,
)

TRUNCATED_SHARE = 0.05


def damage_shards(folder: Path) -> dict[str, set[str]]:
    """Clean shards, then damage them in place; returns the damaged keys by kind.

    Shards 0-2 get the per-sample damage; shard 3 is cut inside the image of its sample 40 (as after
    a failed copy), so sizes.json still counts the 8 samples the loader can no longer read.
    """
    from tests.helpers_shards import make_shards

    make_shards(folder, N_SHARDS, PER_SHARD, image_size=32, seed=0)
    rng = random.Random(5)
    candidates = [f"{s:05d}{i:04d}" for s in range(N_SHARDS - 1) for i in range(PER_SHARD)]
    n_truncated = round(TRUNCATED_SHARE * N_SHARDS * PER_SHARD)
    picked = rng.sample(candidates, n_truncated + 9)
    kinds = {"truncated_image": set(picked[:n_truncated]), "undecodable": set(picked[n_truncated:n_truncated + 3]),
             "empty_caption": set(picked[n_truncated + 3:n_truncated + 6]),
             "missing_txt": set(picked[n_truncated + 6:])}
    for tar_path in sorted(folder.glob("*.tar"))[: N_SHARDS - 1]:
        with tarfile.open(tar_path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for member, data in members:
                key, ext = member.name.split(".", 1)
                if ext == "jpg" and key in kinds["truncated_image"]:
                    data = data[: len(data) // 2]
                elif ext == "jpg" and key in kinds["undecodable"]:
                    data = bytes(random.Random(key).randrange(256) for _ in range(len(data)))
                elif ext == "txt" and key in kinds["empty_caption"]:
                    data = b"   "
                elif ext == "txt" and key in kinds["missing_txt"]:
                    continue
                member.size = len(data)
                tf.addfile(member, io.BytesIO(data))
    last = folder / f"{N_SHARDS - 1:05d}.tar"
    with tarfile.open(last) as tf:
        cut_member = next(m for m in tf.getmembers() if m.name == f"{N_SHARDS - 1:05d}0040.jpg")
    with open(last, "r+b") as fh:
        fh.truncate(cut_member.offset_data + cut_member.size // 2)
    kinds["truncated_tar"] = {f"{N_SHARDS - 1:05d}{i:04d}" for i in range(40, PER_SHARD)}
    return kinds


@pytest.fixture(scope="module")
def corrupt_run(tmp_path_factory, mlflow_template_db) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    damaged: dict[str, set[str]] = {}
    config = write_tiny_config(root, run_overrides={"epochs": 1},
                               shards=lambda folder: damaged.update(damage_shards(folder)))
    keys = root / "keys"
    log = train_to_end(config, "tiny-run", root / "train.log", AMORLIP_DEBUG_KEYS=str(keys))
    summary = json.loads((run_dir(root) / "train.json").read_text())
    return {"root": root, "damaged": damaged, "summary": summary, "log": log,
            "records": read_jsonl(f"{keys}.rank0.jsonl")}


def _expected_skips(shards: Path, steps: int) -> int:
    loader = TrainLoader(shards, None, local_batch_size=16, rank=0, world_size=1, workers=0, seed=0,
                         preprocess=lambda im: torch.zeros(3, 2, 2), tokenizer=lambda texts: torch.zeros(len(texts), 2))
    return sum(batch["skipped"] for _, batch in zip(range(steps), loader.epoch(0), strict=False))


def test_corrupt_shards_train_to_the_end_and_count_every_skip(corrupt_run):
    res = corrupt_run
    s = res["summary"]
    assert s["complete"] and s["steps"] == s["total_steps"] == 12
    expected = _expected_skips(res["root"] / "data" / "tiny" / "shards", s["steps"])
    damaged_in_one_pass = sum(len(v) for k, v in res["damaged"].items() if k != "truncated_tar") + 1
    # one full pass meets every damaged sample (the epoch needs more good samples than a pass holds)
    assert s["skipped_samples"] == expected >= damaged_in_one_pass, (s["skipped_samples"], expected)
    # a damaged sample never reaches the model: its place in the batch goes to a good one
    consumed = {k for keys in steps_and_keys(res["records"]).values() for k in keys}
    bad = set().union(*res["damaged"].values())
    assert not consumed & bad, sorted(consumed & bad)[:5]
    assert "unreadable tar" in res["log"] and "undecodable image" in res["log"]
    print(f"\ncorrupt shards: {s['skipped_samples']} samples skipped in {s['steps']} steps "
          f"({', '.join(f'{k}: {len(v)}' for k, v in res['damaged'].items())}); training completed")


def test_skips_reach_mlflow(corrupt_run):
    from mlflow import MlflowClient

    res = corrupt_run
    s = res["summary"]
    client = MlflowClient(tracking_uri=f"sqlite:///{res['root'] / 'results' / 'mlflow.db'}")
    history = client.get_metric_history(s["mlflow_run_id"], "skipped")
    assert history, "no 'skipped' metric in MLflow"
    last = max(history, key=lambda m: m.step)
    assert last.step == s["steps"] and last.value == s["skipped_samples"]
    assert client.get_run(s["mlflow_run_id"]).info.status == "FINISHED"
