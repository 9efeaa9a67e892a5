"""Download at scale: a synthetic url list through the fan-out, accounted url by url (benchmarks/RESULTS.md).

A url list of ``--rows`` rows (default 200,000) points at the scripted loopback server
(:mod:`amorlip.data.scripted_http`) with a crawl's failure mix: images, redirects to images, 404s,
HTML pages saved as .jpg, urls that answer after the timeout, and 503s. The same list is downloaded
with N = 1, 2, 4 parts (``--parts``): split as the pipeline splits it (``amorlip split-urls``), the
N ``amorlip download`` processes run at once (on a cluster they are N SLURM jobs on N nodes; here
they share this machine's cores), merged (``amorlip merge-parts``) and indexed (``amorlip index``).

Reported per N: wall time from the split to the index, images/s over that wall time, successes and
failures by reason, and the accounting check: every url of the list is found in exactly one
shard row whose outcome equals what the server was told to do for it (mismatches are listed; a
url whose image timed out under load would show here). With ``--kill`` one more run of the largest
N stops one part with SIGTERM (what SLURM sends at a time limit) once it has finished a shard, runs
that part again (it resumes: finished shards are kept) and checks the same exact accounting.

    nice -n 10 python -m benchmarks.download_scale [--tiny] [--rows 200000] [--parts 1 2 4] [--kill] [--kill-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import (
    RESULTS_DIR,
    default_workdir,
    print_table,
    quiet_env,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.download_scale")

# share of each url kind in the list (a crawl's mix; CC3M-era lists lose 30-40 %, mostly 404s)
MIX = {"img": 0.80, "redirect": 0.05, "404": 0.08, "html": 0.04, "slow": 0.01, "flaky": 0.02}
AMORLIP = [str(Path(sys.executable).parent / "amorlip")]


def _url_list(server, rows: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(MIX), size=rows, p=list(MIX.values()))
    return pd.DataFrame({"url": [server.url(k, i) for i, k in enumerate(kinds)],
                         "caption": [f"{k} {i}" for i, k in enumerate(kinds)], "kind": kinds})


def _config(work: Path, parts: int, args) -> Path:
    (work / "unused.tsv").write_text("url\tcaption\n")
    config = {"paths": {k: str(work / k) for k in ("data", "runs", "results", "resources")},
              "datasets": {"d": {"source": "url_list", "url_list": str(work / "unused.tsv"), "image_size": 32,
                                 "samples_per_shard": args.per_shard, "processes": args.processes,
                                 "threads": args.threads, "timeout": args.timeout, "parts": parts,
                                 "allowed_networks": ["127.0.0.1/32"]}},
              "runs": {"clip": {"method": "clip", "dataset": "d", "model": "amorlip-tiny"}}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _check(list_table, shards: Path) -> dict:
    """Every url of the list: one row that counts, with the outcome the server was told to give."""
    import pandas as pd

    from amorlip.data.download import failure_reason
    from amorlip.data.scripted_http import OUTCOME

    table = pd.concat([pd.read_parquet(p, columns=["url", "status", "error_message"])
                       for p in sorted(shards.glob("*.parquet"))], ignore_index=True)
    got = dict(zip(table["url"], (None if s == "success" else failure_reason(m)
                                  for s, m in zip(table["status"], table["error_message"], strict=True)),
                   strict=True))
    mismatches = [(u, OUTCOME[k], got.get(u, "absent")) for u, k in zip(list_table["url"], list_table["kind"],
                                                                         strict=True) if got.get(u, "absent") != OUTCOME[k]]
    return {"rows": len(table), "duplicates": len(table) - table["url"].nunique(),
            "mismatches": len(mismatches), "mismatch_examples": [list(m) for m in mismatches[:10]],
            "by_outcome": dict(Counter(str(v) for v in got.values()))}


def _start_part(config: Path, parts_dir: Path, name: str, out: Path, logs: Path) -> subprocess.Popen:
    log_fh = open(logs / f"part-{name}.log", "a")  # noqa: SIM115 -- closed with the process
    proc = subprocess.Popen([*AMORLIP, "download", "--config", str(config), "--dataset", "d",
                             "--urls", str(parts_dir / f"{name}.parquet"), "--out", str(out)],
                            stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    log_fh.close()
    return proc


def run_once(server, list_table, parts: int, args, kill: bool = False) -> dict:
    """split -> N concurrent part downloads -> merge -> index; the wall time and the accounting."""
    from amorlip.data.parts import part_names
    from amorlip.fileio import partial_dir

    work = Path(args.workdir) / f"n{parts}{'-kill' if kill else ''}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "resources" / "d").mkdir(parents=True)
    (work / "logs").mkdir()
    urls = work / "resources" / "d" / "urls.parquet"
    list_table[["url", "caption"]].to_parquet(urls, index=False)
    config = _config(work, parts, args)
    parts_dir = work / "resources" / "d" / "parts"
    names = part_names(parts)
    outs = [work / "data" / "d" / "parts" / n for n in names]
    t0 = time.perf_counter()
    subprocess.run([*AMORLIP, "split-urls", "--config", str(config), "--dataset", "d", "--urls", str(urls),
                    "--out", str(parts_dir)], check=True, capture_output=True)
    procs = [_start_part(config, parts_dir, n, o, work / "logs") for n, o in zip(names, outs, strict=True)]
    killed = None
    if kill:
        victim = len(procs) - 1
        building = partial_dir(outs[victim])  # `amorlip download` works there until the part is complete
        while not list(building.glob("*_stats.json")) and procs[victim].poll() is None:
            time.sleep(0.05)
        if procs[victim].poll() is None:
            procs[victim].send_signal(signal.SIGTERM)
            rc = procs[victim].wait()
            done = len(list(building.glob("*_stats.json")))
            killed = {"part": names[victim], "exit_status": rc, "shards_finished_before_kill": done}
            log.info("killed part %s (exit status %d) after %d finished shard(s); running it again",
                     names[victim], rc, done)
            procs[victim] = _start_part(config, parts_dir, names[victim], outs[victim], work / "logs")
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"part download(s) failed with {codes}; see {work / 'logs'}")
    shards = work / "data" / "d" / "shards"
    subprocess.run([*AMORLIP, "merge-parts", "--config", str(config), "--dataset", "d", "--urls", str(urls),
                    "--out", str(shards), *map(str, outs)], check=True, capture_output=True)
    subprocess.run([*AMORLIP, "index", "--config", str(config), "--dataset", "d", "--shards", str(shards)],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    manifest = json.loads((work / "data" / "d" / "manifest.json").read_text())
    check = _check(list_table, shards)
    if kill:
        check["killed"] = killed
    result = {"parts": parts, "urls": manifest["urls"], "samples": manifest["samples"], "wall_s": wall,
              "images_per_s": manifest["samples"] / wall, "failures": manifest["failures"],
              "part_rates": [round(p["success_rate"], 4) for p in manifest["parts"]], **check}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="80 rows, N = 2 (smoke test)")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--kill", action="store_true", help="also a run of the largest N with one part killed and resumed")
    p.add_argument("--kill-only", action="store_true",
                   help="only the killed-and-resumed run (the smoke test: it takes every step an uninterrupted run takes)")
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--processes", type=int, default=1, help="img2dataset processes per part")
    p.add_argument("--threads", type=int, default=64, help="img2dataset threads per process")
    p.add_argument("--timeout", type=float, default=1.0, help="per-url timeout (s); slow urls answer after 2.5 x")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the shards")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        # one thread, 5 urls per shard: a part takes long enough to be stopped mid-way (--kill)
        args.rows, args.parts, args.per_shard, args.threads = 80, [2], 5, 1
    args.workdir = args.workdir or str(default_workdir() / "download_scale")
    quiet_env()
    setup_logging()
    from amorlip.data.scripted_http import ScriptedServer

    results = []
    with ScriptedServer(slow_s=2.5 * args.timeout) as server:
        table = _url_list(server, args.rows)
        log.info("%d urls: %s", len(table), dict(Counter(table["kind"])))
        for n in [] if args.kill_only else args.parts:
            log.info("N = %d part(s) ...", n)
            results.append(run_once(server, table, n, args))
            log.info("N = %d: %s", n, {k: v for k, v in results[-1].items() if k != "mismatch_examples"})
            _write(args, results, partial=True)  # a long run that is stopped keeps what it measured
        if args.kill or args.kill_only:
            results.append(run_once(server, table, max(args.parts), args, kill=True))
            log.info("killed and resumed: %s", {k: v for k, v in results[-1].items() if k != "mismatch_examples"})
    base = results[0]["images_per_s"]
    rows = [[f"{r['parts']}{' (1 killed, resumed)' if 'killed' in r else ''}", r["urls"], r["samples"],
             round(r["wall_s"], 1), round(r["images_per_s"], 1), round(r["images_per_s"] / base, 2),
             r["mismatches"], r["duplicates"]] for r in results]
    print_table(f"download_scale: {args.rows} urls, {args.processes} process(es) x {args.threads} threads per part",
                ["parts", "urls", "samples", "wall s", "images/s", f"vs N={results[0]['parts']}", "mismatches", "dup rows"], rows)
    return _write(args, results, partial=False)


def _write(args, results: list[dict], partial: bool) -> dict:
    payload = {"tiny": args.tiny, "rows": args.rows, "mix": MIX, "timeout_s": args.timeout,
               "per_shard": args.per_shard, "processes": args.processes, "threads": args.threads,
               "cpus": os.cpu_count(), "partial": partial, "results": results}
    write_result("download_scale_tiny" if args.tiny else "download_scale", payload, args.out_dir or RESULTS_DIR)
    return payload


if __name__ == "__main__":
    main()
