"""Task objects through their contract (docs/architecture.md), on a tiny two-tower model.

The model is a real nn.Module (two linear towers + a learnable log s), trained on clustered Gaussian
pairs; nothing is mocked. Training steps go through the trainer's own step
(amorlip.train.step.encoder_step) on a one-rank DeepSpeed engine built by the trainer's
build_engine (its AdamW groups, gradient clipping and ZeRO-1, the logit-scale clamp).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amorlip.config import ConfigError, get_run, load_config
from amorlip.objectives import clip_loss, encoder_loss, encoder_loss_local, mix_log_targets, partition_targets
from amorlip.schedules import beta_for_epoch, cosine_lr
from amorlip.tasks import AmorlipTask, ClipTask, SiglipTask, build_task
from amorlip.train import checkpoint as ckpt
from amorlip.train.engine import build_engine, set_lr
from amorlip.train.step import encoder_step

IN_DIM, EMBED, BATCH = 24, 16, 32


class TwoTowers(nn.Module):
    """Linear image and text towers with L2-normalised outputs, open_clip's output dict."""

    def __init__(self, seed: int = 0, init_scale: float = 1 / 0.07, bias: float | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(IN_DIM, EMBED)
        self.text = nn.Linear(IN_DIM, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None

    def forward(self, images, texts):
        out = {"image_features": F.normalize(self.image(images), dim=-1),
               "text_features": F.normalize(self.text(texts), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


class ClusteredPairs:
    """Pairs sharing a cluster and a per-sample latent, seen through different random projections."""

    def __init__(self, seed: int = 0, clusters: int = 8, latent: int = 6):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.centres = torch.randn(clusters, latent, generator=g) * 2.0
        self.to_image = torch.randn(latent, IN_DIM, generator=g)
        self.to_text = torch.randn(latent, IN_DIM, generator=g)
        self.clusters, self.latent = clusters, latent

    def batch(self, size: int = BATCH):
        c = torch.randint(self.clusters, (size,), generator=self.g)
        z = self.centres[c] + torch.randn(size, self.latent, generator=self.g)
        images = z @ self.to_image + 0.3 * torch.randn(size, IN_DIM, generator=self.g)
        texts = z @ self.to_text + 0.3 * torch.randn(size, IN_DIM, generator=self.g)
        return images, texts


@pytest.fixture(scope="module")
def base_run():
    config = load_config({"runs": {"a": {"method": "amorlip"}}}, check_paths=False)
    return get_run(config, "a")


def engine_and_task(run, model, one_rank, batch: int = BATCH):
    """``model`` in a one-rank DeepSpeed engine (``one_rank``: the one_rank_world fixture) and its
    task, wired as the trainer wires them (amorlip.train.run.build_model_engine_task): the task
    holds the engine as its model."""
    world = one_rank.world(batch)
    with one_rank.launched():
        engine, _ = build_engine(model, run, world)
    task = build_task(run, engine.module, EMBED, "cpu")
    task.model = engine
    return engine, task


def make_run(base, method="amorlip", variant="published", **amorlip):
    pos_coef = 1e-3 if variant == "published" else 1.0
    partition = "mixed_target" if variant == "published" else "ema_net"
    am = dataclasses.replace(base.amorlip, pos_coef=pos_coef, encoder_partition=partition,
                             **{"beta_epochs": 2, "rho": (8.5, -8.5), **amorlip})
    return dataclasses.replace(base, method=method, variant=variant if method == "amorlip" else "none",
                               epochs=4, lr=1e-2, warmup_steps=0, grad_clip=1.0, seed=3, amorlip=am)


def test_build_task_picks_the_method(base_run):
    model = TwoTowers(bias=-10.0)
    assert isinstance(build_task(make_run(base_run, "clip"), model, EMBED, "cpu"), ClipTask)
    assert isinstance(build_task(make_run(base_run, "siglip"), model, EMBED, "cpu"), SiglipTask)
    task = build_task(make_run(base_run), model, EMBED, "cpu")
    assert isinstance(task, AmorlipTask)
    with pytest.raises(ValueError):
        build_task(dataclasses.replace(base_run, method="other"), model, EMBED, "cpu")


def test_clip_and_siglip_steps_and_the_temperature_clamp(base_run, one_rank_world):
    data = ClusteredPairs(1)
    for method in ("clip", "siglip"):
        # s starts at 1/0.07 = 14.3, above this run's max_logit_scale 10
        run = dataclasses.replace(make_run(base_run, method), max_logit_scale=10.0)
        model = TwoTowers(bias=-10.0)
        engine, task = engine_and_task(run, model, one_rank_world)
        task.start_epoch(0, 10)
        out = encoder_step(task, engine, *data.batch(), 0)
        assert set(out) >= {"loss", f"{method}_loss", "logit_scale"}
        # diagnostics are detached scalar tensors (read by the trainer on logging steps only)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
                   for k, v in out.items() if k != "loss")
        assert task.lambda_nets_state() is None and task.state_dict() == {}
        assert model.logit_scale.item() == pytest.approx(math.log(10.0))  # clamped after the step
        encoder_step(task, engine, *data.batch(), 1)
        # ZeRO's fp32 master copy was clamped too: this step moved on from ln 10 (one AdamW step of lr
        # 1e-2), not from the unclamped ln 14.3 = 2.66
        assert math.log(10.0) - 0.05 < model.logit_scale.item() <= math.log(10.0) + 1e-6
        low = TwoTowers(bias=-10.0, init_scale=0.5)  # log s < 0: the clamp's lower end, s = 1
        engine, task = engine_and_task(run, low, one_rank_world)
        task.start_epoch(0, 10)
        encoder_step(task, engine, *data.batch(), 0)
        assert low.logit_scale.item() == 0.0


def test_amorlip_step_keeps_lambda_and_encoder_gradients_apart(base_run):
    model = TwoTowers()
    task = build_task(make_run(base_run), model, EMBED, "cpu")
    task.start_epoch(0, 10)
    online_before = [p.clone() for p in task.lambdas.online.parameters()]
    encoder_before = [p.clone() for p in model.parameters()]
    out = task.training_forward(*ClusteredPairs(2).batch(), 0)
    # Stage I ran (the online nets moved) but sent nothing to the encoders
    assert out["lambda_updates"] == task.config.t_lambda
    assert any(not torch.equal(a, b) for a, b in zip(online_before, task.lambdas.online.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.parameters()))
    out["loss"].backward()
    # the encoder loss reaches the encoders and log s, and never the lambda nets
    assert all(p.grad is not None for p in model.parameters())
    for nets in (task.lambdas.online, task.lambdas.ema, task.lambdas.prev):
        assert all(p.grad is None for p in nets.parameters())
    assert out["loss"].requires_grad
    # diagnostics: detached tensors (no grad, so nothing in them reaches either side) or host numbers
    assert all(isinstance(v, (float, int)) or (isinstance(v, torch.Tensor) and not v.requires_grad)
               for k, v in out.items() if k != "loss")
    assert {"encoder_loss", "lambda_loss", "lambda_gap", "lambda_gap_prev", "log_target_mean", "logit_scale", "beta", "rho",
            "lambda_updates"} <= set(out)


def test_published_variant_uses_the_mixed_target_and_rescales(base_run, one_rank_world):
    run = make_run(base_run, t_target=1)
    model = TwoTowers()
    engine, task = engine_and_task(run, model, one_rank_world)
    data = ClusteredPairs(3)
    task.start_epoch(0, 3)
    for k in range(3):
        encoder_step(task, engine, *data.batch(), k)
    task.start_epoch(1, 3)
    beta = beta_for_epoch(1, run.amorlip.beta_max, run.amorlip.beta_epochs)
    assert task.beta == beta > 0 and task.rho == 8.5  # rho (8.5, -8.5) over 4 epochs: 8.5 for 0-1
    images, texts = data.batch()
    with torch.no_grad():
        feats = model(images, texts)
        x, y, s = feats["image_features"], feats["text_features"], feats["logit_scale"]
        prev_img, prev_txt = task.lambdas.predict("prev", x, y)
    out = task.training_forward(images, texts, 0)
    # float64 re-derivation of Eq. 12 mixed in linear space, then the encoder loss of paper Eq. 6 (docs/method.md)
    x64, y64, s64, p = x.double(), y.double(), s.double(), run.amorlip.pos_coef
    e = torch.exp(s64 * x64 @ y64.T) * (torch.ones(32, 32, dtype=torch.float64) + (p - 1) * torch.eye(32, dtype=torch.float64))
    lam_img = beta * prev_img.double().exp() + (1 - beta) * e.sum(1)
    lam_txt = beta * prev_txt.double().exp() + (1 - beta) * e.sum(0)
    expected = -2 * s64 * (x64 * y64).sum(1).mean() + (e / lam_img[:, None]).sum(1).mean() + (e / lam_txt[None, :]).sum(0).mean()
    assert out["encoder_loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx((expected / s64 + task.rho / s64).item(), rel=1e-4)
    assert out["log_target_mean"] == pytest.approx(0.5 * (lam_img.log().mean() + lam_txt.log().mean()).item(), rel=1e-4)


def test_paper_variant_reads_the_ema_net_before_its_update(base_run, one_rank_world):
    run = make_run(base_run, "amorlip", "paper", t_target=1, scale_loss=False)
    model = TwoTowers()
    engine, task = engine_and_task(run, model, one_rank_world)
    task.start_epoch(0, 5)
    data = ClusteredPairs(4)
    for k in range(2):
        encoder_step(task, engine, *data.batch(), k)
    images, texts = data.batch()
    ema_before = copy.deepcopy(task.lambdas.ema)  # Stage I does not touch the EMA nets
    out = task.training_forward(images, texts, 2)
    with torch.no_grad():
        feats = model(images, texts)
        x, y, s = feats["image_features"], feats["text_features"], feats["logit_scale"]
        expected = encoder_loss(x, y, s, ema_before["image"](x), ema_before["text"](y), pos_coef=1.0)
        after = encoder_loss(x, y, s, task.lambdas.ema["image"](x), task.lambdas.ema["text"](y), pos_coef=1.0)
    assert out["encoder_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["encoder_loss"], rel=1e-6)  # scale_loss off
    assert abs(after.item() - expected.item()) > 1e-6 * abs(expected.item())  # the EMA did move this step


def test_cadence_of_lambda_and_ema_updates(base_run):
    run = make_run(base_run, t_online=3, t_target=2)
    model = TwoTowers()
    task = build_task(run, model, EMBED, "cpu")
    task.start_epoch(0, 6)
    data = ClusteredPairs(5)
    updates, ema_moved = [], []
    for k in range(6):
        ema = [p.clone() for p in task.lambdas.ema.parameters()]
        out = task.training_forward(*data.batch(), k)
        updates.append(out["lambda_updates"])
        ema_moved.append(any(not torch.equal(a, b) for a, b in zip(ema, task.lambdas.ema.parameters())))
    assert updates == [3, 0, 0, 3, 0, 0]
    assert ema_moved == [True, False, True, False, True, False]


# --------------------------------------------------------------------------- local negatives

TARGET_KEYS = {"log_target_mean", "lambda_gap", "lambda_gap_prev"}


def test_local_negatives_compute_targets_on_stage_one_steps_only(base_run):
    """``encoder_negatives: local``: the loss is the local one against the EMA net read before its
    update (Stage I never touches the EMA net); the partition-target diagnostics exist on Stage-I
    steps (k % t_online == 0) only."""
    run = make_run(base_run, "amorlip", "paper", t_online=2, t_target=1, scale_loss=False,
                   encoder_negatives="local")
    model = TwoTowers()
    task = build_task(run, model, EMBED, "cpu")
    task.start_epoch(0, 4)
    data = ClusteredPairs(6)
    with_targets = []
    for k in range(4):
        images, texts = data.batch()
        ema_before = copy.deepcopy(task.lambdas.ema)
        out = task.training_forward(images, texts, k)
        with_targets.append(TARGET_KEYS & set(out))
        with torch.no_grad():
            feats = model(images, texts)
            x, y, s = feats["image_features"], feats["text_features"], feats["logit_scale"]
            expected = encoder_loss_local(x, y, s, ema_before["image"](x), ema_before["text"](y), pos_coef=1.0)
        assert out["encoder_loss"] == pytest.approx(expected.item(), rel=1e-5)
        assert out["lambda_updates"] == (run.amorlip.t_lambda if k % 2 == 0 else 0)
    assert with_targets == [TARGET_KEYS, set(), TARGET_KEYS, set()]


@pytest.mark.parametrize("reinit_every", [1, 2])
def test_local_negatives_read_the_prev_net_during_the_warmup_of_a_reinit_epoch(base_run, reinit_every):
    run = make_run(base_run, "amorlip", "paper", t_online=1, t_target=1, scale_loss=False,
                   encoder_negatives="local", local_warmup_steps=2, reinit_every_epochs=reinit_every)
    model = TwoTowers()
    task = build_task(run, model, EMBED, "cpu")
    data = ClusteredPairs(7)
    sources = {}
    for epoch in range(2):
        task.start_epoch(epoch, 3)
        for k in range(3):
            images, texts = data.batch()
            ema_before, prev = copy.deepcopy(task.lambdas.ema), copy.deepcopy(task.lambdas.prev)
            out = task.training_forward(images, texts, k)
            with torch.no_grad():
                feats = model(images, texts)
                x, y, s = feats["image_features"], feats["text_features"], feats["logit_scale"]
                loss = {name: encoder_loss_local(x, y, s, nets["image"](x), nets["text"](y)).item()
                        for name, nets in (("ema", ema_before), ("prev", prev))}
            if reinit_every == 1 or (epoch, k) != (1, 0):  # without a re-init, prev = EMA at the epoch start
                assert abs(loss["ema"] - loss["prev"]) > 1e-6 * abs(loss["ema"])  # the two nets differ
            sources[epoch, k] = min(loss, key=lambda n: abs(loss[n] - out["encoder_loss"]))
            assert out["encoder_loss"] == pytest.approx(loss[sources[epoch, k]], rel=1e-5)
    # epoch 0: its prev net is an untrained one, so the EMA net from the first step; epoch 1 re-inits
    # (reinit_every 1) and reads prev for local_warmup_steps = 2 steps; without a re-init, the EMA net
    assert [sources[0, k] for k in range(3)] == ["ema"] * 3
    assert [sources[1, k] for k in range(3)] == (["prev", "prev", "ema"] if reinit_every == 1 else ["ema"] * 3)


def test_local_negatives_with_the_mixed_target_are_refused(base_run):
    runs = {"a": {"method": "amorlip", "variant": "published", "amorlip": {"encoder_negatives": "local"}}}
    with pytest.raises(ConfigError, match=r"amorlip\.encoder_negatives.*mixed_target.*current global partition sum"):
        load_config({"runs": runs}, check_paths=False)
    runs["a"]["variant"] = "paper"
    run = get_run(load_config({"runs": runs}, check_paths=False), "a")
    assert run.amorlip.encoder_negatives == "local" and run.amorlip.encoder_partition == "ema_net"
    assert run.amorlip.local_warmup_steps == 50
    assert base_run.amorlip.encoder_negatives == "global"  # the default: the authors' global negatives
    with pytest.raises(ValueError, match="encoder_negatives 'local' needs encoder_partition 'ema_net'"):
        build_task(make_run(base_run, encoder_negatives="local"), TwoTowers(), EMBED, "cpu")
    small = {"a": {"method": "amorlip", "variant": "paper", "batch_size": 2, "nproc": 2,
                   "amorlip": {"encoder_negatives": "local"}}}
    with pytest.raises(ConfigError, match="local batch B >= 2"):
        load_config({"runs": small}, check_paths=False)


def test_state_dict_round_trip_reproduces_the_next_step_exactly(base_run, one_rank_world, tmp_path):
    """Through the trainer's checkpoint (DeepSpeed's module and ZeRO optimizer + the task's state)."""
    run = make_run(base_run)
    data = ClusteredPairs(6)
    batches = [data.batch() for _ in range(5)]
    model = TwoTowers()
    engine, task = engine_and_task(run, model, one_rank_world)
    task.start_epoch(0, 2)
    for k in range(2):
        encoder_step(task, engine, *batches[k], k)
    task.start_epoch(1, 3)
    encoder_step(task, engine, *batches[2], 0)
    tag = ckpt.save_checkpoint(engine, tmp_path, 3, {"task": task.state_dict()}, keep=1)
    model2 = TwoTowers(seed=99)
    engine2, task2 = engine_and_task(run, model2, one_rank_world)
    task2.load_state_dict(ckpt.load_checkpoint(engine2, tmp_path, tag)["task"])
    task2.start_epoch(1, 3)  # a mid-epoch resume: the life cycle of epoch 1 is not repeated
    for k, batch in zip((1, 2), batches[3:]):
        a = encoder_step(task, engine, *batch, k)
        b = encoder_step(task2, engine2, *batch, k)
        assert a["loss"].item() == b["loss"].item()
        assert {k: v for k, v in a.items() if k != "loss"} == {k: v for k, v in b.items() if k != "loss"}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    for name in ("online", "ema", "prev"):
        nets, nets2 = getattr(task.lambdas, name), getattr(task2.lambdas, name)
        assert all(torch.equal(p, q) for p, q in zip(nets.parameters(), nets2.parameters()))
    assert set(task.lambda_nets_state()) == {"image", "text"}


def probe_metrics(model, probe):
    with torch.no_grad():
        feats = model(*probe)
        x, y = feats["image_features"], feats["text_features"]
        loss = clip_loss(x, y, 1 / 0.07).item()  # fixed scale: comparable across runs and steps
        top1 = (torch.argmax(x @ y.T, dim=1) == torch.arange(len(x))).float().mean().item()
    return loss, top1


@pytest.mark.parametrize("method,variant", [("clip", "none"), ("amorlip", "published"), ("amorlip", "paper")])
def test_200_steps_on_clustered_data_learn_and_lambda_tracks_the_targets(base_run, one_rank_world, method, variant):
    epochs, steps = 4, 50
    # a 50-step epoch is short: a faster lambda lr and EMA than the paper's (thousands of steps per
    # epoch) let the re-initialised nets catch up within an epoch
    run = dataclasses.replace(make_run(base_run, method, variant, lambda_lr=3e-2, ema_alpha=0.8, t_target=1),
                              epochs=epochs, weight_decay=0.0, warmup_steps=20)
    data = ClusteredPairs(7)
    probe = data.batch(256)
    model = TwoTowers(seed=1)
    engine, task = engine_and_task(run, model, one_rank_world)
    start_loss, start_top1 = probe_metrics(model, probe)
    gaps, prev_gaps = {}, {}
    for epoch in range(epochs):
        task.start_epoch(epoch, steps)
        for k in range(steps):
            lr = set_lr(engine.optimizer, run, epoch * steps + k, epochs * steps)  # the trainer's schedule
            assert lr == pytest.approx(cosine_lr(epoch * steps + k, run.lr, 20, epochs * steps))
            out = encoder_step(task, engine, *data.batch(), k)
            assert math.isfinite(out["loss"].item())
            if method == "amorlip":
                gaps.setdefault(epoch, []).append(abs(out["lambda_gap"]))
                prev_gaps.setdefault(epoch, []).append(abs(out["lambda_gap_prev"]))
    end_loss, end_top1 = probe_metrics(model, probe)
    assert end_loss < 0.8 * start_loss
    assert end_top1 > start_top1 + 0.1
    if method == "amorlip":
        for epoch, gap in gaps.items():
            # each epoch starts from re-initialised nets; by its end the EMA net tracks log Z_comb
            start, end = sum(gap[:3]) / 3, sum(gap[-5:]) / 5
            assert end < 0.3 * start and end < 1.5, (epoch, start, end)
            if epoch > 0:
                # last epoch's net, mixed into this epoch's targets, stays close to the in-batch sums
                assert max(prev_gaps[epoch]) < 0.5 * max(gaps[epoch]), (epoch, prev_gaps[epoch], gaps[epoch])
        # log targets from the real sums: partition_targets ~ log(B) + s E[cos]
        feats = model(*data.batch())
        log_t, _ = partition_targets(feats["image_features"], feats["text_features"], feats["logit_scale"], 1e-3)
        assert torch.isfinite(mix_log_targets(log_t, log_t, 0.8)).all()
