"""The objectives against float64 re-derivations written from the method's equations.

References use explicit sums/loops in float64 (docs/method.md; open_clip ClipLoss and
SigLipLoss for the baselines); the implementation under test is fp32 and log-space.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amorlip.objectives import (
    clamp_logit_scale_,
    clip_loss,
    encoder_loss,
    encoder_loss_local,
    lambda_loss,
    mix_log_targets,
    partition_targets,
    rescale_loss,
    siglip_loss,
    weighted_logits,
)

SCALES = [1.0, 14.3, 100.0]
SHAPES = [(1, 4), (5, 8), (16, 32)]


def unit(b: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def weights(b: int, p: float) -> torch.Tensor:
    w = torch.ones(b, b, dtype=torch.float64)
    for i in range(b):
        w[i, i] = p
    return w


def ref_partition(x, y, s, p):
    """log sum_j w_ij exp(s x_i.y_j) and log sum_i w_ij exp(s x_i.y_j), by explicit loops."""
    b = x.shape[0]
    z_img = torch.zeros(b, dtype=torch.float64)
    z_txt = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            w = p if i == j else 1.0
            z_img[i] += w * math.exp(s * float(x[i] @ y[j]))
            z_txt[j] += w * math.exp(s * float(x[i] @ y[j]))
    return z_img.log(), z_txt.log()


def ref_encoder_loss(x, y, s, log_lam_img, log_lam_txt, p):
    """-2 s mean_i x_i.y_i + mean_i sum_j w_ij e^{s x_i.y_j} / Lambda_i + mean_j sum_i w_ij e^{..} / Lambda_j."""
    b = x.shape[0]
    e = torch.exp(s * x @ y.T) * weights(b, p)
    joint = 2 * s * (x * y).sum(1).mean()
    return -joint + (e / log_lam_img.exp()[:, None]).sum(1).mean() + (e / log_lam_txt.exp()[None, :]).sum(0).mean()


def ref_clip(x, y, s):
    b = x.shape[0]
    total = 0.0
    for i in range(b):
        total -= math.log(math.exp(s * float(x[i] @ y[i])) / sum(math.exp(s * float(x[i] @ y[j])) for j in range(b)))
        total -= math.log(math.exp(s * float(y[i] @ x[i])) / sum(math.exp(s * float(y[i] @ x[j])) for j in range(b)))
    return total / (2 * b)


def ref_siglip(x, y, s, bias):
    b = x.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (s * float(x[i] @ y[j]) + bias))))
    return total / b


def close(actual, expected, rtol=2e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("p", [1.0, 1e-3])
def test_partition_targets_are_weighted_global_sums(b, d, s, p):
    x, y = unit(b, d, 1), unit(b, d, 2)
    log_z_img, log_z_txt = partition_targets(x, y, s, pos_coef=p)
    ref_img, ref_txt = ref_partition(x, y, s, p)
    assert log_z_img.dtype == log_z_txt.dtype == torch.float32
    assert log_z_img.shape == log_z_txt.shape == (b,)
    close(log_z_img, ref_img)
    close(log_z_txt, ref_txt)


def test_partition_targets_carry_no_gradient():
    x, y = unit(6, 8, 3).requires_grad_(), unit(6, 8, 4).requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    log_z_img, log_z_txt = partition_targets(x, y, s)
    assert not log_z_img.requires_grad and not log_z_txt.requires_grad


def test_weighted_logits_put_log_p_on_the_matched_pair():
    x, y = unit(4, 8, 5), unit(4, 8, 6)
    image_rows, text_rows = weighted_logits(x, y, 2.0, pos_coef=0.01)
    expected = 2.0 * x @ y.T + weights(4, 0.01).log()
    close(image_rows, expected)
    close(text_rows, expected.T)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("p", [1.0, 1e-3])
def test_encoder_loss_value_and_gradients(b, d, s, p):
    x64, y64 = unit(b, d, 7), unit(b, d, 8)
    g = torch.Generator().manual_seed(9)
    lam_img = torch.randn(b, generator=g, dtype=torch.float64) + s * 0.5
    lam_txt = torch.randn(b, generator=g, dtype=torch.float64) + s * 0.5
    ref_inputs = [x64.clone().requires_grad_(), y64.clone().requires_grad_(),
                  torch.tensor(s, dtype=torch.float64, requires_grad=True)]
    ref = ref_encoder_loss(*ref_inputs, lam_img, lam_txt, p)
    ref.backward()
    inputs = [x64.float().requires_grad_(), y64.float().requires_grad_(), torch.tensor(s, requires_grad=True)]
    loss = encoder_loss(*inputs, lam_img, lam_txt, pos_coef=p)
    loss.backward()
    assert loss.dtype == torch.float32
    close(loss, ref, rtol=5e-5, atol=5e-5)
    for got, want in zip(inputs, ref_inputs):
        close(got.grad, want.grad, rtol=2e-4, atol=2e-4)


# --------------------------------------------------------------------------- local negatives


def ref_encoder_loss_local(x, y, s, log_lam_img, log_lam_txt, p, g):
    """Local B x B logits with the off-diagonal sum scaled by (G-1)/(B-1), by explicit loops."""
    b = x.shape[0]
    c = (g - 1) / (b - 1) if b > 1 else 1.0
    joint = 2 * s * (x * y).sum(1).mean()
    cross_img = cross_txt = 0.0
    for i in range(b):
        for j in range(b):
            w = p if i == j else c
            e = w * torch.exp(s * (x[i] @ y[j]))
            cross_img = cross_img + e / log_lam_img[i].exp()
            cross_txt = cross_txt + e / log_lam_txt[j].exp()
    return -joint + cross_img / b + cross_txt / b


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("p", [1.0, 1e-3])
def test_local_encoder_loss_on_one_rank_is_encoder_loss_exactly(b, d, s, p):
    x, y = unit(b, d, 7, torch.float32), unit(b, d, 8, torch.float32)
    g = torch.Generator().manual_seed(9)
    lam_img = torch.randn(b, generator=g) + s * 0.5
    lam_txt = torch.randn(b, generator=g) + s * 0.5
    grads = []
    for fn, kwargs in ((encoder_loss, {}), (encoder_loss_local, {"global_batch": b})):
        inputs = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(s, requires_grad=True)]
        loss = fn(*inputs, lam_img, lam_txt, pos_coef=p, **kwargs)
        loss.backward()
        grads.append((loss.detach(), *[t.grad for t in inputs]))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("b,g", [(2, 8), (5, 20), (16, 64)])
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("p", [1.0, 1e-3])
def test_local_encoder_loss_scales_the_off_diagonal_sum_by_g_minus_1_over_b_minus_1(b, g, s, p):
    d = 8
    x64, y64 = unit(b, d, 17), unit(b, d, 18)
    gen = torch.Generator().manual_seed(19)
    lam_img = torch.randn(b, generator=gen, dtype=torch.float64) + s * 0.5
    lam_txt = torch.randn(b, generator=gen, dtype=torch.float64) + s * 0.5
    ref_inputs = [x64.clone().requires_grad_(), y64.clone().requires_grad_(),
                  torch.tensor(s, dtype=torch.float64, requires_grad=True)]
    ref = ref_encoder_loss_local(*ref_inputs, lam_img, lam_txt, p, g)
    ref.backward()
    inputs = [x64.float().requires_grad_(), y64.float().requires_grad_(), torch.tensor(s, requires_grad=True)]
    loss = encoder_loss_local(*inputs, lam_img, lam_txt, pos_coef=p, global_batch=g)
    loss.backward()
    assert loss.dtype == torch.float32
    close(loss, ref, rtol=5e-5, atol=5e-5)
    for got, want in zip(inputs, ref_inputs):
        close(got.grad, want.grad, rtol=2e-4, atol=2e-4)
    # not the unscaled loss: the scaling really acts
    assert abs(loss.item() - encoder_loss(*[t.detach() for t in inputs], lam_img, lam_txt, pos_coef=p).item()) > 1e-6


def test_local_encoder_loss_is_unbiased_for_the_global_cross_term():
    """Averaged over every way to split a global batch into local batches (here: all B-subsets of a
    G = 5 batch with B = 3, by symmetry the same as uniform random splits), each local off-diagonal
    term estimates the global one: the mean of the local losses' cross terms equals the global cross term."""
    import itertools

    big, b, d, s = 5, 3, 4, 3.0
    x, y = unit(big, d, 21), unit(big, d, 22)
    lam = torch.randn(big, generator=torch.Generator().manual_seed(23), dtype=torch.float64) + 2.0

    def cross(xs, ys, lam_i, lam_t, fn):
        # the cross terms alone: the loss plus the joint term -2 s mean x.y
        return fn(xs, ys, s, lam_i, lam_t) + 2 * s * (xs * ys).sum(1).mean()

    glob = cross(x, y, lam, lam, lambda *a: encoder_loss(*a, pos_coef=0.5).double())
    local = [cross(x[list(c)], y[list(c)], lam[list(c)], lam[list(c)],
                   lambda *a: encoder_loss_local(*a, pos_coef=0.5, global_batch=big).double())
             for c in itertools.combinations(range(big), b)]
    close(torch.stack(local).mean(), glob, rtol=1e-5, atol=1e-5)


