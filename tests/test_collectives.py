"""Collective accounting (amorlip/collectives.py) on 2 gloo ranks through the real Trainer.

Three independent answers for each step's communication:
- the counter (what the project's helpers record, as train.json and MLflow report it);
- a measurement: every call of torch.distributed's collectives made inside the trainer's step,
  wrapped in this test, split by caller (DeepSpeed's or the rest);
- arithmetic: CLIP at global batch G, feature dim d, gathers 2 x G x d x 4 bytes a step and
  reduce-scatters as much in the backward; AmorLIP with global negatives also gathers the no-grad
  features of its partition targets; with local negatives only its Stage-I steps gather (every
  ``t_online``-th step); the lambda nets all-reduce ``t_lambda`` x their parameter bytes per Stage I;
  DeepSpeed (ZeRO-1) all-reduces 4 bytes per encoder parameter and all-gathers the padded partitions.
"""

from __future__ import annotations

import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_world_equivalence import (
    EPOCHS,
    GLOBAL,
    STEPS_PER_EPOCH,
    WORLD,
    RankSlices,
    global_batches,
    run_config,
)

from amorlip.distributed import free_port

CASES = {
    "clip": {"method": "clip"},
    "amorlip-global": {"method": "amorlip", "variant": "paper",
                       "amorlip": {"t_online": 1, "t_lambda": 3, "encoder_negatives": "global"}},
    "amorlip-local": {"method": "amorlip", "variant": "paper",
                      "amorlip": {"t_online": 2, "t_lambda": 3, "encoder_negatives": "local"}},
}
STEPS = EPOCHS * STEPS_PER_EPOCH
MEASURED = ("all_gather", "all_reduce", "scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce",
            "broadcast", "all_to_all", "all_to_all_single", "reduce_scatter")


