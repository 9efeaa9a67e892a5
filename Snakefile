# amorlip pipeline: the rules live in workflow/; this file only includes them (Snakemake looks for a
# top-level Snakefile first).
include: "workflow/Snakefile"
