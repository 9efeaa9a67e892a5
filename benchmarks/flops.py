"""Compute-limit context: FLOPs of a step and the machine's measured matmul rate.

A step time alone does not say whether a step is slow because the model is big or because the
code is slow. ``step FLOPs / step time`` is the achieved rate; dividing by what a plain large matmul
reaches on the same machine (same dtype, same thread count) says how far from the compute limit the
step runs. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions
and attention: forward and backward, lambda-net updates included when they run inside the counted
region); elementwise work and the optimizer are not counted, so the fraction is a lower bound.

    python -m benchmarks.flops            # the matmul rate of this machine
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import print_table, setup_logging, spread, write_result

log = logging.getLogger(__name__)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` dispatches (forward and backward both count when backward runs inside)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int = 2048, repeats: int = 5, min_seconds: float = 0.5, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> dict:
    """GFLOP/s of ``n x n @ n x n`` (2 n^3 FLOPs each): best and median of ``repeats`` timed bursts.

    The best burst is the machine's practical peak under the current load; the median shows how much
    that load moves it.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    flops = 2.0 * n**3
    a @ b  # warm-up: thread pool, caches
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    per_burst = max(1, int(min_seconds / one))
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_burst):
            a @ b
        _sync(device)
        rates.append(flops * per_burst / (time.perf_counter() - t0) / 1e9)
    stats = spread(rates)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(), "gflops_best": max(rates), "gflops_median": stats["median"],
            "bursts": rates}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small matmul, for the smoke test")
    parser.add_argument("--out-dir", default=None, help="where matmul.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    setup_logging()
    rate = matmul_rate(n=256 if args.tiny else 2048, repeats=2 if args.tiny else 5,
                       min_seconds=0.05 if args.tiny else 0.5)
    print_table("fp32 matmul rate (this machine)", ["n", "threads", "GFLOP/s best", "GFLOP/s median"],
                [[rate["n"], rate["threads"], rate["gflops_best"], rate["gflops_median"]]])
    write_result("matmul", {"tiny": args.tiny, "matmul": rate}, args.out_dir)
    return rate


if __name__ == "__main__":
    main()
