# Training: one job per run, then export to a plain open_clip state dict.
#
# How the ranks start (docs/slurm.md has the whole story):
# - locally, `amorlip launch --nproc N` runs torchrun on this machine; inside an allocation you made
#   yourself (`sbatch -n 8 --wrap "snakemake --cores 16 ..."`) it starts the ranks with srun;
# - under `--executor slurm` with more than one rank, the job is an MPI-style rule (`mpi` resource):
#   the SLURM plugin runs its shell once in the batch step, and the shell starts one rank per GPU
#   with `srun` across `nodes` nodes; `distributed.py` maps SLURM_PROCID/LOCALID/NTASKS. Only then do
#   SLURM's signals (`--signal=USR1@T` before the time limit, scancel --signal) reach the trainer
#   itself rather than the Snakemake process that wraps an ordinary job.

from amorlip.slurm import CPUS_PER_RANK_BEYOND_WORKERS, srun_command  # noqa: E402


def _train_ranks(run):
    r = RUNS[run]
    return r.nproc * r.nodes


def _under_slurm():
    """True in every Snakemake process of a SLURM run: the submitting one (executor `slurm`), the
    one in the batch script (`slurm-jobstep`) and the one that finally runs the shell (mode `remote`
    inside a SLURM job). They must agree, since each re-evaluates the `mpi` resource."""
    plugin = workflow.executor_plugin
    name = getattr(plugin, "name", "") or ""
    if name in ("slurm", "slurm-jobstep"):
        return True
    return workflow.remote_exec and "SLURM_JOB_ID" in os.environ


def _train_mpi(wc):
    # None drops the resource: one rank (the plugin refuses MPI jobs with one task) or no SLURM.
    return "srun" if _under_slurm() and _train_ranks(wc.run) > 1 else None


def _train_launcher(wc, resources):
    """The `srun` prefix of an MPI-style train job, else nothing (amorlip launch uses torchrun).

    amorlip.slurm.srun_command holds the flags and why: the geometry explicitly (the SLURM plugin
    strips SLURM_NTASKS & co. from the job's environment), --gpu-bind=none (every rank sees all of
    its node's GPUs; distributed.py maps local_rank % device_count), --kill-on-bad-exit=1 and
    OMP_NUM_THREADS=1 per rank, as torchrun sets it.
    """
    if "mpi" not in resources.keys():
        return ""
    r = RUNS[wc.run]
    cpus = resources.get("cpus_per_task") or None
    return " ".join(srun_command(r.nodes, r.nproc, cpus, omp_threads=1, srun=resources.mpi))


rule mlflow_init:
    output:
        parent=f"{RESULTS}/mlflow_parent.json",
    params:
        settings=settings_digest(config["name"], config["mlflow"]),
    log:
        f"{LOGS}/mlflow_init.log",
    benchmark:
        f"{LOGS}/mlflow_init.benchmark.tsv"
    shell:
        "amorlip mlflow init --config {CONFIG_FILE:q} --out {output.parent:q} > {log:q} 2>&1"


rule train_run:
    input:
        manifest=lambda wc: f"{DATA}/{RUNS[wc.run].dataset}/manifest.json",
        parent=rules.mlflow_init.output.parent,
    output:
        summary=f"{RUNS_DIR}/{{run}}/train.json",
    params:
        settings=run_settings,
        nproc=lambda wc: RUNS[wc.run].nproc,
        launcher=_train_launcher,
    threads: lambda wc: max(1, RUNS[wc.run].nproc)
    # Task geometry comes from the run (nodes x nproc ranks, one GPU each); CPUs per rank are its
    # loader workers + CPUS_PER_RANK_BEYOND_WORKERS (2: the rank's own thread, which drives the GPU,
    # and its helper threads: NCCL's polling proxy, pin-memory). A profile may override
    # cpus_per_task (the local 2-core test cluster does). Memory, runtime, partition, the preemption
    # signal: the profile (profiles/slurm). Locally only train_slots matters.
    resources:
        train_slots=1,
        mpi=_train_mpi,
        nodes=lambda wc: RUNS[wc.run].nodes,
        # the plugin takes exactly one of tasks / tasks_per_node for MPI jobs, each > 1
        tasks=lambda wc: None if RUNS[wc.run].nodes > 1 and RUNS[wc.run].nproc > 1 else _train_ranks(wc.run),
        tasks_per_node=lambda wc: RUNS[wc.run].nproc if RUNS[wc.run].nodes > 1 and RUNS[wc.run].nproc > 1 else None,
        tasks_per_gpu=0,  # else the plugin turns `tasks` into --ntasks-per-gpu
        gres=lambda wc: f"gpu:{RUNS[wc.run].nproc}",  # per node; profile may override (CPU cluster: "''")
        cpus_per_task=lambda wc: RUNS[wc.run].workers + CPUS_PER_RANK_BEYOND_WORKERS,
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{LOGS}/train/{{run}}.benchmark.tsv"
    shell:
        "SNAKEMAKE_RULE={rule} {params.launcher} amorlip launch --nproc {params.nproc} --nodes {resources.nodes} -- train --config {CONFIG_FILE:q} --run {wildcards.run:q} > {log:q} 2>&1"


rule export:
    input:
        summary=rules.train_run.output.summary,
    output:
        model=f"{RUNS_DIR}/{{run}}/model.pt",
    log:
        f"{LOGS}/export/{{run}}.log",
    benchmark:
        f"{LOGS}/export/{{run}}.benchmark.tsv"
    shell:
        "amorlip export --config {CONFIG_FILE:q} --run {wildcards.run:q} > {log:q} 2>&1"


rule train:
    input:
        expand(f"{RUNS_DIR}/{{run}}/model.pt", run=list(RUNS)),
