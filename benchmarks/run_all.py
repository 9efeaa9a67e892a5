"""``make bench``: the CPU benchmarks in sequence, then every ratio and whether its goal is met.

Runs, each as its own process (so one benchmark's process group, threads or memory never leak into
the next): ``step_time`` (AmorLIP vs CLIP step, FLOPs, matmul rate), ``vs_open_clip`` (our trainer
vs open_clip_train), ``data_throughput`` (img2dataset download, loader vs step; it reads the CLIP
step rate from step_time's JSON, so it runs after it), ``collectives`` (bytes per step and step time
on 2 and 4 gloo ranks, projected to 8 x 8 GPUs). Each writes ``benchmarks/results/<name>.json``;
this script adds ``summary.json`` and prints one table of goals. The GPU benchmark
(``benchmarks/gpu.sh``) and the quality sweep (``make bench-quality``) are separate: one needs a GPU,
the other takes hours.

    python -m benchmarks.run_all [--tiny] [--only step_time data_throughput] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    child_env,
    goal,
    median,
    print_table,
    setup_logging,
    write_result,
)

log = logging.getLogger(__name__)

BENCHMARKS = ("step_time", "vs_open_clip", "data_throughput", "collectives")


def _load(out_dir: Path, name: str, tiny: bool) -> dict | None:
    path = out_dir / f"{name}{'_tiny' if tiny else ''}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def goal_rows(out_dir: Path, tiny: bool) -> tuple[list[list], dict]:
    """One row per measured ratio: what, value, goal, met (from the benchmarks' JSON files)."""
    rows, record = [], {}
    st = _load(out_dir, "step_time", tiny)
    if st:
        c = st["contenders"]
        for name, paper in (("amorlip-t1", "+4.47%"), ("amorlip-t8", "+2.16%")):
            r = c[name]["ratio_vs_clip"]
            is_goal = name == "amorlip-t8"
            rows.append([f"step time AmorLIP(T_online={c[name]['t_online']}) / CLIP", f"{r:.4f}",
                         f"<= 1.03 (paper {paper})" if is_goal else f"(paper {paper})",
                         goal(r <= 1.03) if is_goal else "-"])
            if "ratio_of_min_vs_clip" in c[name]:
                rows.append(["  same, ratio of the fastest blocks", f"{c[name]['ratio_of_min_vs_clip']:.4f}",
                             "(steadier under load)", "-"])
            record[f"step_time_ratio_{name}"] = r
        record["step_time_goal_met"] = st["goal"]["met"]
        frac = c["clip"]["fraction_of_matmul_peak"]
        rows.append(["CLIP step achieved GFLOP/s / fp32 matmul peak", f"{frac:.1%}",
                     f"({c['clip']['achieved_gflops']:.1f} of {st['matmul']['gflops_best']:.1f} GFLOP/s)", "-"])
    vo = _load(out_dir, "vs_open_clip", tiny)
    if vo:
        rows.append(["images/s ours / open_clip_train", f"{vo['ratio']:.3f}", ">= 1.0", goal(vo["goal"]["met"])])
        record["vs_open_clip_ratio"], record["vs_open_clip_goal_met"] = vo["ratio"], vo["goal"]["met"]
    dt = _load(out_dir, "data_throughput", tiny)
    if dt:
        ratio = dt["ratio"]
        rows.append(["loader images/s / CLIP step images/s", "n/a" if ratio is None else f"{ratio:.2f}x",
                     ">= 5x", goal(dt["goal"]["met"])])
        dl = dt["download"]["images_per_s_whole_call"]
        rows.append(["img2dataset loopback download images/s (whole call)", f"{median(dl):.1f}",
                     "(reported)", "-"])
        record["loader_ratio"], record["data_goal_met"] = ratio, dt["goal"]["met"]
    co = _load(out_dir, "collectives", tiny)
    if co:
        for row in co["projection"]:
            if row["contender"] == "amorlip-local":
                glob = next(r for r in co["projection"]
                            if r["config"] == row["config"] and r["contender"] == "amorlip-global")
                rows.append([f"wire bytes/step AmorLIP local / global, {Path(row['config']).stem}, "
                             f"{co['projected_world']} GPUs", f"{row['wire'] / glob['wire']:.4f}",
                             f"(features: {row['feature_wire'] / glob['feature_wire']:.3f})", "-"])
        record["collectives_formula_agrees"] = all(c["agrees"] for c in co["formula_checks"])
    return rows, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every benchmark in its tiny mode (smoke test)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--summary-only", action="store_true", help="just print the goals from existing JSONs")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results")
    parser.add_argument("--workdir", default=None, help="scratch folder (default $TMPDIR/amorlip-bench)")
    args = parser.parse_args(argv)
    setup_logging()
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    timings, failed = {}, []
    if not args.summary_only:
        for name in args.only or BENCHMARKS:
            cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out-dir", str(out_dir)]
            cmd += ["--tiny"] if args.tiny else []
            cmd += ["--workdir", args.workdir] if args.workdir else []
            log.info("=== %s: %s", name, " ".join(cmd[1:]))
            t0 = time.monotonic()
            rc = subprocess.run(cmd, cwd=REPO, env=child_env()).returncode
            timings[name] = round(time.monotonic() - t0, 1)
            log.info("=== %s finished in %.0f s (exit %d)", name, timings[name], rc)
            if rc != 0:
                failed.append(name)
    rows, record = goal_rows(out_dir, args.tiny)
    print_table("benchmark goals" + (" (tiny mode: smoke test, not a measurement)" if args.tiny else ""),
                ["ratio", "value", "goal", "status"], rows)
    if timings:
        print("wall time per benchmark (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())
              + f"; total {sum(timings.values()):.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the output above)")
    if not args.summary_only:
        write_result("summary" + ("_tiny" if args.tiny else ""),
                     {"tiny": args.tiny, "wall_s": timings, "failed": failed, "goals": record}, out_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
