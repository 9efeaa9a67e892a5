"""The fixed-batch validation metric (amorlip/train/validation.py): its formula against a float64
re-derivation, the sample choice, and 2 gloo ranks scoring exactly what 1 rank scores.

Through the real Trainer (metrics.jsonl, MLflow, train.json): tests/test_train.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers_shards import make_shards

from amorlip.config import ValidationConfig
from amorlip.distributed import free_port
from amorlip.train.validation import FixedBatchValidation, symmetric_infonce, validation_samples


def _reference_infonce(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """Row by row in float64: -log softmax of the matching pair, both directions, averaged."""
    b = img.shape[0]
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    total = 0.0
    for i in range(b):
        for row in (logits[i, :], logits[:, i]):
            m = row.max()
            total += m + math.log(sum(math.exp(v - m) for v in row)) - row[i]
    return total / (2 * b)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def test_symmetric_infonce_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    img, txt = _unit(torch.randn(9, 5, generator=g)), _unit(torch.randn(9, 5, generator=g))
    for scale in (1.0 / 0.07, 100.0):
        assert symmetric_infonce(img, txt, scale) == pytest.approx(_reference_infonce(img.numpy(), txt.numpy(), scale),
                                                                   rel=1e-12)
    # the two directions differ: the metric is their mean, not one of them
    one_way = float((torch.logsumexp(14.0 * img.double() @ txt.double().T, 1) - 14.0 * (img.double() * txt.double()).sum(1)).mean())
    assert symmetric_infonce(img, txt, 14.0) != pytest.approx(one_way, rel=1e-6)
    # features that carry no information score log B; perfectly aligned, well-separated pairs score ~0
    same = _unit(torch.ones(6, 4))
    assert symmetric_infonce(same, same, 1 / 0.07) == pytest.approx(math.log(6), rel=1e-12)
    eye = torch.eye(4)
    assert symmetric_infonce(eye, eye, 100.0) < 1e-40


def test_validation_samples_depend_on_the_seed_and_the_data_only(tmp_path):
    shards = tmp_path / "shards"
    keys = make_shards(shards, 6, 10)
    a = validation_samples(shards, 8, seed=0)
    assert [k for k, _, _ in a] == sorted(k for k, _, _ in a) and len(a) == 8
    assert a == validation_samples(shards, 8, seed=0)  # fixed
    assert [k for k, _, _ in validation_samples(shards, 8, seed=1)] != [k for k, _, _ in a]
    # the pool is 4 x 8 = 32 samples: the first 4 shards of 6 (read in order, no further)
    assert {k[:5] for k, _, _ in a} <= {"00000", "00001", "00002", "00003"}
    assert len(validation_samples(shards, 100, seed=0)) == len(keys) == 60  # fewer than asked: all of them


def _tiny_model():
    from amorlip.models import create_model

    torch.manual_seed(5)
    model, _, _ = create_model("amorlip-tiny")
    return model


def _score(shards: Path, batch: int, rank: int = 0, world_size: int = 1) -> dict:
    cfg = ValidationConfig(batch_size=batch, temperature=0.05, seed=3)
    return FixedBatchValidation(shards, "amorlip-tiny", cfg, "cpu", rank=rank, world_size=world_size, chunk=4)(
        _tiny_model())


def _rank_worker(rank: int, world_size: int, port: int, shards: str, batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_score(Path(shards), batch, rank, world_size), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_score_the_batch_one_rank_scores(tmp_path):
    """7 samples on 2 ranks (slices of 4, the second padded): the same figure as one rank, and as the
    float64 reference over the model's features of the 7 samples in one pass."""
    from amorlip.models import get_tokenizer, image_transform
    from amorlip.train.validation import _decode

    shards = tmp_path / "shards"
    make_shards(shards, 2, 6)
    one = _score(shards, 7)
    mp.start_processes(_rank_worker, args=(2, free_port(), str(shards), 7, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    two = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert one["val_batch"] == two[0]["val_batch"] == two[1]["val_batch"] == 7
    assert two[0]["val_infonce"] == two[1]["val_infonce"]  # every rank holds the same figure
    assert two[0]["val_infonce"] == pytest.approx(one["val_infonce"], rel=1e-6)

    model = _tiny_model().eval()
    pixels, tokens = _decode(validation_samples(shards, 7, seed=3), image_transform("amorlip-tiny", train=False),
                             get_tokenizer("amorlip-tiny"))
    with torch.no_grad():
        img, txt = model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)
    assert one["val_infonce"] == pytest.approx(_reference_infonce(img.numpy(), txt.numpy(), 1 / 0.05), rel=1e-5)
    assert one["val_infonce"] != pytest.approx(math.log(7), rel=1e-3)  # an untrained model still scores its batch
