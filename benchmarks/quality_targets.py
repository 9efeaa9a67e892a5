"""The quality sweep's Snakemake targets, one seed at a time (``make bench-quality``).

Snakemake would schedule the sweep's runs in any order; an interrupted sweep would then hold a few
runs of every seed and few complete same-seed pairs. ``make bench-quality`` instead asks for one seed's
evaluations at a time (every method and batch of seed 0, then seed 1, ...), so whatever has finished
is a set of complete seeds that :mod:`benchmarks.quality_summary` can pair.

    python -m benchmarks.quality_targets --config config/bench-quality.yaml --seeds      # 0 1 2 3
    python -m benchmarks.quality_targets --config config/bench-quality.yaml --seed 0     # result files
"""

from __future__ import annotations

import argparse
from pathlib import Path


def targets_by_seed(config: dict) -> dict[int, list[str]]:
    """``{seed: [results/{run}/{suite}.json, ...]}`` for every run of the config, seeds ascending."""
    from amorlip.config import expand_runs

    out: dict[int, list[str]] = {}
    results = Path(config["paths"]["results"])
    for name, run in sorted(expand_runs(config).items()):
        for suite in config["evaluation"]["suites"]:
            out.setdefault(run.seed, []).append(str(results / name / f"{suite}.json"))
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seeds", action="store_true", help="print the sweep's seeds")
    which.add_argument("--seed", type=int, help="print the result files of this seed's runs")
    args = parser.parse_args(argv)
    from amorlip.config import load_config

    by_seed = targets_by_seed(load_config(args.config, check_paths=False))
    if args.seeds:
        print(" ".join(str(s) for s in by_seed))
        return
    if args.seed not in by_seed:
        raise SystemExit(f"{args.config}: no run has seed {args.seed} (seeds: {', '.join(map(str, by_seed))})")
    print(" ".join(by_seed[args.seed]))


if __name__ == "__main__":
    main()
