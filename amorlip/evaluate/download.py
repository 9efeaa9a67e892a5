"""Download the DataComp evaluation sets into the folder layout the ``datacomp`` suite reads.

For users with internet (or a mirror); evaluation itself is offline once the files are local. Each
webdataset task comes from its Hugging Face dataset repo as DataComp's ``download_evalsets.py``
fetches it (``djghosh/wds_<task>_test``: ``classnames.txt``, ``zeroshot_classification_templates.txt``,
``test/nshards.txt``, ``test/{i}.tar``; retrieval sets add ``dataset_type.txt``). That covers the
classification sets and the WILDS / fairness sets (their ``.npy`` metadata is inside the shards).
Flickr and MSCOCO, which DataComp reads through HF ``datasets``, come from clip_benchmark's
webdataset copies of the same test splits (``clip-benchmark/wds_flickr30k``,
``clip-benchmark/wds_mscoco_captions``). WinoGAViL, which DataComp reads through HF ``datasets``
(``nlphuji/winogavil``), comes as the two plain files that repo's loading script reads,
``winogavil_dataset.csv`` and ``winogavil_images.zip`` (4.7 GB), into ``wds_misc-winogavil_test``
(read by :mod:`amorlip.evaluate.winogavil`). All 38 scored tasks can be covered.

Transfers go through ``huggingface_hub.snapshot_download`` into the task folder (``local_dir``):
every file is written under a temporary name and renamed when complete, an interrupted file resumes
(HTTP Range) on the next run, files already there and unchanged on the hub are not fetched again,
``HF_ENDPOINT`` selects a mirror and ``HF_TOKEN`` (or ``huggingface-cli login``) authenticates. The
hub's bookkeeping stays in the task folder's ``.cache/`` (what makes resume and skip work); the
suite and the pipeline ignore it. After the transfer each task is checked: the shards that
``test/nshards.txt`` announces must all be there (WinoGAViL: the CSV parses and every candidate's
image is in the zip).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from amorlip.evaluate import winogavil
from amorlip.evaluate.suites import Task, datacomp_suite

log = logging.getLogger(__name__)

HF_ENDPOINT = "https://huggingface.co"
# what the suite reads of a repo; classification sets deliberately go without dataset_type.txt, as
# DataComp downloads them (clip_benchmark reads a "multilabel" type differently)
_CLASSIFICATION_FILES = ["classnames.txt", "zeroshot_classification_templates.txt", "test/*"]
_RETRIEVAL_FILES = ["dataset_type.txt", "test/*"]


class DownloadError(RuntimeError):
    """Some tasks could not be downloaded (the message lists them and why)."""


def default_endpoint() -> str:
    """The hub, or a mirror when ``HF_ENDPOINT`` is set (the huggingface_hub convention), read per call."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_ENDPOINT


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def _check_complete(task: Task) -> None:
    folder = Path(task.path)
    if task.type == "winogavil":
        problem = winogavil.problem(folder)
        if problem:
            raise OSError(f"{problem} after the download")
        winogavil.check_set(folder)
        return
    nshards_file = folder / "test" / "nshards.txt"
    if not nshards_file.exists():
        raise OSError("no test/nshards.txt: not a DataComp webdataset set")
    nshards = int(nshards_file.read_text().strip())
    missing = [f"test/{i}.tar" for i in range(nshards) if not (folder / "test" / f"{i}.tar").exists()]
    if missing:
        raise OSError(f"{len(missing)} of {nshards} shard(s) missing after the download "
                      f"({', '.join(missing[:5])}); the repo lists fewer files than nshards.txt announces")