def _measure(calls: list, inside: list) -> None:
    """Wrap torch.distributed's collectives: each call made while ``inside[0]`` is set is appended as
    ``(name, payload bytes, numel, made by DeepSpeed)``; the wrapped functions still run."""
    import torch.distributed as dist

    def payload(name, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if isinstance(first, (list, tuple)):  # all_gather(output list, input)
            return sum(t.numel() * t.element_size() for t in first), sum(t.numel() for t in first)
        return first.numel() * first.element_size(), first.numel()

    for name in MEASURED:
        if not hasattr(dist, name):
            continue
        original = getattr(dist, name)

        def wrapper(*args, __original=original, __name=name, **kwargs):
            if inside[0]:
                caller = traceback.extract_stack(limit=2)[0].filename
                nbytes, numel = payload(__name, args, kwargs)
                calls.append((__name, nbytes, numel, f"{os.sep}deepspeed{os.sep}" in caller))
            return __original(*args, **kwargs)

        setattr(dist, name, wrapper)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import StopSignal, Trainer
    from amorlip.train.run import build_model_engine_task

    calls: list = []
    inside = [False]
    _measure(calls, inside)
    results = {}
    try:
        for name, case in CASES.items():
            case = dict(case)
            amorlip = {"beta_epochs": 1, "rho": [6.5, -8.0], "t_target": 1, **case.pop("amorlip", {})}
            run = run_config(name, WORLD, **case, amorlip=amorlip)
            world = dist_utils.make_world(run.batch_size, run.world_size)
            engine, task, _, _ = build_model_engine_task(run, world)
            trainer = Trainer(run=run, engine=engine, task=task,
                              loader=RankSlices(world, global_batches(STEPS)), run_dir=Path(out_dir) / name,
                              world=world, stop=StopSignal(),
                              tracker=Tracker("sqlite:///unused.db", Path(out_dir) / "off.jsonl", enabled=False))

            def bracket(method):  # measure inside the accounted window: the step and its logging
                def wrapped(*args, **kwargs):
                    inside[0] = True
                    try:
                        return method(*args, **kwargs)
                    finally:
                        inside[0] = False
                return wrapped

            trainer._step, trainer._after_step = bracket(trainer._step), bracket(trainer._after_step)
            first = len(calls)
            trainer.fit()
            lambda_params = (sum(p.numel() for p in task.lambdas.online.parameters())
                             if hasattr(task, "lambdas") else 0)
            results[name] = {
                "summary": trainer.comm.summary(), "measured": calls[first:],
                "metrics": trainer.metrics.read() if world.is_master else None,
                "feature_dim": engine.module.text_projection.shape[1], "lambda_params": lambda_params,
                "encoder_params": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
                "t_lambda": run.amorlip.t_lambda, "t_online": run.amorlip.t_online,
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist_utils.shutdown()


@pytest.fixture(scope="module")
def accounted(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _totals(per_step: dict, steps: int) -> dict[str, tuple[int, int]]:
    return {k: (round(v["calls"] * steps), round(v["bytes"] * steps)) for k, v in per_step.items()}


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_counted_collectives_match_a_measurement_and_the_arithmetic(accounted, name):
    for result in (r[name] for r in accounted):
        summary = result["summary"]
        assert summary["steps"] == STEPS and summary["world_size"] == WORLD
        counted = _totals(summary["per_step"], STEPS)
        ours = [c for c in result["measured"] if not c[3]]
        # the counter equals what torch.distributed really ran (the gloo backward of the autograd
        # all-gather is one scatter per rank: the reduce-scatter's payload in W calls)
        gathers = [c for c in ours if c[0] == "all_gather"]
        scatters = [c for c in ours if c[0] == "scatter"]
        reduces = [c for c in ours if c[0] == "all_reduce"]
        assert {c[0] for c in ours} <= {"all_gather", "scatter", "all_reduce"}, ours
        assert counted["all_gather"] == (len(gathers), sum(c[1] for c in gathers))
        assert counted.get("reduce_scatter", (0, 0)) == (len(scatters) // WORLD, sum(c[1] for c in scatters))
        assert counted["all_reduce"] == (len(reduces), sum(c[1] for c in reduces))

        # the arithmetic: fp32 features of d dims, G rows gathered per modality
        feature_bytes = GLOBAL * result["feature_dim"] * 4
        stage_one = sum(1 for s in range(STEPS) if (s % STEPS_PER_EPOCH) % result["t_online"] == 0)
        lambda_bytes = result["lambda_params"] * 4
        if name == "clip":
            want_gather, want_scatter, lambda_reduces = (2 * STEPS, 2 * STEPS * feature_bytes), 2 * STEPS, 0
        elif name == "amorlip-global":  # targets (no grad) + encoder (with grad), every step
            want_gather, want_scatter, lambda_reduces = (4 * STEPS, 4 * STEPS * feature_bytes), 2 * STEPS, stage_one * 3
        else:  # local negatives: targets on Stage-I steps only, no encoder gather at all
            want_gather, want_scatter, lambda_reduces = (2 * stage_one, 2 * stage_one * feature_bytes), 0, stage_one * 3
        assert counted["all_gather"] == want_gather, (name, counted)
        assert counted.get("reduce_scatter", (0, 0)) == (want_scatter, want_scatter * feature_bytes), name
        # all-reduces: the lambda gradients, the step flags (4 fp32) every step, the metric means (log_every 1)
        assert counted["all_reduce"][0] == lambda_reduces + 2 * STEPS
        lambda_measured = [c for c in reduces if c[2] == result["lambda_params"]]
        assert len(lambda_measured) == lambda_reduces and sum(c[1] for c in lambda_measured) == lambda_reduces * lambda_bytes
        assert sum(1 for c in reduces if c[1] == 16) >= STEPS  # the flag vector

        # DeepSpeed's computed traffic against its measured calls (its scalar checks left out)
        ds = [c for c in result["measured"] if c[3] and c[2] > 1]
        grad_bytes = result["encoder_params"] * 4
        ds_grad = [c for c in ds if c[0] == "all_reduce"]
        ds_params = [c for c in ds if c[0] == "all_gather_into_tensor"]
        assert sum(c[1] for c in ds_grad) == STEPS * grad_bytes
        assert counted["deepspeed_grad_all_reduce"] == (len(ds_grad), sum(c[1] for c in ds_grad))
        assert counted["deepspeed_param_all_gather"] == (len(ds_params), sum(c[1] for c in ds_params))
        assert {c[0] for c in ds} == {"all_reduce", "all_gather_into_tensor"}, ds
        assert summary["bytes_per_step"] == pytest.approx(sum(v["bytes"] for v in summary["per_step"].values()))


@pytest.mark.dist
def test_local_negatives_move_fewer_bytes_and_every_logged_step_carries_the_figures(accounted):
    rank0 = accounted[0]
    clip, glob, local = (rank0[n]["summary"]["per_step"] for n in CASES)

    def features(per_step):
        return sum(v["bytes"] for k, v in per_step.items() if k in ("all_gather", "reduce_scatter"))

    # feature bytes per step, in units of G x d x 4: CLIP 4 (gather + backward), AmorLIP global 6 (its
    # targets' gathers too), AmorLIP local 1 (2 gathers on every second step, no encoder gather)
    assert features(local) * 6 == features(glob) and features(clip) * 3 == features(glob) * 2
    for name in CASES:
        records = [r for r in rank0[name]["metrics"] if "kind" not in r]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        for record in records:
            parts = {k: v for k, v in record.items() if k.startswith("comm/") and k.endswith("_bytes")}
            assert parts and record["comm/bytes"] == pytest.approx(sum(parts.values()))
            assert math.isfinite(record["comm/deepspeed_grad_all_reduce_bytes"])
    # on the Stage-I-free steps of the local run only the trainer's flag and metric all-reduces and
    # DeepSpeed remain: no feature collective is logged for them
    local_records = [r for r in rank0["amorlip-local"]["metrics"] if "kind" not in r]
    assert [r.get("comm/all_gather_calls", 0.0) for r in local_records] == [2.0, 0.0, 2.0, 0.0]
