"""One global batch on 1 rank and on 2 ranks, through the real Trainer: the same numbers.

What ships is exercised end to end: ``make_world`` (the process group, the batch split), the
DeepSpeed engine (ZeRO 1 and 3), the task built with ``world.group``, the lambda nets' all-reduce and
the trainer's step, flags, clamp and metric reduction. Only the data comes from a fixed in-memory
global batch, split into rank slices exactly as the rows of ``torch.cat`` over ranks, so that the
1-rank run sees the concatenation of what the 2 ranks see. An independent answer for each method:
the 1-rank run (whose objectives are tested against float64 re-derivations in test_objectives.py).

Round 1 shipped a trainer that passed no process group: each rank trained on its own negatives and
only objective-level tests (with an explicit group) existed. These tests fail on that wiring: the
2-rank CLIP loss of the first step would be ~ln(4) instead of ~ln(8).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from amorlip.distributed import free_port

WORLD = 2
GLOBAL = 8
STEPS_PER_EPOCH = 2
EPOCHS = 2  # epoch 1: the lambda life cycle (prev <- EMA, re-init), beta > 0, the divergence check
DATASET = STEPS_PER_EPOCH * GLOBAL  # the samples the dense indices name (FastCLIP's u)

# name -> run overrides; each is trained by the 1-rank and by the 2-rank job
CASES = {
    "clip": {"method": "clip"},
    "siglip": {"method": "siglip"},
    "amorlip-published": {"method": "amorlip", "variant": "published"},
    "amorlip-paper": {"method": "amorlip", "variant": "paper"},
    "amorlip-kl": {"method": "amorlip", "variant": "published", "amorlip": {"lambda_loss": "kl"}},
    # ZeRO-3 partitions the one-element logit scale; s starts at 14.3 > 10, so the clamp fires at step 1
    "clip-zero3": {"method": "clip", "zero_stage": 3, "max_logit_scale": 10.0},
    # u is replicated: every rank applies the gathered global batch's updates (gamma 1, then 0.65)
    "fastclip-v3": {"method": "fastclip", "lr_logit_scale_thresh": 0.075,
                    "fastclip": {"gamma_min": 0.3, "gamma_decay_epochs": 2, "rho": 6.5}},
    "fastclip-sogclr": {"method": "fastclip", "variant": "sogclr", "fastclip": {"gamma": 0.7}},
    # the authors' lambda lr x W: not 1-rank-equivalent by design (tested on its own below)
    "amorlip-lr-x-w": {"method": "amorlip", "amorlip": {"lambda_lr_scaling": "world_size"}},
}
EQUIVALENT = [name for name in CASES if name != "amorlip-lr-x-w"]

WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "dark", "light", "emoji"]


def run_config(name: str, world_size: int, **extra):
    from amorlip.config import get_run, load_config

    run = {"model": "amorlip-tiny", "dataset": "d", "batch_size": GLOBAL, "epochs": EPOCHS, "lr": 1e-3,
           "warmup_steps": 1, "weight_decay": 0.1, "workers": 0, "seed": 3, "nproc": world_size,
           "log_every": 1, "checkpoint_every": 1000, "keep_checkpoints": 1, "zero_stage": 1,
           "amorlip": {"beta_epochs": 1, "rho": [6.5, -8.0], "t_target": 1}}
    override = dict(CASES.get(name, {}))
    run["amorlip"] = {**run["amorlip"], **override.pop("amorlip", {})}
    run.update(override)
    run.update(extra)
    config = load_config({"datasets": {"d": {"source": "emoji"}}, "runs": {name: run}}, check_paths=False)
    return get_run(config, name)


def global_batches(steps: int) -> list[dict]:
    """Fixed global batches (images, tokenised captions), identical in every process."""
    from amorlip.models import get_tokenizer

    tokenizer = get_tokenizer("amorlip-tiny")
    g = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    out = []
    for step in range(steps):
        captions = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(GLOBAL)]
        out.append({"images": torch.randn(GLOBAL, 3, 32, 32, generator=g), "texts": tokenizer(captions),
                    "keys": [f"{step:03d}-{i:03d}" for i in range(GLOBAL)]})
    # dense data-set indices over DATASET samples, shuffled: each epoch revisits every index (u carries over)
    perm = torch.randperm(DATASET, generator=g)
    for step, batch in enumerate(out):
        block = (step + step // STEPS_PER_EPOCH) % STEPS_PER_EPOCH
        batch["indices"] = perm[block * GLOBAL:(block + 1) * GLOBAL].clone()
    return out


class RankSlices:
    """The loader contract (``len``, ``epoch(e, start_step)``) over fixed global batches: rank r gets
    rows ``r*B .. r*B+B-1`` of each, B = world.local_batch."""

    def __init__(self, world, batches: list[dict]):
        self.world, self.batches = world, batches
        self.total_samples = DATASET

    def __len__(self) -> int:
        return STEPS_PER_EPOCH

    def epoch(self, epoch: int, start_step: int = 0):
        rows = slice(self.world.rank * self.world.local_batch, (self.world.rank + 1) * self.world.local_batch)
        for step in range(start_step, STEPS_PER_EPOCH):
            batch = self.batches[epoch * STEPS_PER_EPOCH + step]
            yield {"images": batch["images"][rows], "texts": batch["texts"][rows],
                   "keys": batch["keys"][rows], "indices": batch["indices"][rows], "skipped": 0, "step": step}


def train_case(name: str, world_size: int, out_dir: Path) -> dict:
    """Build and fit one case in this (already launched) process; returns rank-local results."""
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import StopSignal, Trainer, full_module_state
    from amorlip.train.run import build_model_engine_task

    run = run_config(name, world_size)
    world = dist_utils.make_world(run.batch_size, run.world_size, what=name)
    engine, task, _, _ = build_model_engine_task(run, world)
    tracker = Tracker("sqlite:///unused.db", out_dir / "offline.jsonl", enabled=False)
    trainer = Trainer(run=run, engine=engine, task=task,
                      loader=RankSlices(world, global_batches(EPOCHS * STEPS_PER_EPOCH)),
                      run_dir=out_dir / f"{name}-w{world_size}", world=world, tracker=tracker, stop=StopSignal())
    trainer.fit()
    result = {"weights": {k: v.float().cpu() for k, v in full_module_state(engine).items()},
              "metrics": trainer.metrics.read() if world.is_master else None,
              "replica_checksum": task.replica_checksum()}
    if getattr(task, "log_u_img", None) is not None:
        result["log_u"] = (task.log_u_img.cpu().clone(), task.log_u_txt.cpu().clone())
    if hasattr(task, "lambdas"):
        result["lambdas"] = task.lambdas.state_dict()
        result["lambda_adam_lr"] = task.lambdas.lr
    return result


def _worker(rank: int, world_size: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils

    try:
        results = {name: train_case(name, world_size, Path(out_dir)) for name in names}
        torch.save(results, Path(out_dir) / f"w{world_size}-rank{rank}.pt")
    finally:
        dist_utils.shutdown()


def launch(world_size: int, out_dir: Path, names: list[str]) -> list[dict]:
    mp.start_processes(_worker, args=(world_size, free_port(), str(out_dir), names), nprocs=world_size,
                       join=True, start_method="spawn")
    return [torch.load(out_dir / f"w{world_size}-rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def both_worlds(tmp_path_factory):
    out = tmp_path_factory.mktemp("worlds")
    names = list(CASES)
    return launch(1, out, names)[0], launch(WORLD, out, names), out


def _close(a, b, what, rtol=2e-4, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.dist
@pytest.mark.parametrize("name", EQUIVALENT)
def test_two_ranks_train_like_one_rank_on_the_same_global_batch(both_worlds, name):
    one, two, _ = both_worlds
    single, ranks = one[name], [r[name] for r in two]
    # logged metrics are the global batch's: equal to the 1-rank run at every step
    m1, m2 = single["metrics"], ranks[0]["metrics"]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for r1, r2 in zip(m1, m2):
        assert r1["global_batch"] == r2["global_batch"] == GLOBAL and r2["world_size"] == WORLD
        for key, value in r1.items():
            if key in ("time", "images_per_s", "world_size"):
                continue
            if isinstance(value, float):
                assert r2[key] == pytest.approx(value, rel=2e-4, abs=2e-5), (name, r1["step"], key)
    # the updated weights after 4 steps (two epochs) equal the 1-rank ones, and both replicas agree
    for key, w in single["weights"].items():
        _close(ranks[0]["weights"][key], w, f"{name} weight {key}")
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
    if "log_u" in single:
        # u: every entry set (two epochs over the data set), replicated, equal to the 1-rank u
        assert all(torch.isfinite(u).all() for u in single["log_u"])
        for u1, u2a, u2b in zip(single["log_u"], ranks[0]["log_u"], ranks[1]["log_u"], strict=True):
            assert torch.equal(u2a, u2b)
            _close(u2a, u1, f"{name} log u")
    if "lambdas" in single:
        # one model across ranks: bit-identical replicas, equal to the 1-rank nets and Adam state
        assert ranks[0]["replica_checksum"] == ranks[1]["replica_checksum"]
        assert ranks[0]["lambda_adam_lr"] == single["lambda_adam_lr"]  # lambda_lr_scaling: none
        for kind in ("online", "ema", "prev"):
            for modality, state in single["lambdas"][kind].items():
                for key, value in state.items():
                    _close(ranks[0]["lambdas"][kind][modality][key], value, f"{name} {kind}/{modality}/{key}")


@pytest.mark.dist
def test_first_clip_loss_is_the_global_batch_loss_not_the_local_one(both_worlds):
    """At initialisation the features are near-random: the CLIP loss is ~ln(batch) of the negatives
    each row meets. Global negatives: ~ln 8 on both worlds; per-rank negatives would give ~ln 4."""
    import math

    one, two, _ = both_worlds
    first = two[0]["clip"]["metrics"][0]["clip_loss"]
    assert abs(first - math.log(GLOBAL)) < abs(first - math.log(GLOBAL // WORLD))
    assert first == pytest.approx(one["clip"]["metrics"][0]["clip_loss"], rel=1e-4)


@pytest.mark.dist
def test_zero3_clamps_the_partitioned_logit_scale_on_every_rank(both_worlds):
    _, two, _ = both_worlds
    scales = [r["logit_scale"] for r in two[0]["clip-zero3"]["metrics"]]
    # the forward of step 1 sees the initial s = 14.3; every later step the clamped value
    assert scales[0] > 14 and max(scales[1:]) <= 10.0 + 1e-4, scales
    for rank in two:
        assert float(rank["clip-zero3"]["weights"]["logit_scale"].reshape(())) <= torch.log(torch.tensor(10.0)) + 1e-6


# --------------------------------------------------------------------------- the lambda lr and the world


@pytest.mark.dist
def test_lambda_lr_scaling_world_size_is_the_authors_lr_times_w(both_worlds):
    """``lambda_lr_scaling: world_size`` reproduces the authors' ``lambda_lr x W``; still one model."""
    one, two, _ = both_worlds
    single, ranks = one["amorlip-lr-x-w"], [r["amorlip-lr-x-w"] for r in two]
    assert single["lambda_adam_lr"] == pytest.approx(1e-3)
    assert ranks[0]["lambda_adam_lr"] == ranks[1]["lambda_adam_lr"] == pytest.approx(WORLD * 1e-3)
    assert ranks[0]["replica_checksum"] == ranks[1]["replica_checksum"]
    # a larger lambda step really ran: the online nets moved away from the 1-rank ones
    delta = max((ranks[0]["lambdas"]["online"]["image"][k] - v).abs().max().item()
                for k, v in single["lambdas"]["online"]["image"].items())
    assert delta > 1e-4