def refuse_offline_mode() -> None:
    """Stop before any task when huggingface_hub is in offline mode (``HF_HUB_OFFLINE``, read once when
    huggingface_hub is imported): every task would fail alike, and the Makefile exports it so that the
    offline demo never reaches the hub."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise DownloadError(
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE is set; the Makefile exports HF_HUB_OFFLINE=1 "
            "for the offline demo), so nothing can be downloaded: run the download with HF_HUB_OFFLINE=0, e.g. "
            "`HF_HUB_OFFLINE=0 .venv/bin/amorlip evalsets download datacomp --root ...`, or the pipeline as "
            "`HF_HUB_OFFLINE=0 .venv/bin/snakemake ...`")


def download_task(task: Task, endpoint: str | None = None, token: str | None = None, progress: bool = True) -> int:
    """Fetch one task (webdataset shards, or WinoGAViL's CSV + image zip) into ``task.path`` through the
    hub; return the number of files fetched."""
    from huggingface_hub import snapshot_download

    folder = Path(task.path)
    folder.mkdir(parents=True, exist_ok=True)
    before = _files(folder)
    patterns = {"classification": _CLASSIFICATION_FILES, "winogavil": list(winogavil.FILES)}.get(task.type,
                                                                                            _RETRIEVAL_FILES)
    snapshot_download(repo_id=task.source, repo_type="dataset", local_dir=folder, allow_patterns=patterns,
                      endpoint=endpoint or default_endpoint(), token=token, max_workers=4)
    if task.type == "retrieval" and not (folder / "dataset_type.txt").exists():
        (folder / "dataset_type.txt").write_text("retrieval\n")  # what clip_benchmark needs to read it as one
    _check_complete(task)
    after = _files(folder)
    return sum(1 for name, st in after.items() if before.get(name) != st)


def download_suite(suite: str, root: str | os.PathLike, tasks: Iterable[str] | None = None,
                   endpoint: str | None = None, token: str | None = None, progress: bool = True) -> dict[str, str]:
    """Download a suite's eval sets under ``root``; return ``{task key: status}``.

    ``tasks`` selects task keys (default: all); ``endpoint`` defaults to :func:`default_endpoint`,
    ``token`` to huggingface_hub's own (``HF_TOKEN``, the login). Tasks that cannot be evaluated by
    this project (FairFace/UTKFace, which have no main metric) are skipped with their reason. Every task is attempted; if any failed, :class:`DownloadError` lists them at the end
    (what did download stays, and a rerun resumes).
    """
    if suite != "datacomp":
        raise ValueError(f"suite '{suite}' has nothing to download (only 'datacomp'; the demo's sets are built locally)")
    refuse_offline_mode()
    endpoint = endpoint or default_endpoint()
    suite_def = datacomp_suite(root)
    selected = list(suite_def.tasks)
    if tasks:
        wanted = list(tasks)
        known = {t.key for t in selected}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            raise ValueError(f"unknown DataComp task(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        selected = [t for t in selected if t.key in wanted]
    status: dict[str, str] = {}
    failed: dict[str, str] = {}
    for i, task in enumerate(selected, 1):
        if task.unsupported:
            status[task.key] = f"skipped: {task.unsupported}"
            log.info("[%d/%d] %s skipped: %s", i, len(selected), task.key, task.unsupported)
            continue
        try:
            n = download_task(task, endpoint=endpoint, token=token, progress=progress)
        except Exception as exc:  # noqa: BLE001 -- hub, HTTP and file errors alike: report, try the next task
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            failed[task.key] = f"{task.source}: {type(exc).__name__}: {first_line}"
            status[task.key] = f"failed: {failed[task.key]}"
            log.error("[%d/%d] %s failed: %s", i, len(selected), task.key, failed[task.key])
            continue
        status[task.key] = "downloaded" if n else "complete"
        log.info("[%d/%d] %s: %s (%d file(s) fetched) -> %s", i, len(selected), task.key, status[task.key], n, task.path)
    free = shutil.disk_usage(Path(root)).free if Path(root).exists() else None
    ready = sum(s in ("downloaded", "complete") for s in status.values())
    log.info("%d task(s) ready, %d skipped, %d failed under %s (from %s)%s", ready,
             sum(s.startswith("skipped") for s in status.values()), len(failed), root, endpoint,
             f" ({free / 1e9:.1f} GB free)" if free is not None else "")
    if failed:
        raise DownloadError("could not download: " + "; ".join(f"{k} ({v})" for k, v in failed.items())
                            + ". Rerun the same command to resume (a mirror: HF_ENDPOINT; a gated repo: HF_TOKEN).")
    return status