def test_local_encoder_loss_refuses_impossible_batches():
    x = unit(1, 4, 1, torch.float32)
    lam = torch.zeros(1)
    with pytest.raises(ValueError, match="at least 2"):
        encoder_loss_local(x, x, 1.0, lam, lam, global_batch=4)
    with pytest.raises(ValueError, match="smaller than the local batch"):
        encoder_loss_local(torch.cat([x, x]), torch.cat([x, x]), 1.0, torch.zeros(2), torch.zeros(2), global_batch=1)


@pytest.mark.parametrize("s", SCALES)
def test_encoder_gradient_equals_summed_infonce_at_the_exact_partition(s):
    # docs/method.md (Eq. 6): with p = 1 and Lambda = the in-batch sums, grad L_enc = grad (both InfoNCE directions)
    x0, y0 = unit(12, 16, 10), unit(12, 16, 11)
    x1, y1 = x0.float().requires_grad_(), y0.float().requires_grad_()
    s1 = torch.tensor(s, requires_grad=True)
    log_z_img, log_z_txt = partition_targets(x1, y1, s1, pos_coef=1.0)
    encoder_loss(x1, y1, s1, log_z_img, log_z_txt, pos_coef=1.0).backward()
    x2, y2 = x0.float().requires_grad_(), y0.float().requires_grad_()
    s2 = torch.tensor(s, requires_grad=True)
    (2 * clip_loss(x2, y2, s2)).backward()
    close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    close(y1.grad, y2.grad, rtol=1e-4, atol=1e-5)
    close(s1.grad, s2.grad, rtol=1e-4, atol=1e-5)


