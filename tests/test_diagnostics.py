"""Amortization diagnostics: the population target, the in-batch estimate, the scores, the probe, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_shards import make_shards
from train_configs import child_env, ensure_trained, shared_root

from amorlip.config import load_config
from amorlip.diagnostics import (
    DiagnoseError,
    diagnose,
    diagnose_features,
    flat_figures,
    gradient_fidelity,
    in_batch_log_partition,
    objective_on_features,
    population_log_partition,
    prev_lambda_states,
    score,
    select_probe,
)
from amorlip.objectives.amorlip import partition_targets

REPO = Path(__file__).resolve().parents[1]


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return img, txt


def _brute_force(img: np.ndarray, txt: np.ndarray, s: float, b: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The definition, term by term in float64 linear space (safe at the small s used here)."""
    n = img.shape[0]
    e = np.exp(s * img @ txt.T)
    rows = [math.log(p * e[i, i] + (b - 1) / (n - 1) * sum(e[i, j] for j in range(n) if j != i)) for i in range(n)]
    cols = [math.log(p * e[j, j] + (b - 1) / (n - 1) * sum(e[i, j] for i in range(n) if i != j)) for j in range(n)]
    return np.array(rows), np.array(cols)


def test_population_target_matches_a_float64_brute_force():
    img, txt = _features(9, 5, seed=1)
    for b, p, chunk in ((4, 0.3, 1024), (9, 1.0, 2), (2, 1e-3, 4)):
        got_img, got_txt = population_log_partition(img.float(), txt.float(), 3.0, b, p, chunk=chunk)
        want_img, want_txt = _brute_force(img.numpy(), txt.numpy(), 3.0, b, p)
        assert got_img.dtype == torch.float64
        np.testing.assert_allclose(got_img.numpy(), want_img, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_txt.numpy(), want_txt, rtol=0, atol=1e-6)


def test_population_target_is_the_exact_expectation_of_the_in_batch_sum():
    """Synthetic case with a known answer: average the in-batch sum over every batch containing i."""
    n, b, s, p = 6, 3, 2.5, 0.5
    img, txt = _features(n, 4, seed=2)
    e = np.exp(s * img.numpy() @ txt.numpy().T)
    weight = np.ones((n, n))
    np.fill_diagonal(weight, p)
    got_img, got_txt = population_log_partition(img, txt, s, b, p)
    for i in range(n):
        batches = [c for c in itertools.combinations(range(n), b) if i in c]
        mean_row = np.mean([sum(weight[i, j] * e[i, j] for j in c) for c in batches])
        mean_col = np.mean([sum(weight[j, i] * e[j, i] for j in c) for c in batches])
        assert got_img[i].item() == pytest.approx(math.log(mean_row), abs=1e-12)
        assert got_txt[i].item() == pytest.approx(math.log(mean_col), abs=1e-12)