def _resume_worker(rank: int, port: int, run_dir: str, out: str) -> None:
    """A 1-rank job (its config edited to nproc 1) finding the 2-rank run's checkpoints."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import StopSignal, Trainer
    from amorlip.train.run import build_model_engine_task

    run = run_config("amorlip-published", 1)
    world = dist_utils.make_world(run.batch_size, run.world_size)
    try:
        engine, task, _, _ = build_model_engine_task(run, world)
        trainer = Trainer(run=run, engine=engine, task=task, loader=RankSlices(world, global_batches(4)),
                          run_dir=Path(run_dir), world=world,
                          tracker=Tracker("sqlite:///unused.db", Path(out) / "off.jsonl", enabled=False),
                          stop=StopSignal())
        try:
            trainer.resume()
            outcome = "resumed"
        except RuntimeError as exc:
            outcome = str(exc)
        Path(out, "resume.txt").write_text(outcome)
    finally:
        dist_utils.shutdown()


@pytest.mark.dist
def test_resume_on_another_world_size_stops_before_any_step(both_worlds, tmp_path):
    run_dir = both_worlds[2] / f"amorlip-published-w{WORLD}"
    assert (run_dir / "checkpoints").is_dir()
    mp.start_processes(_resume_worker, args=(free_port(), str(run_dir), str(tmp_path)), nprocs=1, join=True,
                       start_method="spawn")
    message = (tmp_path / "resume.txt").read_text()
    assert "was written by 2 ranks but this job has 1" in message, message
    assert "Relaunch with 2 ranks" in message and "to start this run over" in message


def _mismatch_worker(rank: int, port: int, out_dir: str) -> None:
    """Two ranks whose lambda nets are made to differ: the checkpoint-time check must stop the run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import ReplicaMismatch, StopSignal, Trainer
    from amorlip.train.run import build_model_engine_task

    run = run_config("amorlip-published", 2, checkpoint_every=1)
    world = dist_utils.make_world(run.batch_size, run.world_size)
    try:
        engine, task, _, _ = build_model_engine_task(run, world)
        if rank == 1:  # a rank whose nets drifted (what a missing all-reduce would do)
            with torch.no_grad():
                next(task.lambdas.ema["image"].parameters()).add_(1e-3)
        trainer = Trainer(run=run, engine=engine, task=task,
                          loader=RankSlices(world, global_batches(EPOCHS * STEPS_PER_EPOCH)),
                          run_dir=Path(out_dir) / "mismatch", world=world,
                          tracker=Tracker("sqlite:///unused.db", Path(out_dir) / "off.jsonl", enabled=False),
                          stop=StopSignal())
        try:
            trainer.fit()
            outcome = "trained"
        except ReplicaMismatch as exc:
            outcome = str(exc)
        (Path(out_dir) / f"mismatch-rank{rank}.txt").write_text(outcome)
    finally:
        dist_utils.shutdown()


