"""The ``amorlip`` command. Snakemake rules are one line each around these subcommands.

Each subcommand validates the config first (so a bad config fails before any work, naming the key),
then calls one library function. Heavy imports happen inside the subcommand so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from amorlip.config import ConfigError, load_config
from amorlip.fileio import OutputLockedError, output_lock

log = logging.getLogger("amorlip")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # third-party chatter that buries our one-line-per-event logs
    for noisy in ("urllib3", "matplotlib", "PIL", "alembic", "git", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def _config(args, check_paths: bool = True) -> dict:
    return load_config(args.config, check_paths=check_paths)


# --------------------------------------------------------------------------- subcommands


def cmd_validate(args) -> int:
    from amorlip.config import expand_runs

    config = _config(args)
    runs = expand_runs(config)
    print(f"config OK: {len(config['datasets'])} dataset(s), {len(runs)} run(s): {', '.join(runs)}")
    return 0


def cmd_source(args) -> int:
    config = _config(args)
    ds = config["datasets"][_dataset(config, args.dataset)]
    if ds["source"] == "emoji":
        from amorlip.data.demo import build_demo

        with output_lock(args.out):
            build_demo(config, args.dataset, out=args.out)
        return 0
    from amorlip.data.sources import UrlListError, write_url_parquet

    try:
        with output_lock(args.out):
            write_url_parquet(config, args.dataset, out=args.out)
    except UrlListError as exc:  # the file, line and fix in one line, not a pandas traceback
        print(f"amorlip: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_download(args) -> int:
    from amorlip.data.download import DownloadIncomplete, download
    from amorlip.fileio import staged_dir

    config = _config(args)
    try:
        # built in <out>.partial, moved to <out> when complete: a failed job's output folder is deleted
        # by Snakemake before its retry, the work folder is not (fileio.staged_dir)
        with output_lock(args.out), staged_dir(args.out) as work:
            download(config, _dataset(config, args.dataset), urls=args.urls, out_dir=work)
    except DownloadIncomplete as exc:  # urls never attempted: named, and never an exit status of 0
        print(f"amorlip: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_index(args) -> int:
    from amorlip.data.download import write_index

    config = _config(args)
    with output_lock(args.shards):  # the same lock as the download of these shards
        write_index(config, _dataset(config, args.dataset), shards_dir=args.shards)
    return 0


def cmd_split_urls(args) -> int:
    from amorlip.data.parts import split_urls

    config = _config(args)
    with output_lock(args.out):
        split_urls(config, _dataset(config, args.dataset), urls=args.urls, out_dir=args.out)
    return 0


def cmd_merge_parts(args) -> int:
    from amorlip.data.parts import merge_parts

    config = _config(args)
    with output_lock(args.out):
        merge_parts(config, _dataset(config, args.dataset), urls=args.urls, part_dirs=args.parts, out_dir=args.out)
    return 0


def cmd_retry_failed(args) -> int:
    from amorlip.data.download import DownloadIncomplete
    from amorlip.data.retry import retry_failed

    config = _config(args)
    dataset = _dataset(config, args.dataset)
    shards = args.shards or str(Path(config["paths"]["data"]) / dataset / "shards")
    try:
        with output_lock(shards):  # the same lock as the download and index of these shards
            retry_failed(config, dataset, shards, reasons=args.reasons.split(","))
    except DownloadIncomplete as exc:
        print(f"amorlip: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a success rate still below the floor, or shards that do not add up
        print(f"amorlip: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from amorlip.train.run import train

    config = _config(args)
    # every rank runs this; the global rank 0 alone holds the run's lock for the whole job
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank not in ("", "0"):
        return train(config, args.run)
    with output_lock(os.path.join(config["paths"]["runs"], args.run)):
        return train(config, args.run)


def cmd_export(args) -> int:
    from amorlip.train.export import export

    config = _config(args)
    with output_lock(os.path.join(config["paths"]["runs"], args.run, "model.pt")):
        export(config, args.run)
    return 0


def cmd_evaluate(args) -> int:
    from amorlip.evaluate.runner import evaluate
    from amorlip.model_file import ModelFileError

    config = _config(args)
    try:
        with output_lock(args.out):
            evaluate(config, args.run, args.suite, out=args.out)
    except ModelFileError as exc:  # names the file and how to redo it: no traceback needed
        print(f"amorlip: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from amorlip.report import report

    config = _config(args)
    with output_lock(os.path.join(config["paths"]["results"], "summary.csv")):
        report(config)
    return 0


def cmd_mlflow_init(args) -> int:
    from amorlip.tracking import init_pipeline

    config = _config(args)
    with output_lock(args.out):
        init_pipeline(config, out=args.out)
    return 0


def cmd_mlflow_replay(args) -> int:
    from amorlip.tracking.replay import replay

    replay(args.file, tracking_uri=args.tracking_uri)
    return 0


def cmd_evalsets_download(args) -> int:
    from amorlip.evaluate.download import DownloadError, download_suite

    try:
        status = download_suite(args.suite, root=args.root, tasks=args.tasks)
    except DownloadError as exc:
        print(f"amorlip: {exc}", file=sys.stderr)
        return 1
    if args.done:  # the pipeline's rule datacomp_evalsets: written only when every task downloaded
        from amorlip.fileio import atomic_write_json

        atomic_write_json(args.done, status)
    return 0


def cmd_evalsets_build_emoji(args) -> int:
    from amorlip.data.demo import build_heldout_evalsets

    config = _config(args)
    with output_lock(args.root):
        build_heldout_evalsets(config, _dataset(config, args.dataset), root=args.root)
    return 0


def cmd_launch(args) -> int:
    """Start ``amorlip <rest>`` on ``--nproc`` ranks per node (``amorlip.slurm.launch_plan``).

    - one of several tasks of an ``srun`` step: SLURM already started one process per rank, so the
      command runs in this process and ``distributed.py`` maps the SLURM variables;
    - inside a multi-task allocation but not in a step (``sbatch -n 8 --wrap "amorlip launch ..."``,
      an ``salloc`` shell): this process becomes ``srun``, which starts the ranks as a job step
      (SLURM_NTASKS alone cannot tell the batch script from a rank: both say 8);
    - otherwise one rank runs in-process and several go through ``torchrun --standalone`` (a free
      rendezvous port, so parallel jobs on one machine do not collide).
    """
    from amorlip import slurm

    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise SystemExit("amorlip launch: nothing to run (usage: amorlip launch --nproc N -- train ...)")
    if args.nproc < 1 or (args.nodes is not None and args.nodes < 1):
        raise SystemExit("amorlip launch: --nproc and --nodes must be at least 1")
    plan = slurm.launch_plan(args.nproc)
    if plan == "inline":
        if not (slurm.in_job_step() and slurm.allocation_tasks() > 1):
            return main(rest)
        # one rank of an srun step: before torch is imported (its OpenMP pool reads the variable
        # once, when it loads), as torchrun does for several local ranks
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        slurm.absorb_late_sigterm()
        slurm.exit_rank(main(rest))  # keeps the rank's code when srun stops a step a peer left
        return 0  # not reached
    if plan == "srun":
        cmd = [*slurm.allocation_srun_command(args.nproc, args.nodes),
               sys.executable, "-m", "amorlip.cli", "launch", "--nproc", str(args.nproc), "--", *rest]
        log.info("inside allocation %s (not a job step): starting the ranks with %s",
                 os.environ.get("SLURM_JOB_ID"), " ".join(cmd))
        os.execvp(cmd[0], cmd)
    if args.nodes not in (None, 1):
        raise SystemExit(f"amorlip launch: --nodes {args.nodes} needs a SLURM allocation with that many "
                         "nodes (torchrun here starts ranks on this machine only)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "amorlip.cli", "--", *rest]
    log.info("launching %d ranks: %s", args.nproc, " ".join(cmd))
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_demo_summary(args) -> int:
    from amorlip.browse_hint import print_browse_hint
    from amorlip.report import print_demo_summary

    config = _config(args)
    print_demo_summary(config)
    if (Path(config["paths"]["results"]) / "summary.md").exists():
        print_browse_hint(config)
    return 0


def cmd_diagnose(args) -> int:
    from amorlip.diagnostics import DiagnoseError, diagnose, format_table
    from amorlip.model_file import ModelFileError

    config = _config(args)
    out = args.out or os.path.join(config["paths"]["runs"], args.run, "amortization.json")
    try:
        with output_lock(out):
            report = diagnose(config, args.run, probe=args.probe, out=out, seed=args.seed, device=args.device)
    except (DiagnoseError, ModelFileError) as exc:  # names the run and the fix: no traceback needed
        print(f"amorlip: {exc}", file=sys.stderr)
        return 1
    print(format_table(report))
    return 0


def _dataset(config: dict, name: str) -> str:
    if name not in config["datasets"]:
        raise ConfigError(f"config error: unknown dataset '{name}' (defined: {', '.join(config['datasets'])})")
    return name


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amorlip", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    def with_config(sp):
        sp.add_argument("--config", required=True, help="pipeline YAML config (validated first)")
        return sp

    with_config(add("validate", cmd_validate, "validate a config and list its runs"))

    sp = with_config(add("source", cmd_source, "write resources/{dataset}/urls.parquet (url list or emoji demo)"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--out", required=True, help="urls.parquet to write")

    sp = with_config(add("download", cmd_download, "img2dataset -> webdataset shards"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--urls", required=True, help="urls.parquet from `amorlip source`")
    sp.add_argument("--out", required=True,
                    help="shard folder (built in <out>.partial, moved here when every url is accounted for)")

    sp = with_config(add("index", cmd_index, "write sizes.json and manifest.json from img2dataset stats"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--shards", required=True, help="shard folder")

    sp = with_config(add("split-urls", cmd_split_urls, "split urls.parquet into datasets.<name>.parts part lists"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--urls", required=True, help="urls.parquet from `amorlip source`")
    sp.add_argument("--out", required=True, help="folder for NNN.parquet, one per part")

    sp = with_config(add("merge-parts", cmd_merge_parts, "link the parts' shards into one shard set"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--urls", required=True, help="the full urls.parquet the parts were split from")
    sp.add_argument("--out", required=True, help="shard folder")
    sp.add_argument("parts", nargs="+", help="the parts' shard folders, in part order")

    sp = with_config(add("retry-failed", cmd_retry_failed,
                         "download again the failed urls of chosen reasons as extra shards, then re-index"))
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--reasons", default="timeout,5xx,dns",
                    help="comma-separated failure reasons: timeout, 5xx, 4xx, dns, connection, truncated or an "
                         "exact one such as http_429 (default timeout,5xx,dns)")
    sp.add_argument("--shards", default=None, help="shard folder (default <paths.data>/<dataset>/shards)")

    sp = with_config(add("train", cmd_train, "train one run (launch with torchrun or srun for several ranks)"))
    sp.add_argument("--run", required=True)

    sp = with_config(add("export", cmd_export, "consolidate a run's checkpoint into runs/{run}/model.pt"))
    sp.add_argument("--run", required=True)

    sp = with_config(add("evaluate", cmd_evaluate, "zero-shot evaluation of one run on one suite"))
    sp.add_argument("--run", required=True)
    sp.add_argument("--suite", required=True)
    sp.add_argument("--out", required=True, help="results/{run}/{suite}.json")

    with_config(add("report", cmd_report, "summary.csv / summary.md / plots, logged to the MLflow parent run"))
    with_config(add("demo-summary", cmd_demo_summary, "print where the demo's results are"))

    sp = with_config(add("diagnose", cmd_diagnose, "amortization diagnostics of runs/{run}/model.pt's lambda nets"))
    sp.add_argument("--run", required=True)
    sp.add_argument("--probe", type=int, default=2048, help="training samples in the probe set (default 2048)")
    sp.add_argument("--out", default=None, help="JSON to write (default runs/{run}/amortization.json; PNG beside)")
    sp.add_argument("--seed", type=int, default=None, help="probe and in-batch seed (default: the run's seed)")
    sp.add_argument("--device", default="cpu", help="torch device for the embedding (default cpu)")

    ml = sub.add_parser("mlflow", help="MLflow helpers").add_subparsers(dest="mlflow_command", required=True)
    sp = ml.add_parser("init", help="create the pipeline's parent run")
    sp.set_defaults(func=cmd_mlflow_init)
    sp.add_argument("--config", required=True)
    sp.add_argument("--out", required=True, help="JSON file recording the parent run id")
    sp = ml.add_parser("replay", help="send metrics kept locally during a tracking outage")
    sp.set_defaults(func=cmd_mlflow_replay)
    sp.add_argument("file", help="runs/{run}/mlflow-offline.jsonl")
    sp.add_argument("--tracking-uri", default=None)

    sp = add("launch", cmd_launch, "run an amorlip command on N ranks per node (torchrun, or srun in a SLURM allocation)")
    sp.add_argument("--nproc", type=int, default=1, help="ranks per node")
    sp.add_argument("--nodes", type=int, default=None,
                    help="nodes (inside a SLURM allocation; default: all of its nodes)")
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")

    ev = sub.add_parser("evalsets", help="evaluation sets").add_subparsers(dest="evalsets_command", required=True)
    sp = ev.add_parser("download", help="download a suite's eval sets (needs internet)")
    sp.set_defaults(func=cmd_evalsets_download)
    sp.add_argument("suite", choices=["datacomp"])
    sp.add_argument("--root", required=True)
    sp.add_argument("--tasks", nargs="*", default=None, help="subset of task keys (default: all)")
    sp.add_argument("--done", default=None, help="JSON of each task's status, written when all are there")
    sp = ev.add_parser("build-emoji", help="render the emoji demo's held-out-style eval sets")
    sp.set_defaults(func=cmd_evalsets_build_emoji)
    sp.add_argument("--config", required=True)
    sp.add_argument("--dataset", required=True, help="the emoji dataset whose held-out style is rendered")
    sp.add_argument("--root", required=True, help="data/evalsets/emoji-heldout")
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"amorlip: {exc}", file=sys.stderr)
        return 2
    except OutputLockedError as exc:
        print(f"amorlip: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
