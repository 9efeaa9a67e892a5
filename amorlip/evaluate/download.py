"""Download the DataComp evaluation sets into the folder layout the ``datacomp`` suite reads.

For users with internet; evaluation itself is offline once the files are local. Each webdataset
task comes from its Hugging Face dataset repo as DataComp's ``download_evalsets.py`` fetches it
(``djghosh/wds_<task>_test``: ``classnames.txt``, ``zeroshot_classification_templates.txt``,
``test/nshards.txt``, ``test/{i}.tar``; retrieval sets add ``dataset_type.txt``). That
covers the classification sets and the WILDS / fairness sets (their ``.npy`` metadata is inside the
shards). Flickr and MSCOCO, which DataComp reads through HF ``datasets``, come from clip_benchmark's
webdataset copies of the same test splits (``clip-benchmark/wds_flickr30k``,
``clip-benchmark/wds_mscoco_captions``). WinoGAViL needs HF ``datasets`` and DataComp's own
evaluation; it is not downloaded and is reported as missing.

Plain ``urllib``: every file streams to ``<name>.part`` and is renamed when complete, so a file that
exists is complete; an interrupted ``.part`` resumes with an HTTP Range request where the server
allows it. Re-running skips what is already there.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from amorlip.evaluate.suites import Task, datacomp_suite

log = logging.getLogger(__name__)

HF_DATASETS = "https://huggingface.co/datasets"


def default_base_url() -> str:
    """HF's datasets URL, or a mirror's when ``HF_ENDPOINT`` is set (the huggingface_hub convention)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return f"{endpoint.rstrip('/')}/datasets" if endpoint else HF_DATASETS
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Some tasks could not be downloaded (the message lists them and why)."""


def file_url(base_url: str, repo: str, name: str) -> str:
    """``<base>/<repo>/resolve/main/<name>``: HF's download URL (LFS files included)."""
    return f"{base_url.rstrip('/')}/{repo}/resolve/main/{name}"


def fetch(url: str, dest: str | Path, timeout: float = 60.0, progress: bool = True) -> bool:
    """Download ``url`` to ``dest`` unless ``dest`` exists; return True if bytes were fetched.

    Streams to ``dest.part`` and renames at the end; a leftover ``.part`` resumes (HTTP Range) when
    the server answers 206, and restarts otherwise. A short body (fewer bytes than
    Content-Length) raises, leaving the ``.part`` for the next attempt.
    """
    dest = Path(dest)
    if dest.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "amorlip-evalsets"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        resumed = offset and resp.status == 206
        if not resumed:
            offset = 0
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as fh, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, desc=dest.name,
            disable=not progress, leave=False,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise OSError(f"{url}: got {size} of {expected} bytes (rerun to resume)")
    os.replace(part, dest)
    return True


def _fetch_optional(url: str, dest: Path, timeout: float) -> bool:
    try:
        fetch(url, dest, timeout=timeout, progress=False)
        return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def download_task(task: Task, base_url: str = HF_DATASETS, timeout: float = 60.0, progress: bool = True) -> int:
    """Fetch one webdataset task into ``task.path``; return the number of files fetched."""
    folder = Path(task.path)
    fetched = 0
    if task.type == "classification":
        for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
            fetched += fetch(file_url(base_url, task.source, name), folder / name, timeout, progress=False)
    else:
        # clip_benchmark reads a set without dataset_type.txt as classification. Classification sets
        # deliberately go without it, as DataComp downloads them (a "multilabel" type would change
        # what the loader returns and the metric DataComp reports).
        if _fetch_optional(file_url(base_url, task.source, "dataset_type.txt"), folder / "dataset_type.txt", timeout):
            fetched += 1
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "dataset_type.txt").write_text("retrieval\n")
    fetched += fetch(file_url(base_url, task.source, "test/nshards.txt"), folder / "test" / "nshards.txt",
                     timeout, progress=False)
    nshards = int((folder / "test" / "nshards.txt").read_text().strip())
    for i in range(nshards):
        fetched += fetch(file_url(base_url, task.source, f"test/{i}.tar"), folder / "test" / f"{i}.tar",
                         timeout, progress=progress)
    return fetched


def download_suite(suite: str, root: str | os.PathLike, tasks: Iterable[str] | None = None,
                   base_url: str | None = None, timeout: float = 60.0, progress: bool = True) -> dict[str, str]:
    """Download a suite's eval sets under ``root``; return ``{task key: status}``.

    ``tasks`` selects task keys (default: all); ``base_url`` defaults to :func:`default_base_url`.
    Tasks that cannot be evaluated by this project (WinoGAViL; FairFace/UTKFace, which have no main
    metric) are skipped with their reason. Every
    task is attempted; if any failed, :class:`DownloadError` lists them at the end (what did
    download stays, and a rerun resumes).
    """
    if suite != "datacomp":
        raise ValueError(f"suite '{suite}' has nothing to download (only 'datacomp'; the demo's sets are built locally)")
    base_url = base_url or default_base_url()
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
            n = download_task(task, base_url=base_url, timeout=timeout, progress=progress)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            failed[task.key] = f"{type(exc).__name__}: {exc}"
            status[task.key] = f"failed: {failed[task.key]}"
            log.error("[%d/%d] %s failed: %s", i, len(selected), task.key, failed[task.key])
            continue
        status[task.key] = "downloaded" if n else "complete"
        log.info("[%d/%d] %s: %s (%d file(s) fetched) -> %s", i, len(selected), task.key, status[task.key], n, task.path)
    free = shutil.disk_usage(Path(root)).free if Path(root).exists() else None
    log.info("%d task(s) ready, %d skipped, %d failed under %s%s", sum(s in ("downloaded", "complete") for s in status.values()),
             sum(s.startswith("skipped") for s in status.values()), len(failed), root,
             f" ({free / 1e9:.1f} GB free)" if free is not None else "")
    if failed:
        raise DownloadError("could not download: " + "; ".join(f"{k} ({v})" for k, v in failed.items())
                            + ". Rerun the same command to resume.")
    return status
