"""Bytes per step and step time on W gloo ranks: CLIP, AmorLIP global and AmorLIP local negatives.

Setting: the demo's model (``amorlip-demo``) and run defaults (config/config.yaml) at global batch 64,
fp32, DeepSpeed ZeRO-1, on 2 and then 4 gloo ranks of this machine (each world its own set of
processes; the three contenders share it and alternate block by block, so machine load hits them
alike). Contenders: CLIP (global negatives), AmorLIP ``paper`` with ``encoder_negatives: global``
(the authors' behaviour: every step gathers the features with and without grad) and with
``encoder_negatives: local`` (gathers only on Stage-I steps), both at ``t_online: 8`` (the paper's
medium-scale T_online), timed in epoch 1 (steady state: beta > 0, the previous epoch's net in use).

Each step is the real ``Trainer._step`` (forward, lambda updates, flags all-reduce, DeepSpeed backward
and step) on fixed in-memory batches (the loader is measured in data_throughput). The bytes come
from the project's own accounting (``amorlip.collectives``): counted for the project's collectives,
computed for DeepSpeed's gradient all-reduce and parameter all-gather (``tests/test_collectives.py``
checks both against the calls torch.distributed really sees). A block is 8 steps (a multiple of
T_online and T_target), so every block holds the same work.

Projection: the same accounting as arithmetic (:func:`step_bytes`), first checked against the
counted bytes at the measured scale, then evaluated for 8 nodes x 8 GPUs (W = 64) at the global batch,
model, T_online, T_lambda and lambda width of config/cc3m-rn50.yaml and config/cc12m-vitb32.yaml.
Per-rank wire bytes assume ring algorithms (``amorlip.collectives.ring_wire_bytes``). Step times on
this machine are W processes on 2 shared cores over loopback: they show the compute cost of each
contender, not what a network would add.

    python -m benchmarks.collectives [--tiny] [--worlds 2 4] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    alternate,
    bench_config,
    default_workdir,
    print_table,
    quiet_env,
    setup_logging,
    spread,
    write_result,
)

log = logging.getLogger(__name__)

BLOCK = 8  # lcm of T_online = 8 and T_target = 2
T_ONLINE = 8
CONTENDERS = {
    "clip": {"method": "clip"},
    "amorlip-global": {"method": "amorlip", "variant": "paper",
                       "amorlip": {"t_online": T_ONLINE, "encoder_negatives": "global"}},
    "amorlip-local": {"method": "amorlip", "variant": "paper",
                      "amorlip": {"t_online": T_ONLINE, "encoder_negatives": "local"}},
}
PAPER_CONFIGS = ("config/cc3m-rn50.yaml", "config/cc12m-vitb32.yaml")
PROJECTED_WORLD = 64  # 8 nodes x 8 GPUs
FLAG_BYTES = 16  # the trainer's step-flag vector: 4 fp32


# --------------------------------------------------------------------------- the arithmetic


def step_bytes(contender: str, *, global_batch: int, feature_dim: int, world_size: int, t_online: int,
               t_lambda: int, lambda_params: int, group_sizes: list[int], zero_stage: int,
               feature_bytes: int = 4) -> dict[str, float]:
    """Payload bytes per rank and step, by kind, averaged over a period of ``t_online`` steps.

    Features: each gather of one modality moves the global batch, G x d elements; the backward of an
    autograd gather reduce-scatters as much. CLIP gathers both modalities with grad every step.
    AmorLIP global also gathers both without grad for its partition targets, every step; AmorLIP
    local only those target gathers, on Stage-I steps (every ``t_online``-th). Stage I all-reduces
    the lambda nets' gradients ``t_lambda`` times. Every step all-reduces the trainer's flags.
    DeepSpeed: :func:`amorlip.collectives.deepspeed_step_traffic`. Logging-step metric means are
    left out (one small all-reduce every ``log_every`` steps).
    """
    from amorlip.collectives import deepspeed_step_traffic

    one_gather = global_batch * feature_dim * feature_bytes
    stage_one = 1.0 / t_online
    if contender == "clip":
        gather, scatter, lambda_reduce = 2 * one_gather, 2 * one_gather, 0.0
    elif contender == "amorlip-global":
        gather, scatter = 4 * one_gather, 2 * one_gather
        lambda_reduce = stage_one * t_lambda * lambda_params * 4
    elif contender == "amorlip-local":
        gather, scatter = stage_one * 2 * one_gather, 0.0
        lambda_reduce = stage_one * t_lambda * lambda_params * 4
    else:
        raise ValueError(contender)
    out = {"all_gather": float(gather), "reduce_scatter": float(scatter), "all_reduce": FLAG_BYTES + lambda_reduce}
    for kind, (_, nbytes) in deepspeed_step_traffic(group_sizes, zero_stage, world_size, 10**18).items():
        out[kind] = float(nbytes)
    return {k: v for k, v in out.items() if v}


def wire_bytes(per_kind: dict[str, float], world_size: int) -> float:
    from amorlip.collectives import ring_wire_bytes

    return sum(ring_wire_bytes(kind, payload, world_size) for kind, payload in per_kind.items())


def lambda_net_params(embed_dim: int, hidden_factor: float) -> int:
    """Parameters of the two lambda nets (image and text) of one run."""
    from amorlip.amortizer import LambdaNet

    return 2 * sum(p.numel() for p in LambdaNet(embed_dim, hidden_factor).parameters())


def model_group_sizes(model_name: str, run) -> list[int]:
    """Trainable elements per optimizer group of ``model_name`` (a randomly initialised CPU copy, built
    once for its shapes: open_clip moves the model to a device, which a meta-device build cannot do)."""
    from amorlip.models import create_model
    from amorlip.train.engine import param_groups, scalar_params_to_1d

    model, _, _ = create_model(model_name)
    scalar_params_to_1d(model)
    sizes = [sum(p.numel() for p in group["params"]) for group in param_groups(model, run)]
    del model
    return sizes


def projection(world_size: int = PROJECTED_WORLD) -> list[dict]:
    """Bytes per rank and step of each contender at the paper configs' settings on ``world_size`` GPUs."""
    from amorlip.config import get_run, load_config, read_config_file
    from amorlip.models import model_config

    rows = []
    for path in PAPER_CONFIGS:
        raw = read_config_file(REPO / path)
        raw["runs"] = {"amorlip": raw["runs"]["amorlip"]}  # the one run read (its model, batch, lambda settings)
        run = get_run(load_config(raw, check_paths=False), "amorlip")
        am = run.amorlip
        d = model_config(run.model)["embed_dim"]
        sizes = model_group_sizes(run.model, run)
        common = {"global_batch": run.batch_size, "feature_dim": d, "world_size": world_size,
                  "t_online": am.t_online, "t_lambda": am.t_lambda,
                  "lambda_params": lambda_net_params(d, am.lambda_hidden_factor), "group_sizes": sizes,
                  "zero_stage": run.zero_stage}
        for name in CONTENDERS:
            per_kind = step_bytes(name, **common)
            features = sum(v for k, v in per_kind.items() if k in ("all_gather", "reduce_scatter"))
            rows.append({"config": path, "model": run.model, "contender": name, **{k: v for k, v in common.items()
                                                                                   if k != "group_sizes"},
                         "encoder_params": sum(sizes), "per_kind": per_kind, "payload": sum(per_kind.values()),
                         "feature_payload": features, "wire": wire_bytes(per_kind, world_size),
                         "feature_wire": wire_bytes({k: v for k, v in per_kind.items()
                                                     if k in ("all_gather", "reduce_scatter")}, world_size)})
    return rows


