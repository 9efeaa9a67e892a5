"""Shared plumbing for the benchmarks: machine facts, alternating timing, tables, result files, shards.

Why alternate: on a shared 2-core machine the background load drifts over minutes. Running the
contenders in interleaved rounds (A B A B ...) and taking medians makes that drift hit every side
alike, so the *ratio* stays meaningful even when the absolute numbers wobble.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEMO_SHARDS = REPO / "data" / "emoji-demo" / "shards"
DEMO_CONFIG = REPO / "config" / "config.yaml"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "matplotlib", "PIL", "alembic", "git", "DeepSpeed", "torch.distributed",
                  "amorlip.train.checkpoint"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # open_clip logs its model-building chatter at INFO on the root logger itself
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)


def quiet_env() -> None:
    """The offline switches the Makefile exports, for benchmarks started by hand."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("NO_ALBUMENTATIONS_UPDATE", "1"), ("WANDB_MODE", "disabled"),
                       ("DS_BUILD_OPS", "0"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a figure: CPU, usable cores, torch threads, versions, load."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(), "load_avg_1_5_15": load,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_result(name: str, payload: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """``<out_dir>/<name>.json`` (default benchmarks/results) with the date, command and machine added."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": now_utc(),
              "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
              "machine": machine_info(), **payload}
    path = out / f"{name}.json"
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return path


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (no dependency), numbers right-aligned."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [f"== {title} ==", line, "-" * len(line)]
    for row, raw in zip(cells, rows):
        out.append("  ".join(c.rjust(w) if isinstance(v, (int, float)) else c.ljust(w)
                             for c, w, v in zip(row, widths, raw)))
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n" + format_table(title, headers, rows), flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count: enough to see whether a median is trustworthy."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def alternate(contenders: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Call each contender once per round, in A B C A B C ... order; collect what each returns."""
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            values = fn()
            out[name].extend(values)
            log.info("round %d/%d %s: %d sample(s), median %.5g", r + 1, rounds, name, len(values),
                     median(values))
    return out


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def default_workdir() -> Path:
    """Scratch space for shards, runs and logs (outside the repo, reused between benchmark runs)."""
    return Path(os.environ.get("AMORLIP_BENCH_DIR", Path(tempfile.gettempdir()) / "amorlip-bench"))


def bench_shards(workdir: Path, n_shards: int = 8, per_shard: int = 256, image_size: int = 64,
                 prefer_demo: bool = True) -> tuple[Path, str]:
    """(data root, dataset name) of webdataset shards to train on.

    The demo corpus (``data/emoji-demo``, real emoji art downloaded by img2dataset) when ``make demo``
    has built it (and ``prefer_demo``); otherwise synthetic img2dataset-layout shards from
    ``tests/helpers_shards.py`` at the demo's image size, so the benchmarks run on a fresh checkout too.
    """
    if prefer_demo and (DEMO_SHARDS.parent / "sizes.json").exists() and any(DEMO_SHARDS.glob("*.tar")):
        return DEMO_SHARDS.parents[1], "emoji-demo"
    name = f"synthetic-{n_shards}x{per_shard}-{image_size}px"
    shards = workdir / "data" / name / "shards"
    if not (shards.parent / "sizes.json").exists():
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from tests.helpers_shards import make_shards

        log.info("writing %d synthetic shards of %d samples (%d px) to %s", n_shards, per_shard, image_size, shards)
        make_shards(shards, n_shards, per_shard, image_size=image_size, seed=0)
        (shards.parent / "sizes.json").write_text((shards / "sizes.json").read_text())
    return workdir / "data", name


def shard_paths(data_root: Path, dataset: str) -> list[Path]:
    return sorted((data_root / dataset / "shards").glob("*.tar"))


def demo_defaults() -> dict[str, Any]:
    """The run defaults of the demo config (config/config.yaml): the setting the benchmarks measure."""
    import yaml

    with open(DEMO_CONFIG) as fh:
        return dict(yaml.safe_load(fh).get("defaults") or {})


def bench_raw_config(workdir: Path, data_root: Path, dataset: str, runs: dict[str, dict],
                     overrides: dict[str, Any] | None = None) -> dict:
    """A pipeline config (as a user would write it) whose runs train on ``dataset`` with the demo's defaults."""
    defaults = {**demo_defaults(), "dataset": dataset, **(overrides or {})}
    raw = {
        "name": "bench",
        "paths": {"data": str(data_root), "runs": str(workdir / "runs"), "results": str(workdir / "results"),
                  "resources": str(workdir / "resources")},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'results' / 'mlflow.db'}", "experiment": "bench"},
        "datasets": {dataset: {"source": "emoji"}},
        "defaults": defaults,
        "runs": runs,
    }
    return raw


def bench_config(workdir: Path, data_root: Path, dataset: str, runs: dict[str, dict],
                 overrides: dict[str, Any] | None = None) -> dict:
    """:func:`bench_raw_config`, validated with every default filled."""
    from amorlip.config import load_config

    return load_config(bench_raw_config(workdir, data_root, dataset, runs, overrides), check_paths=False)


_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "MLFLOW_TRACKING_URI", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmarked subprocess: a lone process, offline, no rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", DS_BUILD_OPS="0",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env
