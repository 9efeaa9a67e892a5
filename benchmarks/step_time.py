"""AmorLIP vs CLIP step time in our trainer (benchmarks/RESULTS.md, section 1; paper Table 2).

Setting: the demo's model (``amorlip-demo``) and run defaults (config/config.yaml), batch 64, one
process, CPU, fp32, DeepSpeed ZeRO-1 on a 1-rank gloo group. Each contender is a real
:class:`amorlip.train.loop.Trainer` built by the trainer's own ``_build`` (model, loader, engine,
task), and a step is ``Trainer._step``: lr schedule, the task's forward (targets, lambda-net
updates, EMA, encoder loss), stop-flag checks, ``engine.backward``, ``engine.step``, logit-scale
clamps. Contenders: CLIP, AmorLIP with T_online = 1 and with T_online = 8 (the paper reports +4.47 %
and +2.16 % over CLIP on one H100; goal here: <= +3 % at T_online = 8).

How it is timed, and why:

- The batches come from the real shards through the trainer's loader, but are decoded once before
  timing and then reused: the loader is measured on its own in ``data_throughput``, and here it
  would only add noise to a difference of a few percent.
- A sample is the mean step time over a *block* of 8 consecutive steps. AmorLIP's work is periodic
  (lambda updates every T_online steps, EMA every T_target = 2), so a median over single steps
  would simply skip the update steps at T_online = 8; a block of 8 holds exactly one of each period.
- The AmorLIP tasks start in epoch 1, so the steady-state step (mixing with the previous epoch's
  lambda net, beta > 0) is what gets timed, not epoch 0's cheaper one.
- Contenders alternate block by block (CLIP, T1, T8, CLIP, ...), after one warm-up block each;
  the result is the median block and the ratio of medians.
- FLOPs per step are counted over one extra block (FlopCounterMode), and set against the measured
  fp32 matmul rate to show how far from the compute limit a step runs.

    python -m benchmarks.step_time [--tiny] [--rounds N]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from benchmarks.common import (
    alternate,
    bench_config,
    bench_shards,
    default_workdir,
    goal,
    print_table,
    quiet_env,
    setup_logging,
    spread,
    write_result,
)
from benchmarks.flops import count_flops, matmul_rate

log = logging.getLogger(__name__)

BLOCK = 8  # lcm of T_online = 8 and T_target = 2: every block holds the same work
GOAL_RATIO_T8 = 1.03
PAPER_OVERHEAD = {1: 0.0447, 8: 0.0216}  # Table 2, medium scale, one H100

CONTENDERS = {
    "clip": {"method": "clip"},
    "amorlip-t1": {"method": "amorlip", "amorlip": {"t_online": 1}},
    "amorlip-t8": {"method": "amorlip", "amorlip": {"t_online": 8}},
}


def build_trainer(config: dict, run_name: str, work: Path):
    """A Trainer exactly as ``amorlip train`` builds it (minus tracking), ready for ``_step``."""
    from amorlip import distributed as dist_utils
    from amorlip.config import get_run
    from amorlip.train.loop import StopSignal, Trainer
    from amorlip.train.run import _build

    run = get_run(config, run_name)
    world = dist_utils.make_world(run.batch_size, run.world_size, what=f"run {run_name!r}")
    engine, task, loader = _build(config, run, world)
    trainer = Trainer(run=run, engine=engine, task=task, loader=loader, run_dir=work / "runs" / run_name,
                      world=world, tracker=None, stop=StopSignal())
    # steady state: epoch 1 (beta > 0, previous-epoch net in use), as every epoch after the first
    trainer.pos.epoch = 1
    task.start_epoch(1, trainer.steps_per_epoch)
    return trainer


def preload(loader, n: int) -> list[dict]:
    """``n`` decoded batches of epoch 0 (cycled when the epoch is shorter)."""
    batches: list[dict] = []
    while len(batches) < n:
        for batch in loader.epoch(0):
            batches.append(batch)
            if len(batches) >= n:
                break
    return batches


class BlockTimer:
    """Runs blocks of ``BLOCK`` trainer steps on the preloaded batches; returns mean seconds per step."""

    def __init__(self, trainer, batches: list[dict]):
        self.trainer = trainer
        self.batches = batches
        self.i = 0

    def _next(self) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def run_block(self) -> float:
        # keep the period aligned: each block starts at step_in_epoch = 0 mod BLOCK
        self.trainer.pos.step_in_epoch -= self.trainer.pos.step_in_epoch % BLOCK
        t0 = time.perf_counter()
        for _ in range(BLOCK):
            self.trainer._step(self._next())
        return (time.perf_counter() - t0) / BLOCK

    def __call__(self) -> list[float]:
        return [self.run_block()]

    def flops_per_step(self) -> float:
        return count_flops(self.run_block) / BLOCK


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch 16, 1 round (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per contender (default 15; tiny 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out-dir", default=None, help="where step_time.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    quiet_env()
    setup_logging()
    work = args.workdir or default_workdir()
    rounds = args.rounds or (1 if args.tiny else 15)
    if args.tiny:
        data_root, dataset = bench_shards(work, n_shards=2, per_shard=32, image_size=32, prefer_demo=False)
        overrides = {"model": "amorlip-tiny", "batch_size": 16}
    else:
        data_root, dataset = bench_shards(work)
        overrides = {}
    overrides |= {"workers": 0, "epochs": 4, "max_steps": None, "samples_per_epoch": None}
    config = bench_config(work, data_root, dataset, CONTENDERS, overrides)

    trainers = {name: build_trainer(config, name, work) for name in CONTENDERS}
    batches = preload(next(iter(trainers.values())).loader, 2 * BLOCK)
    timers = {name: BlockTimer(tr, batches) for name, tr in trainers.items()}
    for timer in timers.values():  # warm-up: allocator, thread pools, DeepSpeed's first step
        timer.run_block()
    samples = alternate(timers, rounds)
    flops = {name: timer.flops_per_step() for name, timer in timers.items()}
    peak = matmul_rate(n=256 if args.tiny else 2048, repeats=2 if args.tiny else 5,
                       min_seconds=0.05 if args.tiny else 0.5)

    run0 = next(iter(trainers.values())).run
    base = spread(samples["clip"])["median"]
    base_min = spread(samples["clip"])["min"]
    results, rows = {}, []
    for name, values in samples.items():
        stats = spread(values)
        achieved = flops[name] / stats["median"] / 1e9
        ratio = stats["median"] / base
        t_online = trainers[name].run.amorlip.t_online if name != "clip" else None
        # the ratio of the fastest blocks too: under positive, additive noise from other jobs the
        # minimum is the steadier estimator; the goal is judged on medians all the same
        results[name] = {"step_s": stats, "ratio_vs_clip": ratio, "ratio_of_min_vs_clip": stats["min"] / base_min,
                         "t_online": t_online,
                         "flops_per_step": flops[name], "achieved_gflops": achieved,
                         "fraction_of_matmul_peak": achieved / peak["gflops_best"],
                         "images_per_s": run0.batch_size / stats["median"],
                         "paper_overhead": PAPER_OVERHEAD.get(t_online) if t_online else None}
        rows.append([name, stats["median"] * 1e3, stats["min"] * 1e3, stats["max"] * 1e3, f"{ratio:.4f}",
                     f"{stats['min'] / base_min:.4f}",
                     f"{PAPER_OVERHEAD[t_online]:+.2%}" if t_online in PAPER_OVERHEAD else "-",
                     flops[name] / 1e9, achieved, f"{achieved / peak['gflops_best']:.1%}"])
    print_table(f"step time: {run0.model}, batch {run0.batch_size}, fp32, 1 process, ZeRO-{run0.zero_stage} "
                f"({rounds} blocks of {BLOCK} steps each, alternating; data: {dataset})",
                ["contender", "median ms", "min ms", "max ms", "ratio", "ratio(min)", "paper", "GFLOP/step",
                 "GFLOP/s", "of peak"], rows)
    ratio_t8 = results["amorlip-t8"]["ratio_vs_clip"]
    met = ratio_t8 <= GOAL_RATIO_T8
    print(f"goal: AmorLIP/CLIP step-time ratio at T_online=8 <= {GOAL_RATIO_T8}: {ratio_t8:.4f} -> {goal(met)}"
          f"  (T_online=1: {results['amorlip-t1']['ratio_vs_clip']:.4f}; matmul peak "
          f"{peak['gflops_best']:.1f} GFLOP/s)")
    payload = {
        "tiny": args.tiny, "model": run0.model, "batch_size": run0.batch_size, "dataset": dataset,
        "precision": "fp32", "zero_stage": run0.zero_stage, "block_steps": BLOCK, "rounds": rounds,
        "amorlip_t8": trainers["amorlip-t8"].run.to_dict()["amorlip"],
        "contenders": results, "matmul": peak,
        "goal": {"what": f"ratio at T_online=8 <= {GOAL_RATIO_T8}", "value": ratio_t8, "met": met},
    }
    write_result("step_time" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
