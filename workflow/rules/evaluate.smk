# Evaluation: one job per run x suite, zero-shot classification and retrieval on local eval sets.


def suite_inputs(wc):
    if wc.suite == "emoji-heldout":
        return [rules.emoji_evalsets.output.tasks]
    if config["evaluation"]["download"]:  # the DataComp download is a job of the DAG (rule datacomp_evalsets)
        return [DATACOMP_DONE]
    return []  # datacomp offline: sets are read from evaluation.datacomp_root; missing tasks are reported as missing


rule evaluate_run:
    input:
        model=f"{RUNS_DIR}/{{run}}/model.pt",
        suite=suite_inputs,
        parent=rules.mlflow_init.output.parent,
    output:
        metrics=f"{RESULTS}/{{run}}/{{suite}}.json",
    params:
        settings=evaluation_settings,
    # One CPU for the process that runs the model, plus one per loader worker
    # (evaluation.workers), so decoding never competes with the model for a core. On a GPU the
    # device comes from the job's allocation (amorlip.devices.eval_device). A profile may override.
    resources:
        cpus_per_task=config["evaluation"]["workers"] + 1,
    log:
        f"{LOGS}/evaluate/{{run}}/{{suite}}.log",
    benchmark:
        f"{LOGS}/evaluate/{{run}}/{{suite}}.benchmark.tsv"
    shell:
        "SNAKEMAKE_RULE={rule} amorlip evaluate --config {CONFIG_FILE:q} --run {wildcards.run:q} --suite {wildcards.suite:q} --out {output.metrics:q} > {log:q} 2>&1"


rule evaluate:
    input:
        expand(f"{RESULTS}/{{run}}/{{suite}}.json", run=list(RUNS), suite=SUITES),
