# Shared setup: validate the config against workflow/schemas/config.schema.yaml before any job
# (an invalid key or value stops here, naming it), expand the runs, and write the resolved config
# that every `amorlip ...` command reads.
import hashlib
import json
import os
import sys

import yaml

sys.path.insert(0, workflow.basedir)
# Jobs call `amorlip`: use the one installed beside this Snakemake's interpreter (.venv/bin), so
# `.venv/bin/snakemake ...` works without activating the venv (also inside SLURM jobs).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
from amorlip.config import ConfigError, expand_runs, load_config, read_config_file, tracking_uri  # noqa: E402
from amorlip.evaluate.suites import datacomp_suite, emoji_heldout_tasks_json  # noqa: E402
from amorlip.fileio import atomic_write_text, file_sha256  # noqa: E402
from amorlip.slurm import CPUS_PER_RANK_BEYOND_WORKERS, srun_command  # noqa: E402

try:
    # Snakemake parsed these files already, but leniently: it keeps the last of two equal keys and
    # accepts alias bombs. Re-reading them with amorlip's parser gives the same refusals and messages
    # as `amorlip validate` (duplicate key and line, alias expansion cap), before anything walks them.
    for _configfile in workflow.configfiles:
        read_config_file(_configfile)
    _validated = load_config(dict(config))
except ConfigError as _exc:
    raise WorkflowError(str(_exc)) from None
config.clear()
config.update(_validated)

RUNS = expand_runs(config)
DATA = config["paths"]["data"]
RUNS_DIR = config["paths"]["runs"]
RESULTS = config["paths"]["results"]
RESOURCES = config["paths"]["resources"]
LOGS = "logs"
TRACKING_URI = tracking_uri(config)
SUITES = config["evaluation"]["suites"]
TRAIN_DATASETS = sorted({run.dataset for run in RUNS.values()})


def _write_resolved_config():
    text = yaml.safe_dump(config, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(RESULTS, ".configs", f"{digest}.yaml")
    if not os.path.exists(path):
        atomic_write_text(path, text)  # two Snakemake processes may write it at once: same text, whole
    return path


# Every rule passes this file as `--config`; it holds the validated config with defaults filled.
# Rules name it in their shell command ({CONFIG_FILE}), never in `params`: its name changes with any
# edit of the config, and Snakemake reruns a job whose params changed, so one new run in `runs`
# would re-download the data and retrain every run. A rule's `params.settings` is instead a
# digest of only the settings its output depends on (see settings_digest).
CONFIG_FILE = _write_resolved_config()
# sha256 of each url list, keyed by its stat: a multi-GB list is hashed once per change, not per run
URL_LIST_DIGESTS = os.path.join(RESULTS, ".configs", "url-list-digests.json")


def settings_digest(*parts):
    """A short digest of the config blocks one job's output depends on (its `params.settings`).

    Snakemake reruns a job when its params change; with a digest of just these blocks, editing one
    run's lr retrains that run alone, adding a run or a suite reruns nothing that exists, and
    changing a dataset's options rebuilds that dataset (and, through the inputs, what follows).
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def url_list_input(wc):
    """The url list file of a url-list dataset, as an input of rule `source`.

    `ancient`: its modification time alone never reruns anything (copying or touching a CC12M list
    must not re-download it); its content reaches the jobs through dataset_settings instead.
    """
    ds = config["datasets"][wc.dataset]
    return [ancient(ds["url_list"])] if ds["source"] == "url_list" else []


def dataset_settings(wc):
    """The dataset's config block plus, for a url list, a digest of the list's content: editing the
    file (rows appended, urls fixed) rebuilds the dataset and what follows even though its path, the
    only thing the config holds, is unchanged."""
    ds = config["datasets"][wc.dataset]
    content = file_sha256(ds["url_list"], cache=URL_LIST_DIGESTS) if ds["source"] == "url_list" else None
    return settings_digest(ds, content)


def run_settings(wc):
    """The run's settings less those at the default of a field added later (RunConfig.settings): a
    version that adds a setting leaves finished runs alone."""
    return settings_digest(RUNS[wc.run].settings())


def datacomp_sets():
    """What DataComp eval sets are on disk: every file of every task folder, with size and mtime.

    The sets are not Snakemake inputs (a missing task is reported as missing, not an error), so
    without this a set downloaded after a first evaluation would never be evaluated. A stat of a few
    hundred files; the evaluation never writes into these folders.
    """
    found = []
    for task in datacomp_suite(config["evaluation"]["datacomp_root"]).tasks:
        for folder, dirs, files in os.walk(task.path):
            # .cache/: huggingface_hub's download bookkeeping (amorlip/evaluate/download.py), not the set
            dirs[:] = sorted(d for d in dirs if d != ".cache")
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                found.append((os.path.relpath(os.path.join(folder, name), task.path), task.key,
                              st.st_size, st.st_mtime_ns))
    return found


def evaluation_settings(wc):
    """Beyond its inputs (model.pt, which a changed run retrains, and the suite's files), an
    evaluation's numbers depend on where the DataComp sets live and which of them are there;
    batch size and workers change speed only."""
    sets = datacomp_sets() if wc.suite == "datacomp" else None
    return settings_digest(wc.suite, config["evaluation"]["datacomp_root"], sets)


# The train rule's task geometry under SLURM (workflow/rules/train.smk and docs/slurm.md say how the
# ranks start).


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


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    run="[A-Za-z0-9_.-]+",
    suite="[A-Za-z0-9_.-]+",