def test_population_target_is_finite_at_large_scale_and_full_batch_equals_the_training_sum():
    """s = 100 on near-identical features: e^{s x.y} overflows fp32, the log-space target does not."""
    img, txt = _features(12, 6, seed=3)
    txt = torch.nn.functional.normalize(img + 0.01 * txt, dim=1)
    got_img, got_txt = population_log_partition(img.float(), txt.float(), 100.0, 12, 1e-3)
    assert torch.isfinite(got_img).all() and torch.isfinite(got_txt).all() and got_img.max() > 90
    # B = N: every batch is the whole probe, so the target is the training code's own partition sum
    want_img, want_txt = partition_targets(img.float(), txt.float(), 100.0, pos_coef=1e-3)
    torch.testing.assert_close(got_img, want_img.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(got_txt, want_txt.double(), rtol=0, atol=1e-4)
    # and a shifted float64 brute force agrees (log of the sum with the row max taken out)
    logits = 100.0 * img.double() @ txt.double().T
    weights = torch.ones_like(logits)
    weights.fill_diagonal_(1e-3)
    top = logits.max(dim=1, keepdim=True).values
    ref = top.squeeze(1) + torch.log((weights * torch.exp(logits - top)).sum(dim=1))
    torch.testing.assert_close(population_log_partition(img, txt, 100.0, 12, 1e-3)[0], ref, rtol=0, atol=1e-10)


def test_in_batch_estimate_edges_and_its_mean_is_the_population_target():
    img, txt = _features(10, 4, seed=4)
    img, txt = img.float(), txt.float()
    s, p = 2.0, 0.4
    # B = N: one batch, the whole probe
    est_img, est_txt = in_batch_log_partition(img, txt, s, 10, p, torch.Generator().manual_seed(0))
    full_img, full_txt = partition_targets(img, txt, s, pos_coef=p)
    torch.testing.assert_close(est_img, full_img.double())
    torch.testing.assert_close(est_txt, full_txt.double())
    # B = 1: only the positive pair; the population target agrees exactly (no negatives at all)
    est_img, _ = in_batch_log_partition(img, txt, s, 1, p, torch.Generator().manual_seed(0))
    pos = s * (img * txt).sum(dim=1).double() + math.log(p)
    torch.testing.assert_close(est_img, pos, rtol=0, atol=1e-5)
    torch.testing.assert_close(population_log_partition(img, txt, s, 1, p)[0], pos, rtol=0, atol=1e-5)
    # B = 4 with N mod B = 2 left over: in linear space the estimate is unbiased for every sample,
    # the two in the filled-up batch included
    target_img, target_txt = population_log_partition(img, txt, s, 4, p)
    draws = [in_batch_log_partition(img, txt, s, 4, p, torch.Generator().manual_seed(k)) for k in range(600)]
    mean_img = torch.stack([d[0] for d in draws]).exp().mean(dim=0).log()
    mean_txt = torch.stack([d[1] for d in draws]).exp().mean(dim=0).log()
    assert all(torch.isfinite(d[0]).all() for d in draws)
    torch.testing.assert_close(mean_img, target_img, rtol=0, atol=0.05)
    torch.testing.assert_close(mean_txt, target_txt, rtol=0, atol=0.05)


def test_score_matches_numpy():
    rng = np.random.default_rng(0)
    target = rng.normal(3.0, 0.5, 200)
    pred = 0.6 * target + rng.normal(0.4, 0.3, 200)
    got = score(pred, target)
    assert got["rmse"] == pytest.approx(float(np.sqrt(np.mean((pred - target) ** 2))), rel=1e-12)
    assert got["bias"] == pytest.approx(float(np.mean(pred - target)), rel=1e-12)
    assert got["corr"] == pytest.approx(float(np.corrcoef(pred, target)[0, 1]), rel=1e-12)
    assert got["mean"] == pytest.approx(float(pred.mean())) and got["std"] == pytest.approx(float(pred.std()))
    perfect = score(target, target)
    assert perfect["rmse"] == 0.0 and perfect["bias"] == 0.0 and perfect["corr"] == pytest.approx(1.0)
    assert score(np.full(200, 2.0), target)["corr"] is None  # undefined, not 0
    with pytest.raises(ValueError):
        score(pred[:3], target)


def test_constant_predictor_scores_the_target_std_and_a_perfect_net_scores_zero():
    img, txt = _features(40, 8, seed=5)
    img, txt = img.float(), txt.float()
    s, b, p = 5.0, 8, 1e-3
    t_img, t_txt = population_log_partition(img, txt, s, b, p)
    lookup = {"image": (img, t_img), "text": (txt, t_txt)}

    def perfect(modality):
        feats, target = lookup[modality]
        return lambda f: target[[int(torch.argmin((feats - row).abs().sum(dim=1))) for row in f]].float()

    report, arrays = diagnose_features(img, txt, s, b, p, {"ema": {m: perfect(m) for m in lookup}}, seed=0)
    for m, target in (("image", t_img), ("text", t_txt)):
        entry = report[m]
        assert entry["target"]["std"] == pytest.approx(float(target.std(unbiased=False)), rel=1e-12)
        const = entry["predictors"]["constant"]
        assert const["rmse"] == pytest.approx(entry["target"]["std"], rel=1e-12)
        assert const["bias"] == pytest.approx(0.0, abs=1e-12) and const["corr"] is None
        assert entry["predictors"]["ema"]["rmse"] < 1e-5 and entry["predictors"]["ema"]["corr"] > 0.999999
        assert set(entry["predictors"]) == {"ema", "in_batch", "constant"}  # no prev given, none made up
        np.testing.assert_array_equal(arrays[m]["target"], target.numpy())
    json.dumps(report, allow_nan=False)  # JSON as written: no NaN anywhere


def test_probe_is_seeded_independent_of_shard_order_and_skips_broken_samples(tmp_path):
    keys = make_shards(tmp_path, 3, 12, image_size=16, seed=0, corrupt={"missing_txt": 1})
    first, seen = select_probe(tmp_path, 10, seed=7)
    assert seen == len(keys) == 35 and len(first) == 10
    assert [k for k, _, _ in first] == sorted(k for k, _, _ in first) and {k for k, _, _ in first} <= set(keys)
    again, _ = select_probe(tmp_path, 10, seed=7)
    assert again == first
    assert [k for k, _, _ in select_probe(tmp_path, 10, seed=8)[0]] != [k for k, _, _ in first]
    # the probe depends on the keys, not on the order sizes.json lists the shards in
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps(dict(reversed(list(sizes.items())))))
    assert select_probe(tmp_path, 10, seed=7)[0] == first
    everything, _ = select_probe(tmp_path, 1000, seed=7)
    assert [k for k, _, _ in everything] == sorted(keys)


