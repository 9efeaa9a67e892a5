"""Global negatives on 2 gloo ranks equal the single-process objectives on the concatenated batch.

Scaling under test (docstrings of the objectives): with W ranks, sum_r L_r = W x L_single, so
DDP/DeepSpeed's gradient mean reproduces the single-process gradient. Gradients of a rank's local
features come back through the autograd all-gather summed over all ranks' losses, hence equal
W x dL_single/d(local rows); the logit scale is a per-rank parameter whose rank-mean gradient equals
dL_single/ds.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from amorlip.amortizer import LambdaState
from amorlip.objectives import (
    clip_loss,
    encoder_loss,
    lambda_loss,
    partition_targets,
    siglip_loss,
    weighted_logits,
)

WORLD, LOCAL, DIM = 2, 6, 8
GLOBAL = WORLD * LOCAL
SCALE, BIAS, POS_COEF = 14.3, -3.0, 1e-3


def make_data():
    g = torch.Generator().manual_seed(0)
    return {
        "img": F.normalize(torch.randn(GLOBAL, DIM, generator=g), dim=-1),
        "txt": F.normalize(torch.randn(GLOBAL, DIM, generator=g), dim=-1),
        "log_lambda_img": torch.randn(GLOBAL, generator=g) + 6.0,
        "log_lambda_txt": torch.randn(GLOBAL, generator=g) + 6.0,
        "log_f": torch.randn(GLOBAL, generator=g) + 2.0,
    }


def objectives(data, rows, group):
    """Every objective on the given rows (local batch or all), with grads w.r.t. features and s."""
    results = {}
    losses = {
        "clip": lambda x, y, s: clip_loss(x, y, s, group=group),
        "siglip": lambda x, y, s: siglip_loss(x, y, s, BIAS, group=group),
        "encoder": lambda x, y, s: encoder_loss(x, y, s, data["log_lambda_img"][rows], data["log_lambda_txt"][rows],
                                                pos_coef=POS_COEF, group=group),
    }
    for name, fn in losses.items():
        x = data["img"][rows].clone().requires_grad_()
        y = data["txt"][rows].clone().requires_grad_()
        s = torch.tensor(SCALE, requires_grad=True)
        loss = fn(x, y, s)
        loss.backward()
        results[name] = (loss.detach(), x.grad, y.grad, s.grad)
    x, y = data["img"][rows], data["txt"][rows]
    results["targets"] = partition_targets(x, y, SCALE, pos_coef=POS_COEF, group=group)
    image_rows, text_rows = weighted_logits(x, y, SCALE, POS_COEF, group)
    f = data["log_f"][rows]
    t_img, t_txt = results["targets"]
    for kind in ("kl", "js"):
        results[kind] = (lambda_loss(f, t_img, kind, pair_logits=image_rows).detach(),
                         lambda_loss(f, t_txt, kind, pair_logits=text_rows).detach())
    # Stage I on 2 ranks: all-reduced gradients keep the nets identical and equal to one process
    state = LambdaState(DIM, lr=1e-2, seed=5, group=group)
    state.start_epoch(0)
    state.fit(x, y, lambda li, lt: lambda_loss(li, t_img) + lambda_loss(lt, t_txt), 3)
    results["lambda_params"] = [p.detach().clone() for p in state.online.parameters()]
    return results


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        torch.save(objectives(make_data(), rows, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.dist
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # the single-process case (the same code with group=None) on the concatenated batch; its
    # values against float64 re-derivations are tested in test_objectives.py
    single = objectives(make_data(), slice(0, GLOBAL), None)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    for name in ("clip", "siglip", "encoder"):
        loss, gx, gy, gs = single[name]
        close(sum(r[name][0] for r in ranks) / WORLD, loss)
        for rank, result in enumerate(ranks):
            rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
            close(result[name][1], WORLD * gx[rows])
            close(result[name][2], WORLD * gy[rows])
        close(sum(r[name][3] for r in ranks) / WORLD, gs)
    for side in range(2):
        close(torch.cat([r["targets"][side] for r in ranks]), single["targets"][side])
    for kind in ("kl", "js"):
        for side in range(2):
            close(sum(r[kind][side] for r in ranks) / WORLD, single[kind][side])
    # lambda_lr_scaling none: each rank runs Adam at lambda_lr, so the 2 ranks equal one process at that lr
    data = make_data()
    t_img, t_txt = single["targets"]
    reference = LambdaState(DIM, lr=1e-2, seed=5)
    reference.start_epoch(0)
    reference.fit(data["img"], data["txt"], lambda li, lt: lambda_loss(li, t_img) + lambda_loss(lt, t_txt), 3)
    for p0, p1, pref in zip(ranks[0]["lambda_params"], ranks[1]["lambda_params"], reference.online.parameters()):
        assert torch.equal(p0, p1)
        close(p0, pref.detach())
