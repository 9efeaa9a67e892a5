"""FastCLIP-v3 (RGCL-g) against a float64 re-derivation from the paper's equations.

The reference computes, by explicit loops, g1_i = 1/(N-1) sum_{j != i} exp(s (x_i.y_j - x_i.y_i)) (and
g2 with x, y swapped), the update u <- (1 - gamma) u + gamma g, and the compositional gradient
written out by hand: d/dw = mean_i [ tau/(eps+u1_i) dg1_i/dw + tau/(eps+u2_i) dg2_i/dw ] / 2 and
d/dtau = mean_i [ log u1_i + log u2_i + tau/(eps+u1_i) dg1_i/dtau + tau/(eps+u2_i) dg2_i/dtau ] / 2 + rho
(converted to d/ds with tau = 1/s; log u without eps, as the authors' FastCLIPLoss.forward takes it). The
code under test is fp32 and log space.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_tasks import EMBED, ClusteredPairs, TwoTowers, engine_and_task

from amorlip.config import get_run, load_config
from amorlip.objectives.fastclip import (
    fastclip_loss,
    gamma_for_epoch,
    log_batch_normalisers,
    rgcl_value,
    update_log_u,
)
from amorlip.tasks import FastclipTask, build_task
from amorlip.train import checkpoint as ckpt
from amorlip.train.step import encoder_step


def unit(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


def ref_g_and_grads(x, y, s):
    """g1, g2 [B]; dg1_i/dx, dg1_i/dy, dg2_i/dx, dg2_i/dy as [B, B, D]; dg1_i/ds, dg2_i/ds [B]."""
    b, d = x.shape
    n1 = b - 1
    g1 = torch.zeros(b, dtype=torch.float64)
    g2 = torch.zeros(b, dtype=torch.float64)
    dg1_dx = torch.zeros(b, b, d, dtype=torch.float64)
    dg1_dy = torch.zeros(b, b, d, dtype=torch.float64)
    dg2_dx = torch.zeros(b, b, d, dtype=torch.float64)
    dg2_dy = torch.zeros(b, b, d, dtype=torch.float64)
    dg1_ds = torch.zeros(b, dtype=torch.float64)
    dg2_ds = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        pos = float(x[i] @ y[i])
        for j in range(b):
            if j == i:
                continue
            # image i against text j
            e = math.exp(s * (float(x[i] @ y[j]) - pos)) / n1
            g1[i] += e
            dg1_dx[i, i] += e * s * (y[j] - y[i])
            dg1_dy[i, j] += e * s * x[i]
            dg1_dy[i, i] -= e * s * x[i]
            dg1_ds[i] += e * (float(x[i] @ y[j]) - pos)
            # text i against image j
            e = math.exp(s * (float(y[i] @ x[j]) - pos)) / n1
            g2[i] += e
            dg2_dy[i, i] += e * s * (x[j] - x[i])
            dg2_dx[i, j] += e * s * y[i]
            dg2_dx[i, i] -= e * s * y[i]
            dg2_ds[i] += e * (float(y[i] @ x[j]) - pos)
    return g1, g2, dg1_dx, dg1_dy, dg2_dx, dg2_dy, dg1_ds, dg2_ds


def reference(x, y, s, u1_old, u2_old, gamma, rho, eps):
    """(u1, u2 updated, the RGCL-g mini-batch value, dF/dx, dF/dy, dF/ds) in float64."""
    b = x.shape[0]
    g1, g2, dg1_dx, dg1_dy, dg2_dx, dg2_dy, dg1_ds, dg2_ds = ref_g_and_grads(x, y, s)
    u1 = (1 - gamma) * u1_old + gamma * g1
    u2 = (1 - gamma) * u2_old + gamma * g2
    tau = 1.0 / s
    value = tau * ((eps + g1).log() + (eps + g2).log()).mean() / 2 + rho * tau
    w1 = tau / (eps + u1)
    w2 = tau / (eps + u2)
    grad_x = ((w1[:, None, None] * dg1_dx + w2[:, None, None] * dg2_dx).sum(0)) / (2 * b)
    grad_y = ((w1[:, None, None] * dg1_dy + w2[:, None, None] * dg2_dy).sum(0)) / (2 * b)
    # dF/dtau, then dF/ds = dF/dtau * dtau/ds with dg/dtau = dg/ds * (-s^2)
    d_tau = ((u1.log() + u2.log() + w1 * dg1_ds * (-s * s) + w2 * dg2_ds * (-s * s)).sum()
             / (2 * b) + rho)
    grad_s = d_tau * (-1.0 / (s * s))
    return u1, u2, value, grad_x, grad_y, grad_s


def close(actual, expected, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("b,d", [(2, 4), (6, 8), (12, 16)])
@pytest.mark.parametrize("s", [1.0, 14.3, 50.0])
@pytest.mark.parametrize("gamma", [1.0, 0.6])
@pytest.mark.parametrize("rho", [0.0, 6.5])
def test_update_loss_and_compositional_gradient_match_the_equations(b, d, s, gamma, rho):
    eps = 1e-14
    x64, y64 = unit(b, d, 1), unit(b, d, 2)
    gen = torch.Generator().manual_seed(3)
    u1_old = torch.rand(b, generator=gen, dtype=torch.float64) * 2 + 0.1
    u2_old = torch.rand(b, generator=gen, dtype=torch.float64) * 2 + 0.1
    u1, u2, value, gx, gy, gs = reference(x64, y64, s, u1_old, u2_old, gamma, rho, eps)

    x = x64.float().requires_grad_()
    y = y64.float().requires_grad_()
    scale = torch.tensor(s, requires_grad=True)
    log_g = log_batch_normalisers(x, y, scale)
    log_u1 = update_log_u(u1_old.float().log(), log_g[0], gamma)
    log_u2 = update_log_u(u2_old.float().log(), log_g[1], gamma)
    close(log_u1.exp(), u1)
    close(log_u2.exp(), u2)
    close(rgcl_value(*log_g, scale, rho, eps), value)
    loss = fastclip_loss(x, y, scale, log_u1, log_u2, rho=rho, eps=eps, log_g=log_g)
    assert loss.dtype == torch.float32
    loss.backward()
    close(x.grad, gx)
    close(y.grad, gy)
    close(scale.grad, gs, rtol=5e-5)


def test_fixed_temperature_keeps_the_feature_gradient_and_gives_the_scale_none():
    x64, y64 = unit(6, 8, 4), unit(6, 8, 5)
    u_old = torch.full((6,), 0.5, dtype=torch.float64)
    _, _, _, gx, gy, _ = reference(x64, y64, 10.0, u_old, u_old, 0.9, 0.0, 1e-14)
    x, y = x64.float().requires_grad_(), y64.float().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    log_g = log_batch_normalisers(x, y, scale.detach())
    log_u1 = update_log_u(u_old.float().log(), log_g[0], 0.9)
    log_u2 = update_log_u(u_old.float().log(), log_g[1], 0.9)
    fastclip_loss(x, y, scale, log_u1, log_u2, learn_temperature=False, log_g=log_g).backward()
    close(x.grad, gx)
    close(y.grad, gy)
    assert scale.grad is None


def test_first_update_from_zero_is_g_and_the_surrogate_stays_finite_at_scale_100():
    # near-duplicate negatives at s = 100: exp(s * diff) spans ~e^-200 .. e^+0 and overflows naive fp32
    x = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = F.normalize(x + 1e-3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    x.requires_grad_()
    log_g = log_batch_normalisers(x, y, 100.0)
    zero = torch.full((8,), -math.inf)
    assert torch.equal(update_log_u(zero, log_g[0], 1.0), log_g[0].detach())
    log_u = update_log_u(zero, log_g[0], 0.3)
    assert torch.equal(log_u, log_g[0].detach())  # first visit: u = g whatever gamma (the authors' rule)
    partly = torch.tensor([-math.inf, 0.0, -math.inf, 1.0, 0.0, 0.0, 0.0, 0.0])
    mixed = update_log_u(partly, log_g[0], 0.3)
    close(mixed[[0, 2]], log_g[0].detach()[[0, 2]])
    close(mixed[1], torch.logaddexp(torch.tensor(math.log(0.7)), log_g[0].detach()[1] + math.log(0.3)))
    loss = fastclip_loss(x, y, torch.tensor(100.0), log_u, update_log_u(zero, log_g[1], 0.3), rho=6.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        update_log_u(zero, log_g[0], 0.0)


def test_gamma_schedule_is_one_in_the_first_epoch_and_cosine_down_to_gamma_min():
    assert gamma_for_epoch(0, 0.2, 10) == 1.0
    close(gamma_for_epoch(5, 0.2, 10), 0.6)
    close(gamma_for_epoch(10, 0.2, 10), 0.2)
    close(gamma_for_epoch(25, 0.2, 10), 0.2)
    close(gamma_for_epoch(3, 0.2, 10), 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert gamma_for_epoch(7, 0.9, 0) == 0.9  # constant gamma (SogCLR)



# ---------------------------------------------------------------------------- the task

def _task_setup(one_rank, variant="v3", **fastclip):
    """A FastCLIP task on TwoTowers in a one-rank DeepSpeed engine, wired as the trainer wires them."""
    config = load_config({"runs": {"f": {"method": "fastclip", "variant": variant, "lr": 1e-2, "warmup_steps": 0,
                                         "fastclip": fastclip}}}, check_paths=False)
    run = dataclasses.replace(get_run(config, "f"), epochs=4)
    model = TwoTowers()
    engine, task = engine_and_task(run, model, one_rank, batch=8)
    assert isinstance(task, FastclipTask) and task.needs_indices
    return run, model, engine, task, ClusteredPairs(4)


def test_task_updates_u_at_the_dense_indices_and_feeds_the_loss(one_rank_world):
    run, model, engine, task, data = _task_setup(one_rank_world, gamma_min=0.5, gamma_decay_epochs=2, rho=6.5)
    task.set_dataset_size(40)
    with pytest.raises(ValueError):
        task.training_forward(*data.batch(8), 0)  # no indices
    task.start_epoch(0, 2)
    assert task.gamma == 1.0
    images, texts = data.batch(8)
    idx = torch.tensor([3, 17, 0, 39, 8, 21, 5, 30])
    with torch.no_grad():
        out = model(images, texts)
        g_img, g_txt = log_batch_normalisers(out["image_features"], out["text_features"], out["logit_scale"])
    encoder_step(task, engine, images, texts, 0, indices=idx)
    close(task.log_u_img[idx], g_img)  # gamma = 1: u = g of this batch
    close(task.log_u_txt[idx], g_txt)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[idx] = False
    assert torch.isinf(task.log_u_img[untouched]).all() and torch.isinf(task.log_u_txt[untouched]).all()

    task.start_epoch(1, 2)
    assert task.gamma == pytest.approx(0.75)  # cosine: 0.5 + 0.5 * (1 + cos(pi / 2)) / 2
    before = task.log_u_img[idx].clone()
    with torch.no_grad():
        out = model(images, texts)
        g_img, _ = log_batch_normalisers(out["image_features"], out["text_features"], out["logit_scale"])
    scale_before = model.logit_scale.detach().clone()
    encoder_step(task, engine, images, texts, 0, indices=idx)
    close(task.log_u_img[idx], (0.25 * before.double().exp() + 0.75 * g_img.double().exp()).log())
    assert not torch.equal(model.logit_scale.detach(), scale_before)  # v3: the temperature learns
    with pytest.raises(IndexError):
        encoder_step(task, engine, images, texts, 1, indices=idx + 10)


def test_sogclr_keeps_gamma_constant_and_the_temperature_fixed(one_rank_world):
    run, model, engine, task, data = _task_setup(one_rank_world, "sogclr", gamma=0.7)
    task.set_dataset_size(16)
    scale = model.logit_scale.detach().clone()
    for epoch in range(3):
        task.start_epoch(epoch, 2)
        assert task.gamma == 0.7
        for k in range(2):
            out = encoder_step(task, engine, *data.batch(8), k, indices=torch.arange(8) + 8 * k)
            assert torch.isfinite(out["loss"])
    assert torch.equal(model.logit_scale.detach(), scale)
    assert torch.isfinite(task.log_u_img).all()


def test_u_state_round_trip_reproduces_the_next_steps_exactly(one_rank_world, tmp_path):
    """Through the trainer's checkpoint (DeepSpeed's module and ZeRO optimizer + the task's u)."""
    run, model, engine, task, data = _task_setup(one_rank_world, gamma_min=0.3, gamma_decay_epochs=3)
    batches = [(*data.batch(8), torch.randperm(24, generator=torch.Generator().manual_seed(k))[:8])
               for k in range(5)]
    task.set_dataset_size(24)
    task.start_epoch(0, 2)
    for k in range(2):
        encoder_step(task, engine, *batches[k][:2], k, indices=batches[k][2])
    task.start_epoch(1, 3)
    encoder_step(task, engine, *batches[2][:2], 0, indices=batches[2][2])
    tag = ckpt.save_checkpoint(engine, tmp_path, 3, {"task": task.state_dict()}, keep=1)
    model2 = TwoTowers(seed=99)
    engine2, task2 = engine_and_task(run, model2, one_rank_world, batch=8)
    task2.set_dataset_size(24)  # what the trainer does before it restores the checkpoint
    saved = ckpt.load_checkpoint(engine2, tmp_path, tag)
    task2.load_state_dict(saved["task"])
    task2.start_epoch(1, 3)
    for k, (images, texts, idx) in zip((1, 2), batches[3:]):
        a = encoder_step(task, engine, images, texts, k, indices=idx)
        b = encoder_step(task2, engine2, images, texts, k, indices=idx)
        assert a["loss"].item() == b["loss"].item()
    assert torch.equal(task.log_u_img, task2.log_u_img) and torch.equal(task.log_u_txt, task2.log_u_txt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    task3 = build_task(run, TwoTowers(), EMBED, "cpu")
    task3.set_dataset_size(25)
    with pytest.raises(ValueError, match="resume on the same data"):
        task3.load_state_dict(saved["task"])


# ---------------------------------------------------------------------------- an independent oracle

def test_sogclr_matches_libauc_gcloss_u_and_gradient_over_two_epochs():
    """libauc's bimodal GCLoss (SogCLR, fixed temperature; Optimization-AI/LibAUC) as an independent oracle.

    libauc keeps u per data-set index like this pipeline, but stores it divided by exp(b), a per-sample
    running max of s * (x_i.y_j - x_i.y_i), so the true u is ``u1 * exp(b1)``; its loss
    ``sum_j sg(exp(s l_ij) / u_i) l_ij`` has the gradient ``(N - 1) / tau`` times tau * d g_i / u_i, i.e.
    (N - 1) times ours (tau s = 1). Epoch 0 (gamma = 1 on a batch never seen) then epoch 1 (gamma_min)
    on the same indices in another order: u and the feature gradients must agree at both steps.
    """
    libauc_losses = pytest.importorskip(
        "libauc.losses", reason="libauc is not installed (an optional oracle: pip install --no-deps libauc==2.0.1)")
    n_data, b, d, s, gamma = 20, 6, 8, 10.0, 0.3
    oracle = libauc_losses.GCLoss(mode="bimodal", N=n_data, tau=1.0 / s, gamma=gamma, gamma_schedule="constant",
                                  temperature_scheme="global_constant")
    log_u_img = torch.full((n_data,), -math.inf)
    log_u_txt = torch.full((n_data,), -math.inf)
    first = torch.tensor([3, 17, 0, 19, 8, 11])
    for epoch, idx in ((0, first), (1, first[torch.tensor([4, 2, 5, 0, 3, 1])])):
        oracle.adjust_gamma(epoch)
        x0, y0 = unit(b, d, 10 + epoch).float(), unit(b, d, 20 + epoch).float()
        # libauc
        xl, yl = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss_lib, _ = oracle(xl, yl, idx)
        loss_lib.backward()
        u_lib_img = (oracle.loss_fn.u1[idx, 0].double() * oracle.loss_fn.b1[idx, 0].double().exp())
        u_lib_txt = (oracle.loss_fn.u2[idx, 0].double() * oracle.loss_fn.b2[idx, 0].double().exp())
        # this pipeline (what FastclipTask does per step, fixed temperature, constant gamma)
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        log_g = log_batch_normalisers(x, y, s)
        new_img = update_log_u(log_u_img[idx], log_g[0], gamma)
        new_txt = update_log_u(log_u_txt[idx], log_g[1], gamma)
        log_u_img[idx], log_u_txt[idx] = new_img, new_txt
        fastclip_loss(x, y, torch.tensor(s), new_img, new_txt, learn_temperature=False, log_g=log_g).backward()
        close(new_img.exp(), u_lib_img, rtol=1e-5)
        close(new_txt.exp(), u_lib_txt, rtol=1e-5)
        close(x.grad * (b - 1), xl.grad, rtol=1e-4, atol=1e-6)
        close(y.grad * (b - 1), yl.grad, rtol=1e-4, atol=1e-6)