# --------------------------------------------------------------------------- the measurement


class FixedBatches:
    """The loader contract the Trainer's constructor reads (``len``); steps are driven directly."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch


def synthetic_batches(run, local_batch: int, rank: int, n: int = 2) -> list[dict]:
    import random

    import torch

    from amorlip.models import get_tokenizer, model_config

    size = model_config(run.model)["vision_cfg"]["image_size"]
    tokenizer = get_tokenizer(run.model)
    words = ["red", "green", "blue", "square", "circle", "small", "large", "dark", "light", "emoji"]
    rng, g = random.Random(rank), torch.Generator().manual_seed(rank)
    return [{"images": torch.randn(local_batch, 3, size, size, generator=g),
             "texts": tokenizer([" ".join(rng.choice(words) for _ in range(4)) for _ in range(local_batch)]),
             "skipped": 0} for _ in range(n)]


class Contender:
    """One run's trainer on this rank; a block is ``BLOCK`` trainer steps, its collectives counted."""

    def __init__(self, config: dict, name: str, work: Path):
        from amorlip import distributed as dist_utils
        from amorlip.config import get_run
        from amorlip.train.loop import StopSignal, Trainer
        from amorlip.train.run import build_model_engine_task

        self.run = get_run(config, name)
        self.world = dist_utils.make_world(self.run.batch_size, self.run.world_size, what=f"run {name!r}")
        engine, task, _, _ = build_model_engine_task(self.run, self.world)
        self.trainer = Trainer(run=self.run, engine=engine, task=task, loader=FixedBatches(10**6),
                               run_dir=work / "runs" / f"{name}-w{self.world.world_size}", world=self.world,
                               tracker=None, stop=StopSignal())
        self.trainer.pos.epoch = 1  # steady state, as in step_time
        task.start_epoch(1, self.trainer.steps_per_epoch)
        self.batches = synthetic_batches(self.run, self.world.local_batch, self.world.rank)
        self.counted: dict[str, list[int]] = {}
        self.steps = 0
        self.feature_dim = engine.module.text_projection.shape[1]
        self.lambda_params = (sum(p.numel() for p in task.lambdas.online.parameters())
                              if hasattr(task, "lambdas") else 0)

    def run_block(self, count: bool = True) -> float:
        from amorlip import collectives

        trainer = self.trainer
        trainer.pos.step_in_epoch -= trainer.pos.step_in_epoch % BLOCK
        t0 = time.perf_counter()
        for i in range(BLOCK):
            trainer._step(self.batches[i % len(self.batches)])
            step = collectives.take()  # _step takes the table at its start: this is the step's own
            if count:
                for kind, (calls, nbytes) in step.items():
                    entry = self.counted.setdefault(kind, [0, 0])
                    entry[0] += calls
                    entry[1] += nbytes
        if count:
            self.steps += BLOCK
        return (time.perf_counter() - t0) / BLOCK

    def __call__(self) -> list[float]:
        return [self.run_block()]

    def per_step(self) -> dict[str, dict[str, float]]:
        out = {k: {"calls": c / self.steps, "bytes": b / self.steps} for k, (c, b) in sorted(self.counted.items())}
        for kind, (calls, nbytes) in self.trainer.comm.deepspeed.items():
            out[kind] = {"calls": float(calls), "bytes": float(nbytes)}
        return out


