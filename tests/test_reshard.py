"""Key-order resharding (amorlip/data/reshard.py) and the index step that runs it.

Two copies of the same shards (tests/helpers_shards.py) stand for two downloads of one url list:
one copy has each tar's samples in a different order with img2dataset's own headers (a member's
mtime is the write time), as another download timing writes them. After the index step both must
feed the loader the same batches. A ``kill -9`` in the middle of a pass must leave complete tars
and no index, and a rerun must finish the job.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers_shards import make_shards

from amorlip.config import load_config
from amorlip.data.download import write_index
from amorlip.data.loader import TrainLoader
from amorlip.data.reshard import canonicalize_shards, split_name
from amorlip.models import get_tokenizer, image_transform

PREPROCESS = image_transform("amorlip-tiny", train=True)
TOKENIZER = get_tokenizer("amorlip-tiny")
N_SHARDS, PER_SHARD = 3, 12


def _members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def _shuffle_like_a_download(folder: Path, seed: int) -> None:
    """Rewrite every tar with its samples in a seeded random order and a write-time mtime, as
    img2dataset's thread pool writes them when downloads complete in another order."""
    for tar_path in sorted(folder.glob("*.tar")):
        samples: dict[str, list] = {}
        for member, data in _members(tar_path):
            samples.setdefault(split_name(member.name)[0], []).append((member, data))
        keys = list(samples)
        random.Random(seed).shuffle(keys)
        with tarfile.open(tar_path, "w") as tf:
            for key in keys:
                for member, data in samples[key]:
                    member.mtime = time.time()
                    member.uname = "bigdata"
                    tf.addfile(member, io.BytesIO(data))


def _key_order(folder: Path) -> list[list[str]]:
    return [[m.name for m, _ in _members(p)] for p in sorted(folder.glob("*.tar"))]


def _epoch_keys(folder: Path, epoch: int = 0) -> list[list[str]]:
    loader = TrainLoader(folder, None, local_batch_size=8, rank=0, world_size=1, workers=0, seed=3,
                         preprocess=PREPROCESS, tokenizer=TOKENIZER)
    return [b["keys"] for b in loader.epoch(epoch)]


@pytest.fixture()
def two_builds(tmp_path) -> tuple[Path, Path]:
    """The same samples twice; the second copy in another order (seeded, so reruns are alike)."""
    a, b = tmp_path / "a" / "shards", tmp_path / "b" / "shards"
    make_shards(a, N_SHARDS, PER_SHARD, seed=5)
    make_shards(b, N_SHARDS, PER_SHARD, seed=5)
    _shuffle_like_a_download(b, seed=11)
    return a, b


def test_reshard_makes_two_download_orders_feed_the_same_batches(two_builds):
    a, b = two_builds
    assert _key_order(a) != _key_order(b)
    assert _epoch_keys(a) != _epoch_keys(b)  # without the reshard the data order differs

    ra = canonicalize_shards(a, [f"{i:05d}" for i in range(N_SHARDS)])
    rb = canonicalize_shards(b, [f"{i:05d}" for i in range(N_SHARDS)])
    assert rb["rewritten"] == N_SHARDS and rb["shards"] == N_SHARDS
    assert ra["samples_sha256"] == rb["samples_sha256"]
    for name in (f"{i:05d}.tar" for i in range(N_SHARDS)):
        assert (a / name).read_bytes() == (b / name).read_bytes()  # byte-identical tars
        names = [split_name(m.name) for m, _ in _members(b / name)]
        assert names == sorted(names)
    assert _epoch_keys(a) == _epoch_keys(b) and _epoch_keys(a, 1) == _epoch_keys(b, 1)

    before = {p.name: p.stat().st_mtime_ns for p in b.glob("*.tar")}
    again = canonicalize_shards(b, [f"{i:05d}" for i in range(N_SHARDS)])
    assert again == {**rb, "rewritten": 0}  # a canonical tar is read, never rewritten
    assert {p.name: p.stat().st_mtime_ns for p in b.glob("*.tar")} == before


def test_samples_digest_changes_with_a_caption(two_builds):
    a, b = two_builds
    shards = [f"{i:05d}" for i in range(N_SHARDS)]
    ref = canonicalize_shards(a, shards)["samples_sha256"]
    members = _members(b / "00001.tar")
    with tarfile.open(b / "00001.tar", "w") as tf:
        for member, data in members:
            if member.name.endswith(".txt") and member.name.startswith("000010003"):
                data = b"another caption"
                member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    assert canonicalize_shards(b, shards)["samples_sha256"] != ref


