"""Our trainer vs open_clip's own (``open_clip_train.main``): images/s on the same work (benchmarks/RESULTS.md, section 2).

Both programs train the same model config (``amorlip-demo``, registered for open_clip by
``benchmarks.open_clip_launcher``) with the CLIP loss, on the same webdataset shards, at the same
batch size, precision (fp32), optimizer settings (AdamW, lr, betas, eps, weight decay, warm-up,
grad-clip 1.0), loader worker count and thread count, as one CPU process each; goal: ours >= 1.0x.

Method (the same definition for both, read from each program's own logs):

- Each program runs ``--steps`` steps as one epoch and logs every 10 steps: ours writes
  ``metrics.jsonl`` (a wall-clock ``time`` per logged step); open_clip logs ``Batch (t)``, the mean
  end-to-end step time (data wait included) of the window since its previous log line.
- Throughput = images in the steps after the first ~11 / the time they took. Startup (imports,
  DeepSpeed, MLflow, model build, loader workers) and the warm-up steps are excluded from both;
  each program's whole wall time is reported beside it for context.
- Runs alternate (ours, open_clip, ours, ...); the result is each side's median over its runs.
- Each side runs its data pipeline as designed: ours the resampled, resumable
  :class:`amorlip.data.loader.TrainLoader`; open_clip its webdataset pipeline with
  ``--dataset-resampled``. Differences that stay: our step adds DeepSpeed ZeRO-1 and the stop-flag
  checks, our AdamW is fused (open_clip's is the foreach one), our loop logs to MLflow.

    python -m benchmarks.vs_open_clip [--tiny] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import (
    REPO,
    bench_raw_config,
    bench_shards,
    child_env,
    default_workdir,
    goal,
    median,
    print_table,
    quiet_env,
    setup_logging,
    shard_paths,
    write_result,
)

log = logging.getLogger(__name__)

LOG_EVERY = 10
GOAL_RATIO = 1.0
_OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*(\d+) .*?Batch \(t\): ([0-9.]+)")


def ours_images_per_s(metrics_path: Path, batch: int, skip_steps: int) -> tuple[float, int]:
    """(images/s, steps counted) between the first logged step >= ``skip_steps`` and the last one."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] >= skip_steps and "kind" not in r]  # step records (not validation)
    if len(rows) < 2:
        raise RuntimeError(f"{metrics_path}: fewer than two logged steps after step {skip_steps}")
    steps = rows[-1]["step"] - rows[0]["step"]
    return batch * steps / (rows[-1]["time"] - rows[0]["time"]), steps


def open_clip_images_per_s(log_text: str, batch: int, skip_steps: int) -> tuple[float, int]:
    """(images/s, steps counted) from open_clip's ``Train Epoch`` lines: windows after ``skip_steps``."""
    done_prev, steps, seconds = None, 0, 0.0
    for m in _OC_LINE.finditer(log_text):
        done = int(m.group(1)) // batch
        if done_prev is not None and done_prev >= skip_steps:
            window = done - done_prev
            steps += window
            seconds += window * float(m.group(3))
        done_prev = done
    if steps == 0:
        raise RuntimeError("open_clip logged no step windows after the warm-up; is --steps large enough?")
    return batch * steps / seconds, steps