def _worker(rank: int, world_size: int, port: int, config: dict, rounds: int, work: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(1)
    setup_logging()
    from amorlip import distributed as dist_utils
    from amorlip.collectives import engine_group_sizes

    try:
        contenders = {name: Contender(config, name, Path(work)) for name in CONTENDERS}
        for c in contenders.values():  # warm-up: allocator, DeepSpeed's first step; not counted
            c.run_block(count=False)
        samples = alternate(contenders, rounds)
        if rank == 0:
            result = {}
            for name, c in contenders.items():
                result[name] = {"step_s": spread(samples[name]), "per_step": c.per_step(), "steps": c.steps,
                                "feature_dim": c.feature_dim, "lambda_params": c.lambda_params,
                                "group_sizes": engine_group_sizes(c.trainer.engine, c.run),
                                "t_online": c.run.amorlip.t_online, "t_lambda": c.run.amorlip.t_lambda,
                                "zero_stage": c.run.zero_stage, "global_batch": c.run.batch_size,
                                "model": c.run.model}
            Path(out).write_text(json.dumps(result))
    finally:
        dist_utils.shutdown()


def measure(world_size: int, config_for, rounds: int, work: Path) -> dict:
    import torch.multiprocessing as mp

    from amorlip.distributed import free_port

    out = work / f"collectives-w{world_size}.json"
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    mp.start_processes(_worker, args=(world_size, free_port(), config_for(world_size), rounds, str(work), str(out)),
                       nprocs=world_size, join=True, start_method="spawn")
    log.info("world %d measured in %.0f s", world_size, time.monotonic() - t0)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch 16, 1 round (smoke test)")
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="rank counts (default 2 4; tiny 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per contender (default 5; tiny 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out-dir", default=None, help="where collectives.json goes (default benchmarks/results)")
    parser.add_argument("--reuse", action="store_true",
                        help="re-read each world's measurement from an earlier call in the workdir instead of measuring")
    args = parser.parse_args(argv)
    quiet_env()
    setup_logging()
    work = (args.workdir or default_workdir()) / "collectives"
    work.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.tiny else 5)
    worlds = args.worlds or ([2] if args.tiny else [2, 4])
    overrides = {"model": "amorlip-tiny", "batch_size": 16} if args.tiny else {}

    def config_for(world_size: int) -> dict:
        return bench_config(work, work / "data", "unused", CONTENDERS,
                            {**overrides, "nproc": world_size, "workers": 0, "epochs": 4, "max_steps": None,
                             "samples_per_epoch": None, "log_every": 10**6, "checkpoint_every": 10**6})

    measured, rows, checks = {}, [], []
    for world_size in worlds:
        result = (json.loads((work / f"collectives-w{world_size}.json").read_text()) if args.reuse
                  else measure(world_size, config_for, rounds, work))
        measured[str(world_size)] = result
        base = result["clip"]["step_s"]["median"]
        for name, r in result.items():
            per_kind = {k: v["bytes"] for k, v in r["per_step"].items()}
            formula = step_bytes(name, global_batch=r["global_batch"], feature_dim=r["feature_dim"],
                                 world_size=world_size, t_online=r["t_online"], t_lambda=r["t_lambda"],
                                 lambda_params=r["lambda_params"], group_sizes=r["group_sizes"],
                                 zero_stage=r["zero_stage"])
            agrees = formula == per_kind
            checks.append({"world_size": world_size, "contender": name, "agrees": agrees, "counted": per_kind,
                           "formula": formula})
            features = sum(v for k, v in per_kind.items() if k in ("all_gather", "reduce_scatter"))
            r.update(payload=sum(per_kind.values()), feature_payload=features,
                     wire=wire_bytes(per_kind, world_size), formula_agrees=agrees)
            s = r["step_s"]
            rows.append([world_size, name, f"{features / 1e3:.1f}", f"{per_kind.get('all_reduce', 0) / 1e3:.1f}",
                         f"{(r['payload'] - features - per_kind.get('all_reduce', 0)) / 1e6:.2f}",
                         f"{r['payload'] / 1e6:.3f}", f"{r['wire'] / 1e6:.3f}", f"{s['median'] * 1e3:.0f}",
                         f"{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}", f"{s['median'] / base:.3f}",
                         "yes" if agrees else "NO"])
    model = next(iter(measured.values()))["clip"]["model"]
    batch = next(iter(measured.values()))["clip"]["global_batch"]
    print_table(f"collectives per step and rank (counted + DeepSpeed computed), {model}, global batch {batch}, fp32, "
                f"ZeRO-1, gloo on this machine ({rounds} alternating blocks of {BLOCK} steps)",
                ["W", "contender", "features kB", "all-reduce kB", "DeepSpeed MB", "payload MB", "ring wire MB",
                 "median ms", "min-max ms", "time / CLIP", "formula = counted"], rows)

    proj = projection()
    prows = []
    for p in proj:
        clip = next(q for q in proj if q["config"] == p["config"] and q["contender"] == "clip")
        prows.append([Path(p["config"]).stem, p["contender"], p["global_batch"], p["feature_dim"],
                      f"{p['feature_payload'] / 1e6:.2f}", f"{p['per_kind'].get('all_reduce', 0) / 1e6:.3f}",
                      f"{(p['payload'] - p['feature_payload'] - p['per_kind'].get('all_reduce', 0)) / 1e6:.0f}",
                      f"{p['wire'] / 1e6:.0f}", f"{p['feature_wire'] / 1e6:.2f}",
                      f"{p['feature_wire'] / p['wire']:.1%}", f"{p['wire'] / clip['wire']:.4f}"])
    print_table(f"projection: per rank and step on {PROJECTED_WORLD} GPUs (8 x 8), the paper configs' settings, "
                "fp32 features, ring algorithms",
                ["config", "contender", "G", "d", "features MB", "lambda+flags MB", "DeepSpeed MB", "wire MB",
                 "feature wire MB", "features/wire", "wire / CLIP"], prows)
    bad = [c for c in checks if not c["agrees"]]
    if bad:
        print("formula and counted bytes DIFFER for: " + ", ".join(f"W={c['world_size']} {c['contender']}" for c in bad))
    payload = {"tiny": args.tiny, "model": model, "global_batch": batch, "block_steps": BLOCK, "rounds": rounds,
               "t_online": T_ONLINE, "worlds": measured, "formula_checks": checks, "projection": proj,
               "projected_world": PROJECTED_WORLD}
    write_result("collectives" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    if bad:
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
