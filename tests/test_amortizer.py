"""Lambda nets: architecture (paper Sec. 3.3), EMA (Eq. 11) and the per-epoch life cycle (Alg. 1 line 4)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from amorlip.amortizer import MODALITIES, LambdaNet, LambdaState, ema_update_, init_seed
from amorlip.objectives import lambda_loss


def unit(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1)


def layer_norm64(v, weight, bias, eps=1e-5):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


@pytest.mark.parametrize("dim,factor", [(16, 1.0), (32, 0.5), (8, 2.0)])
def test_lambda_net_is_the_residual_mlp_of_the_notes(dim, factor):
    net = LambdaNet(dim, factor, generator=torch.Generator().manual_seed(0))
    hidden = int(factor * dim)
    assert net.fc_in.weight.shape == (hidden, dim) and net.fc_out.weight.shape == (dim, hidden)
    x = unit(5, dim, 1)
    d = {k: v.double() for k, v in net.state_dict().items()}
    x64 = x.double()
    a = layer_norm64(torch.relu(x64 @ d["fc_in.weight"].T + d["fc_in.bias"]), d["norm_hidden.weight"], d["norm_hidden.bias"])
    b = layer_norm64(torch.relu(a @ d["fc_out.weight"].T + d["fc_out.bias"]), d["norm_out.weight"], d["norm_out.bias"])
    c = torch.relu(b + x64)
    expected = (c @ d["head.weight"].T + d["head.bias"]).squeeze(-1)
    out = net(x)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_lambda_net_parameter_count_matches_the_notes():
    # the authors' ResidualMLP: d = 512, h = 512 -> 527,873 parameters per modality
    assert sum(p.numel() for p in LambdaNet(512, 1.0).parameters()) == 527_873


def test_lambda_net_is_fp32_under_autocast_and_detaches_its_input():
    net = LambdaNet(16)
    x = unit(4, 16, 2).requires_grad_()
    plain = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = net(x.bfloat16())
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, net(x.bfloat16().float()))
    plain.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in net.parameters())


def test_lambda_net_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = LambdaNet(16, generator=torch.Generator().manual_seed(3))
    b = LambdaNet(16, generator=torch.Generator().manual_seed(3))
    c = LambdaNet(16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc_in.weight, c.fc_in.weight)
    # PyTorch's default ranges: |W| <= 1/sqrt(fan_in) (Kaiming-uniform, a = sqrt 5), LayerNorm (1, 0)
    assert a.fc_in.weight.abs().max() <= 1 / math.sqrt(16) and a.fc_in.bias.abs().max() <= 1 / math.sqrt(16)
    assert torch.equal(a.norm_out.weight, torch.ones(16)) and torch.equal(a.norm_out.bias, torch.zeros(16))


def test_ema_update_math():
    online, ema = LambdaNet(8, generator=torch.Generator().manual_seed(5)), LambdaNet(8, generator=torch.Generator().manual_seed(6))
    before = {k: v.double().clone() for k, v in ema.state_dict().items()}
    theta = {k: v.double() for k, v in online.state_dict().items()}
    ema_update_(ema, online, 0.92)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), 0.92 * before[k] + 0.08 * theta[k], rtol=1e-6, atol=1e-7)


def state_copy(nets):
    return {m: {k: v.clone() for k, v in nets[m].state_dict().items()} for m in MODALITIES}


def same(a, b):
    return all(torch.equal(a[m][k], b[m][k]) for m in MODALITIES for k in a[m])


def fit_a_little(state: LambdaState, seed: int):
    x, y = unit(8, 16, seed), unit(8, 16, seed + 1)
    t_img, t_txt = torch.full((8,), 3.0), torch.full((8,), 2.0)
    state.fit(x, y, lambda li, lt: lambda_loss(li, t_img) + lambda_loss(lt, t_txt), 3)
    state.update_ema()


def test_start_epoch_order_prev_is_old_ema_then_fresh_online_ema_and_adam():
    state = LambdaState(16, lr=1e-2, ema_alpha=0.5, seed=7)
    state.start_epoch(0)
    fit_a_little(state, 10)
    old_ema, old_online = state_copy(state.ema), state_copy(state.online)
    assert len(state.optimizer.state) > 0
    state.start_epoch(1)
    assert same(state_copy(state.prev), old_ema)  # prev <- EMA *before* the re-init (docs/method.md, life cycle)
    new_online = state_copy(state.online)
    assert not same(new_online, old_online)
    for m in MODALITIES:  # the re-init is PyTorch's default init drawn from the (seed, epoch) stream
        fresh = LambdaNet(16, generator=torch.Generator().manual_seed(init_seed(7, 1, m)))
        assert all(torch.equal(fresh.state_dict()[k], new_online[m][k]) for k in new_online[m])
    assert same(state_copy(state.ema), new_online)  # EMA <- copy(new online)
    assert len(state.optimizer.state) == 0  # fresh Adam
    assert state.optimizer.param_groups[0]["lr"] == 1e-2
    assert all(not p.requires_grad for p in [*state.ema.parameters(), *state.prev.parameters()])


def test_start_epoch_without_reinit_keeps_online_and_adam():
    state = LambdaState(16, seed=8)
    state.start_epoch(0)
    fit_a_little(state, 11)
    online, ema, opt = state_copy(state.online), state_copy(state.ema), state.optimizer
    state.start_epoch(1, reinit=False)
    assert same(state_copy(state.prev), ema) and same(state_copy(state.online), online)
    assert state.optimizer is opt


def test_fit_reduces_the_loss_and_leaves_no_stale_gradients():
    state = LambdaState(16, lr=1e-2, seed=9)
    state.start_epoch(0)
    x, y = unit(16, 16, 12), unit(16, 16, 13)
    t = torch.linspace(2.0, 4.0, 16)
    losses = [state.fit(x, y, lambda li, lt: lambda_loss(li, t) + lambda_loss(lt, t), 5) for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in state.online.parameters())


def test_state_dict_round_trip_reproduces_the_next_fit_exactly():
    a = LambdaState(16, lr=1e-2, seed=10)
    a.start_epoch(0)
    fit_a_little(a, 14)
    a.start_epoch(1)
    fit_a_little(a, 16)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = LambdaState(16, lr=1e-2, seed=10)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.lifecycle_epoch == 1
    for s in (a, b):
        fit_a_little(s, 18)
    for nets in ("online", "ema", "prev"):
        assert same(state_copy(getattr(a, nets)), state_copy(getattr(b, nets)))
    assert same(a.ema_state(), b.ema_state())