@pytest.mark.dist
def test_diagnose_cli_on_the_exported_amorlip_model(tmp_path_factory):
    root = shared_root(tmp_path_factory)
    ensure_trained(root, "amor")
    config_path = root / "config.yaml"
    config = load_config(config_path)
    if not (root / "runs" / "amor" / "model.pt").exists():
        from amorlip.train.export import export

        export(config, "amor")
    cmd = [sys.executable, "-m", "amorlip.cli", "diagnose", "--config", str(config_path), "--run", "amor",
           "--probe", "100"]
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    out = root / "runs" / "amor" / "amortization.json"
    report = json.loads(out.read_text())
    assert (out.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["format"] == "amorlip-amortization/1" and report["run"] == "amor"
    assert report["batch_size"] == 16 and report["pos_coef"] == 1e-3 and report["step"] == 24
    assert report["probe"]["size"] == 100 and report["probe"]["samples_in_data"] == 192
    # the probe is the seeded subset select_probe picks (run seed 0), embedded whole
    probe, _ = select_probe(root / "data" / "tiny" / "shards", 100, seed=0)
    assert report["probe"]["keys_sha256"] == hashlib.sha256("\n".join(k for k, _, _ in probe).encode()).hexdigest()
    # model.pt's checkpoint is still on disk, so the previous epoch's nets are scored too
    assert report["predictors"] == ["ema", "prev", "in_batch", "constant"] and report["prev_missing"] is None
    for modality in ("image", "text"):
        entry = report["modalities"][modality]
        assert entry["predictors"]["constant"]["rmse"] == pytest.approx(entry["target"]["std"], rel=1e-9)
        assert entry["predictors"]["constant"]["corr"] is None
        for name in ("ema", "prev", "in_batch"):
            got = entry["predictors"][name]
            assert math.isfinite(got["rmse"]) and math.isfinite(got["bias"]) and -1 <= got["corr"] <= 1
    assert "ema" in res.stdout and "target std" in res.stdout and "text" in res.stdout
    fidelity = report["gradient_fidelity"]
    assert fidelity["batch_size"] == 16 and fidelity["probe"] == 100 and -1 <= fidelity["cosine"] <= 1
    assert "gradient fidelity: cosine" in res.stdout

    scratch = tmp_path_factory.mktemp("diag")
    with pytest.raises(DiagnoseError, match="batch size 16"):
        diagnose(config, "amor", probe=10, out=scratch / "small.json")

    # prev comes from model.pt's own checkpoint; a pruned one is reported, not guessed
    run_dir = root / "runs" / "amor"
    prev, missing = prev_lambda_states(run_dir, "step-0000024")
    assert missing is None and set(prev) == {"image", "text"}
    ema = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(prev["image"]["head.weight"], ema["lambda_nets"]["image"]["head.weight"])
    pruned = run_dir / "checkpoints" / "step-0000001"
    assert prev_lambda_states(run_dir, "step-0000001") == (None, f"checkpoint {pruned} (model.pt's) is not on disk")

    # a model without lambda nets (what export writes for CLIP/SigLIP) is refused, naming why
    ema["lambda_nets"], ema["run"]["method"] = None, "clip"
    (scratch / "runs" / "amor").mkdir(parents=True)
    torch.save(ema, scratch / "runs" / "amor" / "model.pt")
    config["paths"]["runs"] = str(scratch / "runs")
    with pytest.raises(DiagnoseError, match="clip run without lambda nets"):
        diagnose(config, "amor")


# --------------------------------------------------------------------------- gradient fidelity


def _linear_encoder(n: int, d_in: int, d: int, seed: int):
    """A float64 linear two-tower "encoder" on fixed inputs: the params and ``encode(indices)``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d_in, generator=gen, dtype=torch.float64), torch.randn(n, d_in, generator=gen,
                                                                                 dtype=torch.float64)
    w_img = torch.randn(d_in, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    w_txt = torch.randn(d_in, d, generator=gen, dtype=torch.float64).requires_grad_(True)

    def encode(idx):
        f = torch.nn.functional.normalize
        return f(a[idx] @ w_img, dim=1), f((a[idx] + 0.5 * b[idx]) @ w_txt, dim=1)

    return [w_img, w_txt], encode


def _reference_grad(params, encode, idx, method, scale, p):
    """One float64 graph through the whole batch, written out from the definitions (no library loss)."""
    x, y = encode(idx)
    logits = scale * (x @ y.T)
    if method == "clip":
        labels = torch.arange(len(idx))
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    else:
        w = torch.ones_like(logits) + torch.eye(len(idx), dtype=logits.dtype) * (p - 1)
        z_img = (w * logits.exp()).sum(1).detach()
        z_txt = (w * logits.exp()).sum(0).detach()
        loss = (-2 * scale * (x * y).sum(1).mean() + ((w * logits.exp()).sum(1) / z_img).mean()
                + ((w * logits.exp()).sum(0) / z_txt).mean())
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("method,p", [("clip", 1.0), ("amorlip", 1.0), ("amorlip", 1e-3)])
def test_gradient_fidelity_matches_a_float64_reference(method, p):
    n, batch, scale = 40, 8, 7.0
    params, encode = _linear_encoder(n, 6, 5, seed=3)
    loss = lambda a, b: objective_on_features(method, a, b, scale, p)  # noqa: E731
    got = gradient_fidelity(encode, params, n, batch, loss, torch.Generator().manual_seed(11), chunk=3)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(11))[:batch]
    g_b = _reference_grad(params, encode, chosen, method, scale, p)
    g_n = _reference_grad(params, encode, torch.arange(n), method, scale, p)
    expected = float(g_b @ g_n / (g_b.norm() * g_n.norm()))
    # the project's losses compute in fp32 (the training code's own), the reference in float64
    assert got == {"cosine": pytest.approx(expected, abs=1e-6), "batch_size": batch, "probe": n}
    assert expected < 0.999  # a batch of 8 out of 40 is not the whole probe's direction
    # B = N: the batch is the probe (in another order), the same direction exactly
    whole = gradient_fidelity(encode, params, n, n, loss, torch.Generator().manual_seed(11), chunk=7)
    assert whole["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_amorlip_gradient_fidelity_equals_clips_at_pos_coef_one():
    """With p = 1 and Lambda = the batch's sums the AmorLIP encoder gradient is 2 x CLIP's (docs/method.md),
    so the two cosines are the same number."""
    n, batch, scale = 30, 6, 10.0
    params, encode = _linear_encoder(n, 4, 3, seed=5)
    cos = {m: gradient_fidelity(encode, params, n, batch, lambda a, b, m=m: objective_on_features(m, a, b, scale, 1.0),
                                torch.Generator().manual_seed(2))["cosine"] for m in ("clip", "amorlip")}
    assert cos["amorlip"] == pytest.approx(cos["clip"], abs=1e-6)
    with pytest.raises(ValueError, match="batch size 31"):
        gradient_fidelity(encode, params, n, 31, lambda a, b: a.sum(), torch.Generator())


@pytest.mark.dist
def test_training_records_per_epoch_amortization(tmp_path_factory):
    """The tiny AmorLIP run (2 epochs of 12 steps) measures itself at the end of each epoch."""
    root = shared_root(tmp_path_factory)
    ensure_trained(root, "amor")
    run_dir = root / "runs" / "amor"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    amort = [r for r in records if r.get("kind") == "amortization"]
    assert [(r["epoch"], r["step"]) for r in amort] == [(0, 12), (1, 24)]
    for r in amort:
        for m in ("image", "text"):
            for name in ("ema", "prev", "in_batch", "constant"):
                assert math.isfinite(r[f"amort/{m}/{name}_rmse"]) and math.isfinite(r[f"amort/{m}/{name}_bias"])
            assert r[f"amort/{m}/constant_rmse"] == pytest.approx(r[f"amort/{m}/target_std"], rel=1e-9)
        assert -1 <= r["amort/grad_cosine"] <= 1
    summary = json.loads((run_dir / "train.json").read_text())
    last = summary["amortization"]
    assert last["epoch"] == 1 and last["step"] == 24 and last["batch_size"] == 16 and last["probe"] == 192
    assert flat_figures(last) == {k: v for k, v in amort[-1].items() if k.startswith("amort/")}