def test_no_gradient_reaches_the_log_lambda_inputs():
    x, y = unit(6, 8, 12).float().requires_grad_(), unit(6, 8, 13).float().requires_grad_()
    lam_img = torch.zeros(6, requires_grad=True)
    lam_txt = torch.zeros(6, requires_grad=True)
    encoder_loss(x, y, torch.tensor(5.0, requires_grad=True), lam_img, lam_txt).backward()
    assert lam_img.grad is None and lam_txt.grad is None
    assert x.grad is not None and y.grad is not None


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("s", SCALES)
def test_clip_loss_is_open_clips_value(b, d, s):
    x, y = unit(b, d, 14), unit(b, d, 15)
    loss = clip_loss(x, y, torch.tensor(s, dtype=torch.float64))
    assert loss.dtype == torch.float32
    close(loss, ref_clip(x, y, s), rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("s,bias", [(1.0, 0.0), (10.0, -10.0), (100.0, -5.0)])
def test_siglip_loss_value(b, d, s, bias):
    x, y = unit(b, d, 16), unit(b, d, 17)
    loss = siglip_loss(x, y, s, torch.tensor(bias))
    assert loss.dtype == torch.float32
    close(loss, ref_siglip(x, y, s, bias), rtol=5e-5, atol=5e-5)


def test_siglip_gradient_reaches_the_bias_and_scale():
    x, y = unit(5, 8, 18).float().requires_grad_(), unit(5, 8, 19).float().requires_grad_()
    s, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    siglip_loss(x, y, s, bias).backward()
    # d/db of -(1/B) sum log sigmoid(z (s c + b)) = -(1/B) sum z (1 - sigmoid(z (s c + b)))
    c = x.detach().double() @ y.detach().double().T
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -(z * (1 - torch.sigmoid(z * (10.0 * c - 10.0)))).sum() / 5
    close(bias.grad, expected)
    assert s.grad is not None and torch.isfinite(s.grad)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 1.0])