class Contenders:
    """Launches one run of either program; each call returns its measured images/s."""

    def __init__(self, work: Path, data_root: Path, dataset: str, model: str, batch: int, steps: int,
                 workers: int, run_timeout: int):
        self.work, self.batch, self.steps, self.workers = work, batch, steps, workers
        self.model, self.timeout = model, run_timeout
        self.shards = shard_paths(data_root, dataset)
        # first counted log point: ours logs at steps 10, 20, ...; open_clip at steps 1, 11, 21, ...
        self.skip = {"ours": LOG_EVERY, "open_clip": LOG_EVERY + 1}
        self.run_cfg = {
            "method": "clip", "model": model, "batch_size": batch, "precision": "fp32", "workers": workers,
            "max_steps": steps, "epochs": 1, "samples_per_epoch": steps * batch, "log_every": LOG_EVERY,
            "checkpoint_every": 10 * steps, "grad_clip": 1.0,
        }
        raw = bench_raw_config(work, data_root, dataset, {"ours": {}}, self.run_cfg)
        self.resolved = raw["defaults"]
        self.config_path = work / "vs_open_clip.yaml"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.walls: dict[str, list[float]] = {"ours": [], "open_clip": []}
        self.counted: dict[str, list[int]] = {"ours": [], "open_clip": []}
        self.n = 0

    def _run(self, cmd: list[str], log_path: Path) -> float:
        t0 = time.monotonic()
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=self.timeout)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[2]} exited {proc.returncode}; see {log_path}")
        return wall

    def ours(self) -> list[float]:
        run_dir = self.work / "runs" / "ours"
        shutil.rmtree(run_dir, ignore_errors=True)
        log_path = self.work / f"ours-{self.n}.log"
        wall = self._run([sys.executable, "-m", "amorlip.cli", "train", "--config", str(self.config_path),
                          "--run", "ours"], log_path)
        rate, counted = ours_images_per_s(run_dir / "metrics.jsonl", self.batch, self.skip["ours"])
        self.walls["ours"].append(wall)
        self.counted["ours"].append(counted)
        self.n += 1
        return [rate]

    def open_clip(self) -> list[float]:
        r = self.resolved
        name = f"oc-{self.n}"
        logs = self.work / "open_clip_logs"
        shutil.rmtree(logs / name, ignore_errors=True)
        cmd = [sys.executable, "-m", "benchmarks.open_clip_launcher",
               "--train-data", "::".join(str(p) for p in self.shards), "--dataset-type", "webdataset",
               "--dataset-resampled", "--train-num-samples", str(self.steps * self.batch),
               "--batch-size", str(self.batch), "--epochs", "1", "--workers", str(self.workers),
               "--model", self.model, "--precision", "fp32", "--device", "cpu",
               "--lr", str(r.get("lr", 1e-3)), "--beta1", str(r.get("adam_betas", [0.9, 0.98])[0]),
               "--beta2", str(r.get("adam_betas", [0.9, 0.98])[1]), "--eps", str(r.get("adam_eps", 1e-6)),
               "--wd", str(r.get("weight_decay", 0.1)), "--warmup", str(r.get("warmup_steps", 100)),
               "--grad-clip-norm", "1.0", "--seed", str(r.get("seed", 0)),
               "--log-every-n-steps", str(LOG_EVERY), "--save-frequency", "0", "--zeroshot-frequency", "0",
               "--val-frequency", "0", "--report-to", "", "--logs", str(logs), "--name", name]
        wall = self._run(cmd, self.work / f"{name}.log")
        rate, counted = open_clip_images_per_s((logs / name / "out.log").read_text(), self.batch, self.skip["open_clip"])
        self.walls["open_clip"].append(wall)
        self.counted["open_clip"].append(counted)
        self.n += 1
        return [rate]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch 16, 22 steps, 1 round (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 70; tiny 22)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each program (default 2; tiny 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out-dir", default=None, help="where vs_open_clip.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    quiet_env()
    setup_logging()
    work = (args.workdir or default_workdir()) / "vs_open_clip"
    from benchmarks.common import demo_defaults

    if args.tiny:
        data_root, dataset = bench_shards(work.parent, n_shards=2, per_shard=32, image_size=32, prefer_demo=False)
        model, batch, workers = "amorlip-tiny", 16, 1
    else:
        data_root, dataset = bench_shards(work.parent)
        model, batch, workers = demo_defaults().get("model", "amorlip-demo"), 64, demo_defaults().get("workers", 1)
    steps = args.steps or (22 if args.tiny else 70)
    rounds = args.rounds or (1 if args.tiny else 2)
    con = Contenders(work, data_root, dataset, model, batch, steps, workers, run_timeout=1200)
    from benchmarks.common import alternate

    rates = alternate({"ours": con.ours, "open_clip": con.open_clip}, rounds)
    ours, theirs = median(rates["ours"]), median(rates["open_clip"])
    ratio = ours / theirs
    rows = [[name, median(rates[name]), min(rates[name]), max(rates[name]), median(con.walls[name]),
             median(con.counted[name])] for name in ("ours", "open_clip")]
    print_table(f"ours vs open_clip_train: {model}, batch {batch}, fp32, CLIP loss, 1 CPU process, {workers} "
                f"loader worker(s), {steps} steps per run, {rounds} run(s) each, alternating",
                ["trainer", "median img/s", "min", "max", "median wall s", "steps counted"], rows)
    met = ratio >= GOAL_RATIO
    print(f"goal: ours / open_clip images/s >= {GOAL_RATIO}: {ratio:.3f} -> {goal(met)}")
    payload = {
        "tiny": args.tiny, "model": model, "batch_size": batch, "precision": "fp32", "workers": workers,
        "steps_per_run": steps, "rounds": rounds, "dataset": dataset, "log_every": LOG_EVERY,
        "steps_excluded": con.skip,
        "images_per_s": rates, "median_images_per_s": {"ours": ours, "open_clip": theirs},
        "wall_s": con.walls, "ratio": ratio,
        "method": "steady-state images/s from each program's own step logs after the first "
                  f"{con.skip} steps; alternating runs; medians",
        "goal": {"what": f"ours/open_clip images/s >= {GOAL_RATIO}", "value": ratio, "met": met},
    }
    write_result("vs_open_clip" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
