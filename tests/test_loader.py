"""TrainLoader through its contract, on real webdataset shards (tests/helpers_shards.py).

Deterministic per (seed, epoch, rank); fixed-length epochs on every rank; shards split by node and
worker without overlap within a pass; resampling beyond a pass; resume equal to the uninterrupted
tail; corrupt samples and a truncated tar skipped and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers_shards import make_shards

from amorlip.data.loader import TrainLoader, iter_shard, read_sizes
from amorlip.models import get_tokenizer, image_transform

PREPROCESS = image_transform("amorlip-tiny", train=True)  # open_clip's augmenting train transform
TOKENIZER = get_tokenizer("amorlip-tiny")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """8 shards x 8 samples: with 2 ranks x 2 workers every slot reads exactly 2 shards per pass."""
    folder = tmp_path_factory.mktemp("shards")
    return folder, make_shards(folder, n_shards=8, per_shard=8)


def _loader(folder: Path, **kw) -> TrainLoader:
    args = {"local_batch_size": 4, "rank": 0, "world_size": 1, "workers": 0, "seed": 0,
            "preprocess": PREPROCESS, "tokenizer": TOKENIZER}
    args.update(kw)
    return TrainLoader(folder, None, **args)


def _keys(batches: list[dict]) -> list[list[str]]:
    return [b["keys"] for b in batches]


def test_batches_have_the_contracted_shape(shards):
    folder, keys = shards
    loader = _loader(folder)
    assert loader.total_samples == len(keys) == 64
    assert len(loader) == loader.steps_per_epoch == 64 // 4
    batches = list(loader.epoch(0))
    assert len(batches) == 16 and [b["step"] for b in batches] == list(range(16))
    b = batches[0]
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.float32
    assert b["texts"].shape == (4, 16) and b["texts"].dtype == torch.long
    assert len(b["keys"]) == 4 and b["skipped"] == 0
    # one pass on one slot: every sample exactly once
    assert sorted(k for ks in _keys(batches) for k in ks) == sorted(keys)


def test_same_seed_and_epoch_give_the_same_batches(shards):
    folder, _ = shards
    first = list(_loader(folder).epoch(0))
    again = list(_loader(folder).epoch(0))
    assert _keys(first) == _keys(again)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again, strict=True))
    # one worker process computes the same single slot as the in-process path
    in_worker = list(_loader(folder, workers=1).epoch(0))
    assert _keys(in_worker) == _keys(first)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, in_worker, strict=True))
    other_epoch = list(_loader(folder).epoch(1))
    assert _keys(other_epoch) != _keys(first)
    assert sorted(map(tuple, _keys(other_epoch))) != sorted(map(tuple, _keys(first)))
    assert _keys(list(_loader(folder, seed=1).epoch(0))) != _keys(first)


def _ranks(folder: Path, world_size: int, workers: int, **kw) -> dict[tuple[int, int], list[str]]:
    """Keys per slot (rank, worker); step t of a rank comes from its worker t % workers."""
    slots: dict[tuple[int, int], list[str]] = {}
    lengths = []
    for rank in range(world_size):
        loader = _loader(folder, rank=rank, world_size=world_size, workers=workers, local_batch_size=2, **kw)
        batches = list(loader.epoch(3))
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            slots.setdefault((rank, b["step"] % max(workers, 1)), []).extend(b["keys"])
    assert len(set(lengths)) == 1, f"ranks yield different epoch lengths: {lengths}"
    return slots


def test_ranks_and_workers_split_one_pass_without_overlap(shards):
    folder, keys = shards
    slots = _ranks(folder, world_size=2, workers=2)
    assert len(slots) == 4
    seen = [k for ks in slots.values() for k in ks]
    assert len(seen) == len(set(seen)) == len(keys)  # no key in two slots, none twice
    assert set(seen) == set(keys)


def test_fewer_shards_than_slots_split_samples(tmp_path):
    keys = make_shards(tmp_path, n_shards=2, per_shard=8)
    slots = _ranks(tmp_path, world_size=2, workers=2)
    seen = [k for ks in slots.values() for k in ks]
    assert sorted(seen) == sorted(keys)


def test_longer_epochs_resample_whole_passes(shards):
    folder, keys = shards
    slots = _ranks(folder, world_size=2, workers=2, samples_per_epoch=3 * len(keys))
    counts = Counter(k for ks in slots.values() for k in ks)
    assert set(counts) == set(keys) and set(counts.values()) == {3}


def test_uneven_steps_keep_every_rank_equal(shards):
    folder, _ = shards
    # 50 samples / (3 x 2 ranks) = 8 steps on each rank, whatever their shards hold
    lengths = [len(list(_loader(folder, rank=r, world_size=2, workers=2, local_batch_size=3,
                                samples_per_epoch=50).epoch(0))) for r in range(2)]
    assert lengths == [8, 8]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core runner
@pytest.mark.parametrize("workers, start_step", [(0, 5), (2, 3), (2, 6), (3, 10)])
def test_resume_yields_the_uninterrupted_tail(shards, workers, start_step):
    folder, _ = shards
    loader = _loader(folder, workers=workers, local_batch_size=5)  # 12 steps: uneven per worker
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=start_step))
    assert [b["step"] for b in tail] == list(range(start_step, len(loader)))
    assert _keys(tail) == _keys(full[start_step:])
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
               for a, b in zip(tail, full[start_step:], strict=True))
    assert list(loader.epoch(2, start_step=len(loader))) == []
    with pytest.raises(ValueError):
        list(loader.epoch(2, start_step=len(loader) + 1))


def test_workers_do_not_change_the_rng_of_the_caller(shards):
    folder, _ = shards
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(_loader(folder).epoch(0)))
    assert torch.equal(torch.rand(3), expected)


CORRUPT = {"garbage_image": 0, "truncated_image": 1, "empty_caption": 2, "missing_txt": 3,
           "missing_image": 4, "truncated_tar": 5}


def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path):
    good = make_shards(tmp_path, n_shards=6, per_shard=8, corrupt=CORRUPT)
    assert len(good) == 48 - 5 - 1
    # one pass = the good samples + the 2 whose images only fail at decode
    loader = _loader(tmp_path, samples_per_epoch=len(good) + 2)
    batches = list(loader.epoch(0))
    keys = [k for b in batches for k in b["keys"]]
    assert all(b["images"].shape == (4, 3, 32, 32) for b in batches)  # B is kept on every step
    # 3 incomplete samples + the truncated tar's cut sample + 2 undecodable images
    assert sum(b["skipped"] for b in batches) == 6
    assert set(keys) == set(good) and len(keys) == len(good) + 2  # undecodable places refilled
    # the same with workers: nothing corrupt comes through, every step is full
    batches = list(_loader(tmp_path, workers=2).epoch(1))
    assert sum(b["skipped"] for b in batches) > 0
    assert {k for b in batches for k in b["keys"]} <= set(good)


def test_truncated_tar_yields_the_samples_before_the_damage(tmp_path):
    good = make_shards(tmp_path, n_shards=1, per_shard=6, corrupt={"truncated_tar": 0})
    from amorlip.data.loader import _DropCounter

    drops = _DropCounter()
    assert good == [f"00000{i:04d}" for i in range(5)]
    assert [s[0] for s in iter_shard(tmp_path / "00000.tar", drops)] == good
    assert drops.n == 1


def test_sizes_come_from_sizes_json_in_the_folder_or_its_parent(tmp_path):
    shard_dir = tmp_path / "ds" / "shards"
    make_shards(shard_dir, n_shards=2, per_shard=3)
    (shard_dir / "sizes.json").rename(tmp_path / "ds" / "sizes.json")
    assert read_sizes(shard_dir) == {"00000.tar": 3, "00001.tar": 3}
    (tmp_path / "ds" / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00007.tar": 3}))
    with pytest.raises(FileNotFoundError, match="missing"):
        _loader(shard_dir)


def test_resume_replays_without_decoding(shards):
    folder, _ = shards
    calls = []

    def counting_preprocess(image):
        calls.append(image.size)
        return PREPROCESS(image)

    loader = _loader(folder, preprocess=counting_preprocess)
    tail = list(loader.epoch(0, start_step=10))
    assert len(tail) == 6 and len(calls) == 6 * 4  # only the yielded batches were decoded


def test_a_batch_larger_than_the_dataset_is_refused(shards):
    """It used to give one step whose batch repeated samples (an image against its own copy)."""
    folder, keys = shards
    assert len(keys) == 64
    with pytest.raises(ValueError, match="holds 64 samples, fewer than one global batch of 66") as info:
        _loader(folder, local_batch_size=33, rank=1, world_size=2)
    assert "batch_size to at most 64" in str(info.value)
    batch = next(iter(_loader(folder, local_batch_size=64).epoch(0)))  # exactly the dataset: each once
    assert len(batch["keys"]) == len(set(batch["keys"])) == 64


def _expected_indices(folder: Path) -> dict[str, int]:
    """key -> dense index, read independently: shards by name, key groups with an image in tar order."""
    import tarfile

    out: dict[str, int] = {}
    for tar in sorted(folder.glob("*.tar")):
        keys: list[str] = []
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                key, ext = name.split(".", 1)
                if ext in ("jpg", "jpeg", "png", "webp") and key not in keys:
                    keys.append(key)
        out.update({k: len(out) + i for i, k in enumerate(keys)})
    return out


def _pairs(batches: list[dict]) -> list[tuple[str, int]]:
    pairs = []
    for b in batches:
        assert b["indices"].dtype == torch.long and b["indices"].shape == (len(b["keys"]),)
        pairs.extend(zip(b["keys"], b["indices"].tolist(), strict=True))
    return pairs


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dense_indices_name_the_same_sample_across_shard_order_workers_ranks_and_resume(shards):
    folder, keys = shards
    expected = _expected_indices(folder)
    assert sorted(expected.values()) == list(range(64))
    seen: list[tuple[str, int]] = []
    for epoch in (0, 1):  # each epoch reads the shards in another order
        seen += _pairs(list(_loader(folder).epoch(epoch)))
    for rank in range(2):
        loader = _loader(folder, rank=rank, world_size=2, workers=2, local_batch_size=2)
        seen += _pairs(list(loader.epoch(3)))
        seen += _pairs(list(loader.epoch(3, start_step=5)))  # resume
    assert {k for k, _ in seen} == set(keys)
    assert all(expected[k] == i for k, i in seen)


def test_dense_indices_when_slots_split_shards_and_samples_are_damaged(tmp_path):
    keys = make_shards(tmp_path, n_shards=2, per_shard=8,
                       corrupt={"missing_image": 0, "empty_caption": 0, "garbage_image": 1})
    expected = _expected_indices(tmp_path)
    assert sorted(expected.values()) == list(range(sum(read_sizes(tmp_path).values())))
    seen = []
    for rank in range(2):
        seen += _pairs(list(_loader(tmp_path, rank=rank, world_size=2, workers=2,
                                    local_batch_size=2).epoch(0)))
    assert seen and {k for k, _ in seen} <= set(keys)  # damaged samples never appear
    assert all(expected[k] == i for k, i in seen)