def test_mix_log_targets_is_the_linear_mixture(beta):
    g = torch.Generator().manual_seed(20)
    log_t = torch.randn(7, generator=g, dtype=torch.float64) * 3 + 5
    log_prev = torch.randn(7, generator=g, dtype=torch.float64) * 3 + 5
    mixed = mix_log_targets(log_t, log_prev, beta)
    assert mixed.dtype == torch.float32
    close(mixed, torch.log(beta * log_prev.exp() + (1 - beta) * log_t.exp()))


def test_mix_log_targets_endpoints_are_exact_and_extremes_finite():
    log_t = torch.tensor([1e4, -1e4, 0.0, 88.0, 300.0])
    log_prev = torch.tensor([-1e4, 1e4, 300.0, -300.0, 300.0])
    assert torch.equal(mix_log_targets(log_t, log_prev, 0.0), log_t)
    assert torch.equal(mix_log_targets(log_t, log_prev, 1.0), log_prev)
    for beta in (1e-12, 0.5, 1 - 1e-7):
        mixed = mix_log_targets(log_t, log_prev, beta)
        assert torch.isfinite(mixed).all()
        # log(beta e^a + (1 - beta) e^b) = max(log beta + a, log(1 - beta) + b) up to log 2
        bound = torch.maximum(log_prev + math.log(beta), log_t + math.log1p(-beta))
        assert ((mixed - bound) >= -1e-3).all() and ((mixed - bound) <= math.log(2) + 1e-3).all()
    with pytest.raises(ValueError):
        mix_log_targets(log_t, log_prev, 1.5)


