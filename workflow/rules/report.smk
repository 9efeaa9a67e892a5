# Report: one row per run, plots, everything logged to the pipeline's MLflow parent run.


rule report:
    input:
        metrics=expand(f"{RESULTS}/{{run}}/{{suite}}.json", run=list(RUNS), suite=SUITES),
        train=expand(f"{RUNS_DIR}/{{run}}/train.json", run=list(RUNS)),
        parent=rules.mlflow_init.output.parent,
    output:
        csv=report(f"{RESULTS}/summary.csv", caption="../report/summary_csv.rst", category="Summary"),
        md=report(f"{RESULTS}/summary.md", caption="../report/summary_md.rst", category="Summary"),
        plots=report(
            directory(f"{RESULTS}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Comparison",
            labels={"figure": "{name}"},
        ),
    params:
        settings=settings_digest(config),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{LOGS}/report.benchmark.tsv"
    shell:
        "amorlip report --config {CONFIG_FILE:q} > {log:q} 2>&1"
