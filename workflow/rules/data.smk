# Data stage: a url list (or the emoji demo builder) -> img2dataset webdataset shards -> sizes.json.
# A dataset with `parts: N` > 1 fans out: split_urls -> N x download_part -> merge_parts -> index
# (amorlip/data/parts.py); with parts: 1 one `download` job writes the shards, as before.
import re

from amorlip.data.parts import part_names


def _datasets_with_parts(fanned):
    names = [n for n, d in config["datasets"].items() if (int(d["parts"]) > 1) == fanned]
    # a wildcard constraint: exactly these names; "(?!)" matches nothing
    return "|".join(re.escape(n) for n in names) or "(?!)"


SINGLE_DOWNLOAD = _datasets_with_parts(False)
FANNED_DOWNLOAD = _datasets_with_parts(True)


def download_settings(wc):
    """dataset_settings without what only the index reads (min_success_rate) and without `parts` at
    its default, so neither new key changes the digest of a download made before they existed."""
    ds = {k: v for k, v in config["datasets"][wc.dataset].items()
          if k != "min_success_rate" and not (k == "parts" and v == 1)}
    content = file_sha256(ds["url_list"], cache=URL_LIST_DIGESTS) if ds["source"] == "url_list" else None
    return settings_digest(ds, content)



rule source:
    input:
        url_list=url_list_input,
    output:
        urls=f"{RESOURCES}/{{dataset}}/urls.parquet",
    params:
        settings=download_settings,
    log:
        f"{LOGS}/source/{{dataset}}.log",
    benchmark:
        f"{LOGS}/source/{{dataset}}.benchmark.tsv"
    shell:
        "amorlip source --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --out {output.urls:q} > {log:q} 2>&1"


rule download:
    wildcard_constraints:
        dataset=SINGLE_DOWNLOAD,
    input:
        urls=rules.source.output.urls,
    output:
        shards=directory(f"{DATA}/{{dataset}}/shards"),
    params:
        settings=download_settings,
    threads: 2
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{LOGS}/download/{{dataset}}.benchmark.tsv"
    shell:
        "amorlip download --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --urls {input.urls:q} --out {output.shards:q} > {log:q} 2>&1"


rule split_urls:
    wildcard_constraints:
        dataset=FANNED_DOWNLOAD,
    input:
        urls=rules.source.output.urls,
    output:
        parts=directory(f"{RESOURCES}/{{dataset}}/parts"),
    params:
        settings=download_settings,
    log:
        f"{LOGS}/split_urls/{{dataset}}.log",
    shell:
        "amorlip split-urls --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --urls {input.urls:q} --out {output.parts:q} > {log:q} 2>&1"


# One job per part: under profiles/slurm each is its own SLURM job (set-resources: download_part).
rule download_part:
    wildcard_constraints:
        dataset=FANNED_DOWNLOAD,
        part=r"\d{3}",
    input:
        parts=rules.split_urls.output.parts,
    output:
        shards=directory(f"{DATA}/{{dataset}}/parts/{{part}}"),
    params:
        settings=download_settings,
    threads: 2
    log:
        f"{LOGS}/download/{{dataset}}/{{part}}.log",
    benchmark:
        f"{LOGS}/download/{{dataset}}/{{part}}.benchmark.tsv"
    shell:
        "amorlip download --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --urls {input.parts:q}/{wildcards.part}.parquet --out {output.shards:q} > {log:q} 2>&1"


rule merge_parts:
    wildcard_constraints:
        dataset=FANNED_DOWNLOAD,
    input:
        urls=rules.source.output.urls,
        parts=lambda wc: expand(f"{DATA}/{wc.dataset}/parts/{{part}}",
                                part=part_names(int(config["datasets"][wc.dataset]["parts"]))),
    output:
        shards=directory(f"{DATA}/{{dataset}}/shards"),
    log:
        f"{LOGS}/merge_parts/{{dataset}}.log",
    shell:
        "amorlip merge-parts --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --urls {input.urls:q} --out {output.shards:q} {input.parts:q} > {log:q} 2>&1"


# What the index step does to the shards; a new value re-indexes data built before it
# (2: every tar rewritten in key order, manifest.json with samples_sha256).
INDEX_FORMAT = 2


rule index:
    input:
        shards=f"{DATA}/{{dataset}}/shards",  # rule download, or merge_parts of a fan-out
    output:
        sizes=f"{DATA}/{{dataset}}/sizes.json",
        manifest=f"{DATA}/{{dataset}}/manifest.json",
    params:
        settings=lambda wc: settings_digest(config["datasets"][wc.dataset], INDEX_FORMAT),
    log:
        f"{LOGS}/index/{{dataset}}.log",
    benchmark:
        f"{LOGS}/index/{{dataset}}.benchmark.tsv"
    shell:
        "amorlip index --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --shards {input.shards:q} > {log:q} 2>&1"




# The DataComp eval sets, when evaluation.download allows it (the paper configs): through
# huggingface_hub (HF_ENDPOINT mirrors, HF_TOKEN), resumable; the marker lists each task's status.
# Offline (download: false) the sets come from `amorlip evalsets download datacomp --root ...`.
DATACOMP_DONE = os.path.join(config["evaluation"]["datacomp_root"], "download.done")


rule datacomp_evalsets:
    output:
        done=DATACOMP_DONE,
    params:
        root=config["evaluation"]["datacomp_root"],
    log:
        f"{LOGS}/evalsets/datacomp.log",
    benchmark:
        f"{LOGS}/evalsets/datacomp.benchmark.tsv"
    shell:
        "amorlip evalsets download datacomp --root {params.root:q} --done {output.done:q} > {log:q} 2>&1"


def emoji_dataset():
    """The emoji dataset whose held-out style the demo suite evaluates on."""
    names = [n for n, d in config["datasets"].items() if d["source"] == "emoji"]
    if not names:
        raise WorkflowError("suite 'emoji-heldout' needs a dataset with source 'emoji' in 'datasets'")
    return names[0]


rule emoji_evalsets:
    output:
        tasks=str(emoji_heldout_tasks_json(DATA)),
    params:
        settings=lambda wc: settings_digest(config["datasets"][emoji_dataset()]),
        dataset=lambda wc: emoji_dataset(),
        root=lambda wc, output: os.path.dirname(output.tasks),
    log:
        f"{LOGS}/evalsets/emoji-heldout.log",
    benchmark:
        f"{LOGS}/evalsets/emoji-heldout.benchmark.tsv"
    shell:
        "amorlip evalsets build-emoji --config {CONFIG_FILE:q} --dataset {params.dataset:q} --root {params.root:q} > {log:q} 2>&1"


rule data:
    input:
        expand(f"{DATA}/{{dataset}}/manifest.json", dataset=TRAIN_DATASETS),
        [rules.emoji_evalsets.output.tasks] if "emoji-heldout" in SUITES else [],
        [DATACOMP_DONE] if "datacomp" in SUITES and config["evaluation"]["download"] else [],