def _index_config(root: Path) -> dict:
    return load_config({
        "paths": {k: str(root / k) for k in ("data", "runs", "results", "resources")},
        "datasets": {"tiny": {"source": "url_list", "url_list": "unused.tsv", "image_size": 32}},
        "runs": {"clip": {"method": "clip", "dataset": "tiny", "model": "amorlip-tiny"}},
    }, check_paths=False)


def test_index_reshards_and_keeps_the_accounting(tmp_path):
    """write_index on two orders of the same download: identical sizes.json and manifest.json."""
    out = {}
    for name, seed in (("a", None), ("b", 11)):
        root = tmp_path / name
        shards = root / "data" / "tiny" / "shards"
        make_shards(shards, N_SHARDS, PER_SHARD, seed=5)
        (shards / "sizes.json").unlink()  # only the index's own sizes.json beside the shards
        if seed is not None:
            _shuffle_like_a_download(shards, seed)
        manifest = write_index(_index_config(root), "tiny", shards)
        sizes = json.loads((root / "data" / "tiny" / "sizes.json").read_text())
        out[name] = (manifest, sizes, (root / "data" / "tiny" / "manifest.json").read_bytes())
    (ma, sa, raw_a), (mb, sb, raw_b) = out["a"], out["b"]
    assert raw_a == raw_b and ma == mb and sa == sb
    assert ma["samples"] == N_SHARDS * PER_SHARD == ma["attempted"] and ma["failed"] == 0
    assert len(ma["samples_sha256"]) == 64


_KILL_ON_SECOND_REPLACE = """
import os, signal, sys
from amorlip.data.reshard import canonicalize_shards
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the second shard's rename: die as kill -9 would, its temporary tar left behind
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
folder, stale = sys.argv[1], sys.argv[2]
canonicalize_shards(folder, sorted(p[:5] for p in os.listdir(folder) if p.endswith(".tar")), stale=[stale])
"""


def test_reshard_killed_midway_leaves_complete_tars_no_index_and_a_rerun_finishes(two_builds, tmp_path):
    a, b = two_builds
    shards = [f"{i:05d}" for i in range(N_SHARDS)]
    reference = canonicalize_shards(a, shards)
    sizes_json = b.parent / "sizes.json"
    sizes_json.write_text(json.dumps({f"{s}.tar": PER_SHARD for s in shards}))  # an earlier index
    originals = {s: sorted(m.name for m, _ in _members(b / f"{s}.tar")) for s in shards}

    proc = subprocess.run([sys.executable, "-c", _KILL_ON_SECOND_REPLACE, str(b), str(sizes_json)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not sizes_json.exists()  # no index claims the half-resharded set is ready
    assert list(b.glob(".*.tar.*.tmp"))  # the killed rewrite's temporary tar
    assert (b / "00000.tar").read_bytes() == (a / "00000.tar").read_bytes()  # first shard done
    assert (b / "00001.tar").read_bytes() != (a / "00001.tar").read_bytes()  # second still as downloaded
    for s in shards:  # every tar complete, with its whole sample set
        assert sorted(m.name for m, _ in _members(b / f"{s}.tar")) == originals[s]

    rerun = canonicalize_shards(b, shards)
    assert rerun["rewritten"] == N_SHARDS - 1 and rerun["samples_sha256"] == reference["samples_sha256"]
    assert not list(b.glob(".*.tmp"))
    for s in shards:
        assert (b / f"{s}.tar").read_bytes() == (a / f"{s}.tar").read_bytes()
    assert _epoch_keys(a) == _epoch_keys(b)


def test_reshard_keeps_every_member_byte(two_builds):
    _, b = two_builds
    before = {p.name: sorted((m.name, d) for m, d in _members(p)) for p in b.glob("*.tar")}
    canonicalize_shards(b, [f"{i:05d}" for i in range(N_SHARDS)])
    after = {p.name: sorted((m.name, d) for m, d in _members(p)) for p in b.glob("*.tar")}
    assert after == before
    assert all(m.mtime == 0 and m.uname == "" for p in b.glob("*.tar") for m, _ in _members(p))
