# Data stage: a url list (or the emoji demo builder) -> img2dataset webdataset shards -> sizes.json.


rule source:
    input:
        url_list=url_list_input,
    output:
        urls=f"{RESOURCES}/{{dataset}}/urls.parquet",
    params:
        settings=dataset_settings,
    log:
        f"{LOGS}/source/{{dataset}}.log",
    benchmark:
        f"{LOGS}/source/{{dataset}}.benchmark.tsv"
    shell:
        "amorlip source --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --out {output.urls:q} > {log:q} 2>&1"


rule download:
    input:
        urls=rules.source.output.urls,
    output:
        shards=directory(f"{DATA}/{{dataset}}/shards"),
    params:
        settings=dataset_settings,
    threads: 2
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{LOGS}/download/{{dataset}}.benchmark.tsv"
    shell:
        "amorlip download --config {CONFIG_FILE:q} --dataset {wildcards.dataset:q} --urls {input.urls:q} --out {output.shards:q} > {log:q} 2>&1"


# What the index step does to the shards; a new value re-indexes data built before it
# (2: every tar rewritten in key order, manifest.json with samples_sha256).
INDEX_FORMAT = 2


rule index:
    input:
        shards=rules.download.output.shards,
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




def emoji_dataset():
    """The emoji dataset whose held-out style the demo suite evaluates on."""
    names = [n for n, d in config["datasets"].items() if d["source"] == "emoji"]
    if not names:
        raise WorkflowError("suite 'emoji-heldout' needs a dataset with source 'emoji' in 'datasets'")
    return names[0]


rule emoji_evalsets:
    output:
        tasks=f"{DATA}/evalsets/emoji-heldout/tasks.json",
    params:
        settings=lambda wc: settings_digest(config["datasets"][emoji_dataset()]),
        dataset=lambda wc: emoji_dataset(),
        root=f"{DATA}/evalsets/emoji-heldout",
    log:
        f"{LOGS}/evalsets/emoji-heldout.log",
    benchmark:
        f"{LOGS}/evalsets/emoji-heldout.benchmark.tsv"
    shell:
        "amorlip evalsets build-emoji --config {CONFIG_FILE:q} --dataset {params.dataset:q} --root {params.root:q} > {log:q} 2>&1"


rule data:
    input:
        expand(f"{DATA}/{{dataset}}/manifest.json", dataset=TRAIN_DATASETS),
        [f"{DATA}/evalsets/emoji-heldout/tasks.json"] if "emoji-heldout" in SUITES else [],
