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
# The rule's input functions for that (_train_ranks, _under_slurm, _train_mpi, _train_launcher) live in
# common.smk with the others.

from types import SimpleNamespace


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


def _zeroshot_inputs(wc):
    """The eval sets of the suite a run evaluates during training (zeroshot_during_training), when on;
    suite_inputs lives in evaluate.smk (called at DAG time, after every include)."""
    zs = RUNS[wc.run].zeroshot_during_training
    return suite_inputs(SimpleNamespace(suite=zs.suite)) if zs.enabled else []


rule train_run:
    input:
        manifest=lambda wc: f"{DATA}/{RUNS[wc.run].dataset}/manifest.json",
        zeroshot=_zeroshot_inputs,
        parent=rules.mlflow_init.output.parent,
    output:
        summary=f"{RUNS_DIR}/{{run}}/train.json",
        # the trainer's own loss-curve figure (amorlip.train.progress), shown in `snakemake --report`
        curves=report(
            f"{RUNS_DIR}/{{run}}/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Training",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "loss curves"},
        ),
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
    # printed when the job starts: training is the long job, and its progress bar goes to the log
    message:
        "training run {wildcards.run}; follow its progress with: tail -f {log}"
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
