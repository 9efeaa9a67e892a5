# Training: one job per run (torchrun on one node; srun with one rank per GPU on several nodes),
# then export to a plain open_clip state dict.


rule mlflow_init:
    output:
        parent=f"{RESULTS}/mlflow_parent.json",
    params:
        cfg=CONFIG_FILE,
    log:
        f"{LOGS}/mlflow_init.log",
    benchmark:
        f"{LOGS}/mlflow_init.benchmark.tsv"
    shell:
        "amorlip mlflow init --config {params.cfg:q} --out {output.parent:q} > {log:q} 2>&1"


rule train_run:
    input:
        manifest=lambda wc: f"{DATA}/{RUNS[wc.run].dataset}/manifest.json",
        parent=rules.mlflow_init.output.parent,
    output:
        summary=f"{RUNS_DIR}/{{run}}/train.json",
    params:
        cfg=CONFIG_FILE,
        nproc=lambda wc: RUNS[wc.run].nproc,
    threads: lambda wc: max(1, RUNS[wc.run].nproc)
    resources:
        train_slots=1,
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{LOGS}/train/{{run}}.benchmark.tsv"
    shell:
        "amorlip launch --nproc {params.nproc} -- train --config {params.cfg:q} --run {wildcards.run:q} > {log:q} 2>&1"


rule export:
    input:
        summary=rules.train_run.output.summary,
    output:
        model=f"{RUNS_DIR}/{{run}}/model.pt",
    params:
        cfg=CONFIG_FILE,
    log:
        f"{LOGS}/export/{{run}}.log",
    benchmark:
        f"{LOGS}/export/{{run}}.benchmark.tsv"
    shell:
        "amorlip export --config {params.cfg:q} --run {wildcards.run:q} > {log:q} 2>&1"


rule train:
    input:
        expand(f"{RUNS_DIR}/{{run}}/model.pt", run=list(RUNS)),
