# amorlip DAG (see docs/architecture.md):
#   source -> download (img2dataset) -> index -> train -> export -> evaluate x suite -> report
# Targets: data, train, evaluate, report, all (default).
from snakemake.utils import min_version

min_version("9.0")


# The demo's config is the default only: with `--configfile X` Snakemake would deep-merge X into it,
# so a sweep's `runs: {}` would still train the demo's two runs and its datasets would linger.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# `snakemake --report report.html`: this description opens the report; each figure has a caption
report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.csv",


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onsuccess:
    if os.path.exists(f"{RESULTS}/summary.md"):
        from amorlip.browse_hint import browse_lines

        print(f"amorlip: done. Summary: {RESULTS}/summary.md ; browse the runs:", *browse_lines(config), sep="\n")


onerror:
    print("amorlip: a job failed; its log is named above (logs/...). Fix the cause and rerun: finished outputs are kept.")