@pytest.mark.dist
def test_lambda_nets_that_differ_across_ranks_stop_the_run_at_the_checkpoint(tmp_path):
    mp.start_processes(_mismatch_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        message = (tmp_path / f"mismatch-rank{rank}.txt").read_text()
        assert "lambda nets differ across ranks at step 1" in message and "rank 1:" in message, message
    assert not (tmp_path / "mismatch" / "checkpoints" / "step-0000001" / "complete").exists()


def test_launch_with_another_world_size_than_configured_is_refused(tmp_path):
    import subprocess
    import sys

    code = ("from amorlip import distributed as d\n"
            "try:\n"
            "    d.make_world(64, 2, what=\"run 'x'\")\n"
            "except d.WorldSizeMismatch as exc:\n"
            "    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "MASTER_PORT")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "configured for nproc x nodes = 2 rank(s) but was launched with 1" in res.stdout
    assert "amorlip launch --nproc 2" in res.stdout


# --------------------------------------------------------------------------- local negatives: no collective

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "barrier")


def _count_collectives(calls: list, inside: list) -> None:
    """Wrap torch.distributed's collectives (and the autograd all-gather) so that every call made while
    ``inside[0]`` is set is appended to ``calls``; the wrapped functions still run."""
    import functools

    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    def counted(module, name):
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if inside[0]:
                calls.append(f"{module.__name__}.{name}")
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            counted(dist, name)
    counted(dist_fn, "all_gather")


def _local_negatives_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import StopSignal, Trainer
    from amorlip.train.run import build_model_engine_task

    calls: list[str] = []
    inside = [False]
    _count_collectives(calls, inside)
    results = {}
    try:
        for negatives in ("local", "global"):
            run = run_config(f"amorlip-{negatives}", WORLD, variant="paper",
                             amorlip={"beta_epochs": 1, "rho": [6.5, -8.0], "t_target": 1, "t_online": 2,
                                      "encoder_negatives": negatives})
            world = dist_utils.make_world(run.batch_size, run.world_size)
            engine, task, _, _ = build_model_engine_task(run, world)
            forward, per_step = task.training_forward, []

            def counted_forward(images, texts, step_in_epoch, forward=forward, task=task, per_step=per_step):
                first = len(calls)
                inside[0] = True
                try:
                    return forward(images, texts, step_in_epoch)
                finally:
                    inside[0] = False
                    per_step.append((task.epoch, step_in_epoch, calls[first:]))

            task.training_forward = counted_forward
            trainer = Trainer(run=run, engine=engine, task=task,
                              loader=RankSlices(world, global_batches(EPOCHS * STEPS_PER_EPOCH)),
                              run_dir=Path(out_dir) / negatives, world=world,
                              tracker=Tracker("sqlite:///unused.db", Path(out_dir) / "off.jsonl", enabled=False),
                              stop=StopSignal())
            trainer.fit()
            results[negatives] = {"per_step": per_step, "metrics": trainer.metrics.read() if world.is_master else None,
                                  "replica_checksum": task.replica_checksum()}
        torch.save(results, Path(out_dir) / f"local-rank{rank}.pt")
    finally:
        dist_utils.shutdown()


@pytest.mark.dist
def test_local_negatives_run_no_collective_between_stage_one_steps(tmp_path):
    """``encoder_negatives: local``, ``t_online: 2``, 2 gloo ranks, the real Trainer: the task's
    ``training_forward`` makes no collective call on the steps without Stage I (in-epoch step 1 of each
    epoch), and gathers / all-reduces on the Stage-I steps (partition targets, lambda gradients).

    Counted: every call of torch.distributed's collectives and of the autograd all-gather made while
    ``training_forward`` runs. Outside it, and so not counted, every step still has DeepSpeed's
    gradient all-reduce of the encoders (in ``engine.backward``/``step``) and the trainer's one
    all-reduce of the step flags (plus its metric all-reduce on logging steps). The same run with
    global negatives is the counter's positive control: its encoder loss gathers on every step.
    """
    mp.start_processes(_local_negatives_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"local-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for result in ranks:
        local, glob = result["local"]["per_step"], result["global"]["per_step"]
        assert [(e, k) for e, k, _ in local] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for epoch, step, calls in local:
            if step % 2:  # no Stage I: no collective at all
                assert calls == [], (epoch, step, calls)
            else:  # Stage I: gathered targets and all-reduced lambda gradients (t_lambda = 3)
                assert calls.count("torch.distributed.all_gather") == 2 and \
                    calls.count("torch.distributed.all_reduce") == 3, calls
        for epoch, step, calls in glob:  # global negatives: the encoder's autograd all-gather every step
            assert calls.count("torch.distributed.nn.functional.all_gather") == 2, (epoch, step, calls)
    assert ranks[0]["local"]["replica_checksum"] == ranks[1]["local"]["replica_checksum"]
    # the partition-target diagnostics are logged on Stage-I steps only; every step logs its loss
    metrics = ranks[0]["local"]["metrics"]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert [("log_target_mean" in r, "lambda_gap" in r) for r in metrics] == [(True, True), (False, False)] * 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["encoder_loss"]) for r in metrics)
