"""Data throughput: img2dataset from the loopback server, and the training loader vs a step (benchmarks/RESULTS.md, section 3).

1. **Download.** A generated folder of JPEG images (the demo's 64 px size) and a ``urls.parquet`` of
   their relative paths go through :func:`amorlip.data.download.download`, i.e. the loopback HTTP
   server and the real img2dataset with the demo's dataset settings (processes, threads, shard size),
   exactly as ``make demo`` downloads its corpus. Reported: images/s over the whole call (img2dataset
   start-up included) and over img2dataset's own shard timings.
2. **Loader.** :class:`amorlip.data.loader.TrainLoader` on the benchmark shards with the demo's
   worker count, transform and tokenizer, at batch 64: images/s after the first batch (worker start-up
   excluded). Compared with what a CLIP training step consumes (batch / median step time, from
   ``step_time.json``); goal: loader >= 5x the step's appetite, so the data never starves training.
   On a 2-core machine the loader's worker and the step share the cores; the ratio is the headroom
   when the loader runs alone.

    python -m benchmarks.data_throughput [--tiny] [--images N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import (
    RESULTS_DIR,
    alternate,
    bench_config,
    bench_shards,
    default_workdir,
    demo_defaults,
    goal,
    median,
    print_table,
    quiet_env,
    setup_logging,
    spread,
    write_result,
)

log = logging.getLogger(__name__)

GOAL_RATIO = 5.0


def make_image_folder(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` JPEGs under ``root/images`` and ``root/urls.parquet`` (url = relative path, caption)."""
    import pandas as pd

    urls = root / "urls.parquet"
    if urls.exists() and len(pd.read_parquet(urls)) == n:
        return urls
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.integers(0, 256, size=3)
        pixels = np.clip(colour + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
        rel = f"images/{i:06d}.jpg"
        Image.fromarray(pixels).save(root / rel, format="JPEG", quality=90)
        rows.append({"url": rel, "caption": f"a synthetic image number {i}"})
    pd.DataFrame(rows).to_parquet(urls, index=False)
    return urls


class DownloadBench:
    """One fresh img2dataset download per call; returns images/s over the whole call."""

    def __init__(self, work: Path, n_images: int, dataset_options: dict):
        from amorlip.config import load_config

        self.work = work
        self.urls = make_image_folder(work / "download-src", n_images)
        self.config = load_config({"paths": {k: str(work / k) for k in ("data", "runs", "results", "resources")},
                                   "defaults": {"dataset": "dl"},
                                   "datasets": {"dl": {"source": "url_list", "url_list": str(self.urls),
                                                       **dataset_options}}}, check_paths=False)
        self.summaries: list[dict] = []

    def __call__(self) -> list[float]:
        from amorlip.data.download import download

        out = self.work / "download-out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        summary = download(self.config, "dl", self.urls, out)
        elapsed = time.monotonic() - t0
        summary["whole_call_images_per_s"] = summary["successes"] / elapsed
        self.summaries.append(summary)
        return [summary["whole_call_images_per_s"]]


class LoaderBench:
    """One epoch-slice of the training loader per call; returns images/s after its first batch."""

    def __init__(self, config: dict, run_name: str, batches: int):
        from amorlip.config import get_run
        from amorlip.data.loader import TrainLoader
        from amorlip.models import create_model, get_tokenizer

        run = get_run(config, run_name)
        _, preprocess_train, _ = create_model(run.model)
        shard_dir = Path(config["paths"]["data"]) / run.dataset / "shards"
        self.loader = TrainLoader(shard_dir, None, local_batch_size=run.batch_size, rank=0, world_size=1,
                                  workers=run.workers, seed=run.seed, preprocess=preprocess_train,
                                  tokenizer=get_tokenizer(run.model), samples_per_epoch=run.samples_per_epoch)
        self.batch = run.batch_size
        self.batches = min(batches, len(self.loader) - 1)
        self.epoch = 0

    def __call__(self) -> list[float]:
        it = self.loader.epoch(self.epoch)
        self.epoch += 1
        next(it)  # worker start-up and the first decode
        t0 = time.monotonic()
        n = 0
        for _ in range(self.batches):
            next(it)
            n += 1
        elapsed = time.monotonic() - t0
        it.close()
        return [n * self.batch / elapsed]


def step_appetite(tiny: bool, out_dir: str | None) -> tuple[float | None, str]:
    """Images/s a CLIP step consumes (batch / median step time), from the step-time benchmark's JSON."""
    path = Path(out_dir or RESULTS_DIR) / ("step_time_tiny.json" if tiny else "step_time.json")
    try:
        data = json.loads(path.read_text())
        return float(data["contenders"]["clip"]["images_per_s"]), str(path)
    except (OSError, KeyError, ValueError):
        return None, str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="30 images, tiny model, 1 round (smoke test)")
    parser.add_argument("--images", type=int, default=None, help="images to download (default 3000; tiny 30)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; tiny 1)")
    parser.add_argument("--step-images-per-s", type=float, default=None,
                        help="what a CLIP step consumes (default: from step_time.json)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out-dir", default=None, help="where data_throughput.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    quiet_env()
    setup_logging()
    work = (args.workdir or default_workdir()) / "data_throughput"
    rounds = args.rounds or (1 if args.tiny else 3)
    n_images = args.images or (30 if args.tiny else 3000)

    demo = demo_defaults()
    import yaml

    from benchmarks.common import DEMO_CONFIG

    demo_ds = yaml.safe_load(DEMO_CONFIG.read_text())["datasets"]["emoji-demo"]
    ds_options = {k: v for k, v in demo_ds.items() if k not in ("source", "emoji")}
    if args.tiny:
        ds_options |= {"samples_per_shard": 30, "threads": 4}
        data_root, dataset = bench_shards(work.parent, n_shards=2, per_shard=32, image_size=32, prefer_demo=False)
        run = {"model": "amorlip-tiny", "batch_size": 16, "workers": 1}
        loader_batches = 2
    else:
        data_root, dataset = bench_shards(work.parent)
        run = {"model": demo.get("model", "amorlip-demo"), "batch_size": 64, "workers": demo.get("workers", 1)}
        loader_batches = 24
    config = bench_config(work, data_root, dataset, {"loader": {}}, {**run, "samples_per_epoch": None})

    download = DownloadBench(work, n_images, ds_options)
    loader = LoaderBench(config, "loader", loader_batches)
    rates = alternate({"download": download, "loader": loader}, rounds)

    appetite, source = (args.step_images_per_s, "--step-images-per-s") if args.step_images_per_s else step_appetite(args.tiny, args.out_dir)
    loader_rate = median(rates["loader"])
    ratio = loader_rate / appetite if appetite else None
    dl = spread(rates["download"])
    shard_rates = [s["images_per_s"] for s in download.summaries]
    rows = [
        ["img2dataset download (loopback), whole call", dl["median"], dl["min"], dl["max"], f"{n_images} images"],
        ["img2dataset download, img2dataset's shard timing", median(shard_rates), min(shard_rates),
         max(shard_rates), f"{ds_options.get('processes', 1)} proc x {ds_options.get('threads', 32)} threads"],
        ["TrainLoader (transform + tokenize)", loader_rate, min(rates["loader"]), max(rates["loader"]),
         f"{run['workers']} worker(s), batch {run['batch_size']}"],
        ["CLIP step consumes", appetite if appetite else "n/a", "", "", source],
    ]
    print_table(f"data throughput (images/s; {rounds} alternating round(s); data: {dataset})",
                ["what", "median", "min", "max", "setting"], rows)
    met = ratio is not None and ratio >= GOAL_RATIO
    print(f"goal: loader images/s >= {GOAL_RATIO}x a CLIP step's consumption: "
          f"{'n/a (no step_time result)' if ratio is None else f'{ratio:.2f}x'} -> {goal(met)}")
    payload = {
        "tiny": args.tiny, "rounds": rounds, "dataset": dataset,
        "download": {"images": n_images, "dataset_options": ds_options, "images_per_s_whole_call": rates["download"],
                     "images_per_s_shard_timing": shard_rates, "summaries": download.summaries},
        "loader": {"images_per_s": rates["loader"], "batches_timed": loader.batches, **run},
        "step_consumes_images_per_s": appetite, "step_source": source, "ratio": ratio,
        "goal": {"what": f"loader / CLIP step images/s >= {GOAL_RATIO}", "value": ratio, "met": met},
    }
    write_result("data_throughput" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