def test_lambda_loss_l2_log():
    g = torch.Generator().manual_seed(21)
    f = torch.randn(9, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(9, generator=g, dtype=torch.float64)
    loss = lambda_loss(f, t, "l2_log")
    assert loss.dtype == torch.float32
    close(loss, sum((f[i].item() - t[i].item()) ** 2 for i in range(9)) / 9)
    loss.backward()
    close(f.grad, 2 * (f.detach() - t) / 9)


def ref_kl(f, t, x, y, s, p, reg):
    # the authors' kl_div_asym: reg * MSE + (1/|B|^2) sum_i c_i (log Z_i - f_i) e^{-f_i}, c_i local in-batch sum
    b = len(f)
    mse = sum((f[i] - t[i]) ** 2 for i in range(b)) / b
    div = 0.0
    for i in range(b):
        c = sum((p if i == j else 1.0) * math.exp(s * float(x[i] @ y[j])) for j in range(b))
        div += c * (t[i] - f[i]) * math.exp(-f[i])
    return reg * mse + div / b**2


def ref_js(f, t, x, y, s, p, reg):
    # code form: P_cur = e^{d_ij}/lambda_i, P_tar = e^{d_ij}/Z_i, M = (P_cur + P_tar)/2, element means
    b = len(f)
    mse = sum((f[i] - t[i]) ** 2 for i in range(b)) / b
    a = c = 0.0
    for i in range(b):
        for j in range(b):
            d = s * float(x[i] @ y[j]) + (math.log(p) if i == j else 0.0)
            pc, pt = math.exp(d - f[i]), math.exp(d - t[i])
            m = 0.5 * (pc + pt)
            a += pc * math.log(pc / m)
            c += pt * math.log(pt / m)
    return reg * mse + 0.5 * (a / b**2 + c / b**2)


@pytest.mark.parametrize("kind,ref", [("kl", ref_kl), ("js", ref_js)])
@pytest.mark.parametrize("s,p", [(1.0, 1.0), (14.3, 1e-3), (30.0, 1.0)])
def test_lambda_loss_divergences_match_the_code_forms(kind, ref, s, p):
    b, d = 6, 8
    x, y = unit(b, d, 22), unit(b, d, 23)
    g = torch.Generator().manual_seed(24)
    log_z_img, log_z_txt = ref_partition(x, y, s, p)
    f_img = (log_z_img + 0.3 * torch.randn(b, generator=g, dtype=torch.float64))
    f_txt = (log_z_txt + 0.3 * torch.randn(b, generator=g, dtype=torch.float64))
    image_rows, text_rows = weighted_logits(x, y, s, pos_coef=p)
    got_img = lambda_loss(f_img, log_z_img, kind, pair_logits=image_rows, div_reg_coef=0.1)
    got_txt = lambda_loss(f_txt, log_z_txt, kind, pair_logits=text_rows, div_reg_coef=0.1)
    close(got_img, ref(f_img.tolist(), log_z_img.tolist(), x, y, s, p, 0.1), rtol=1e-4, atol=1e-5)
    # the text side uses column sums: the same form with the roles of x and y swapped
    close(got_txt, ref(f_txt.tolist(), log_z_txt.tolist(), y, x, s, p, 0.1), rtol=1e-4, atol=1e-5)


def test_lambda_loss_rejects_unknown_kinds_and_missing_pairs():
    with pytest.raises(ValueError):
        lambda_loss(torch.zeros(3), torch.zeros(3), "mse")
    with pytest.raises(ValueError):
        lambda_loss(torch.zeros(3), torch.zeros(3), "kl")


@pytest.mark.parametrize("rho", [8.5, -8.5])
def test_rescale_loss_value_and_temperature_gradient(rho):
    s = torch.tensor(14.3, requires_grad=True)
    base = (s * 0.5) ** 2  # any loss depending on s
    out = rescale_loss(base, s, rho)
    close(out, 14.3**2 * 0.25 / 14.3 + rho / 14.3)
    out.backward()
    # d/ds [l(s)/sg(s) + rho/s] = l'(s)/s - rho/s^2
    close(s.grad, (0.5 * 14.3) / 14.3 - rho / 14.3**2)


def test_clamp_logit_scale_on_plain_and_wrapped_modules():
    class Tower(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(value))
            self.other = torch.nn.Parameter(torch.tensor(value))

    high, low = Tower(7.0), torch.nn.Sequential(Tower(-2.0))
    clamp_logit_scale_(high, 100.0)
    clamp_logit_scale_(low, 100.0)
    assert high.logit_scale.item() == pytest.approx(math.log(100.0))
    assert low[0].logit_scale.item() == 0.0
    assert high.other.item() == 7.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_outputs_are_fp32_for_any_input_dtype(dtype):
    x, y = unit(4, 8, 25, dtype), unit(4, 8, 26, dtype)
    s = torch.tensor(14.3, dtype=dtype)
    lz = partition_targets(x, y, s)
    outs = [clip_loss(x, y, s), siglip_loss(x, y, s, torch.tensor(-10.0, dtype=dtype)),
            encoder_loss(x, y, s, *lz), *lz, mix_log_targets(lz[0].to(dtype), lz[1].to(dtype), 0.5),
            lambda_loss(lz[0].to(dtype), lz[1], "l2_log"), rescale_loss(clip_loss(x, y, s), s, 1.0)]
    assert all(o.dtype == torch.float32 for o in outs)
    # bf16 inputs: the fp32 computation on the rounded inputs matches float64 on the same inputs
    ref_img, _ = ref_partition(x.double(), y.double(), float(s), 1.0)
    close(lz[0], ref_img, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1.0, 1e-3])
def test_stability_at_scale_100_with_near_duplicates(dtype, p):
    # all pairs at cosine ~1: s x.y ~ 100 > 88.7, so any exp-then-sum path overflows fp32
    g = torch.Generator().manual_seed(27)
    base = torch.randn(1, 16, generator=g)
    x = F.normalize(base + 1e-3 * torch.randn(32, 16, generator=g), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(base + 1e-3 * torch.randn(32, 16, generator=g), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    log_z_img, log_z_txt = partition_targets(x, y, s, pos_coef=p)
    assert torch.isfinite(log_z_img).all() and torch.isfinite(log_z_txt).all()
    assert log_z_img.mean().item() == pytest.approx(100.0 + math.log(31 + p), abs=0.5)
    loss = encoder_loss(x, y, s, log_z_img, log_z_txt, pos_coef=p)
    total = loss + clip_loss(x, y, s) + siglip_loss(x, y, s, -10.0) + rescale_loss(loss, s, 8.5)
    total.backward()
    assert torch.isfinite(total)
    for t in (x.grad, y.grad, s.grad):
        assert torch.isfinite(t.float()).all()
    # at Lambda = the exact partition each cross term is a sum of probabilities: C_I = C_T = 1
    assert (loss.item() + 2 * 100.0 * (x.float() * y.float()).sum(1).mean().item()) == pytest.approx(2.0, abs=1e-2)
