"""img2dataset download into webdataset shards, and the index (sizes.json, manifest.json) over them.

``download(config, dataset, urls, out_dir)`` turns ``resources/{dataset}/urls.parquet`` into
``NNNNN.tar`` / ``NNNNN.parquet`` / ``NNNNN_stats.json`` shards with the real img2dataset. Urls
without a scheme are files relative to the parquet's folder (the emoji demo): a
:class:`~amorlip.data.loopback.LoopbackFileServer` serves that folder on 127.0.0.1 for the duration of
the call, so local data takes exactly the path a CC3M url list takes.

``write_index(config, dataset, shards_dir)`` writes ``data/{dataset}/sizes.json`` (open_clip's
convention: shard basename -> sample count) and ``manifest.json`` (totals and failures grouped by a
short reason), after checking that the stats agree with the image members actually in the tars.

Hostile url lists: img2dataset 1.47 reads each response body whole (``r.read()``), with a timeout per
socket read only, and follows any scheme urllib knows. Its workers therefore fetch through
:mod:`amorlip.data.fetch` instead: http(s) only (``file://`` rows cannot copy local files into the
shards), ``max_image_bytes`` per response (``too_large``) and ``timeout`` for the whole response (a
server that drips bytes is a ``timeout``). The loopback server also answers 413 above the cap. OpenCV
refuses to allocate images above ``max_image_pixels`` (``OPENCV_IO_MAX_IMAGE_PIXELS``, inherited by
img2dataset's spawned workers) and larger decoded images are rejected (``max_image_area``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from amorlip.data.loopback import LoopbackFileServer
from amorlip.fileio import atomic_write_json

log = logging.getLogger(__name__)

URL_COL = "url"
CAPTION_COL = "caption"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# columns img2dataset writes itself and refuses in save_additional_columns
_RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height",
                     "status", "error_message", "exif", "md5", "sha256", "sha512"}
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")


# --------------------------------------------------------------------------- download


def _is_local(url: str) -> bool:
    return urllib.parse.urlsplit(str(url)).scheme == ""


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (img2dataset's spawned workers inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _expected_shards(n_rows: int, per_shard: int) -> list[str]:
    return [f"{i:05d}" for i in range(math.ceil(n_rows / per_shard))]


def _read_stats(shards_dir: Path) -> dict[str, dict]:
    """``{"00000": stats, ...}`` for every ``NNNNN_stats.json`` (img2dataset writes it last per shard)."""
    out = {}
    for path in sorted(shards_dir.glob("*_stats.json")):
        m = _STATS_RE.match(path.name)
        if m:
            with open(path) as fh:
                out[m.group(1)] = json.load(fh)
    return out


def _summary(stats: Mapping[str, dict]) -> dict:
    count = sum(s.get("count", 0) for s in stats.values())
    ok = sum(s.get("successes", 0) for s in stats.values())
    # shards are downloaded in parallel: wall time is start of the first to end of the last
    starts = [s["start_time"] for s in stats.values() if "start_time" in s]
    ends = [s["end_time"] for s in stats.values() if "end_time" in s]
    wall = (max(ends) - min(starts)) if starts and ends else 0.0
    return {"shards": len(stats), "attempted": count, "successes": ok, "failed": count - ok,
            "wall_s": wall, "images_per_s": ok / wall if wall > 0 else 0.0}


def download(config: Mapping[str, Any], dataset: str, urls: str | os.PathLike,
             out_dir: str | os.PathLike) -> dict:
    """Download ``urls`` (parquet: url, caption, extras) into webdataset shards in ``out_dir``.

    Re-running resumes: shards whose ``_stats.json`` exists are skipped (img2dataset's incremental
    mode), and when all are there img2dataset is not started at all. Extra columns of the parquet
    travel into each sample's ``.json``. Returns the summary that is also logged (attempted,
    successes, failed, shards, images_per_s).
    """
    import pandas as pd

    ds = config["datasets"][dataset]
    urls = Path(urls)
    out_dir = Path(out_dir)
    table = pd.read_parquet(urls)
    missing = {URL_COL, CAPTION_COL} - set(table.columns)
    if missing:
        raise ValueError(f"{urls}: missing column(s) {sorted(missing)}; "
                         "`amorlip source` writes url and caption")
    if len(table) == 0:
        raise ValueError(f"{urls}: the url list is empty")
    extras = [c for c in table.columns if c not in (URL_COL, CAPTION_COL)]
    dropped = [c for c in extras if c in _RESERVED_COLUMNS]
    if dropped:
        log.warning("%s: columns %s are reserved by img2dataset and are not kept", urls, dropped)
        extras = [c for c in extras if c not in _RESERVED_COLUMNS]

    per_shard = int(ds["samples_per_shard"])
    expected = _expected_shards(len(table), per_shard)
    done = _read_stats(out_dir) if out_dir.is_dir() else {}
    if expected and all(s in done and (out_dir / f"{s}.tar").exists() for s in expected):
        summary = _summary({s: done[s] for s in expected})
        log.info("download %s: all %d shards already in %s (%d/%d samples ok); nothing to do",
                 dataset, len(expected), out_dir, summary["successes"], summary["attempted"])
        return summary

    local = table[URL_COL].map(_is_local)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        url_list = urls
        if local.any():
            root = urls.resolve().parent
            server = stack.enter_context(LoopbackFileServer(root, max_bytes=int(ds["max_image_bytes"])))
            table = table.copy()
            table.loc[local, URL_COL] = [server.url_for(Path(u).as_posix())
                                         for u in table.loc[local, URL_COL]]
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amorlip-urls-")))
            url_list = tmp / "urls.parquet"
            table.to_parquet(url_list, index=False)
            log.info("download %s: %d local file url(s) served from %s via %s",
                     dataset, int(local.sum()), root, server.base_url)
        max_pixels = int(ds["max_image_pixels"])
        stack.enter_context(_env(OPENCV_IO_MAX_IMAGE_PIXELS=str(max_pixels),
                                 WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
                                 NO_ALBUMENTATIONS_UPDATE="1"))
        from img2dataset import download as img2dataset_download

        from amorlip.data.fetch import patched as bounded_fetch

        stack.enter_context(bounded_fetch(int(ds["max_image_bytes"])))

        log.info("download %s: %d urls -> %s (%d per shard, %d process(es) x %d threads)",
                 dataset, len(table), out_dir, per_shard, ds["processes"], ds["threads"])
        img2dataset_download(
            url_list=str(url_list),
            input_format="parquet",
            url_col=URL_COL,
            caption_col=CAPTION_COL,
            save_additional_columns=extras or None,
            output_folder=str(out_dir),
            output_format="webdataset",
            image_size=int(ds["image_size"]),
            resize_mode=ds["resize_mode"],
            encode_format="jpg",
            number_sample_per_shard=per_shard,
            processes_count=int(ds["processes"]),
            thread_count=int(ds["threads"]),
            timeout=ds["timeout"],
            retries=int(ds["retries"]),
            max_image_area=float(max_pixels),
            enable_wandb=False,
            incremental_mode="incremental",
            # the loopback server sends no X-Robots-Tag; remote urls keep img2dataset's default check
            disallowed_header_directives=[] if local.all() else None,
        )
    stats = {s: st for s, st in _read_stats(out_dir).items() if s in expected}
    summary = _summary(stats)
    elapsed = time.time() - t0
    summary["call_s"] = elapsed
    missing_shards = [s for s in expected if s not in stats]
    if missing_shards:
        log.warning("download %s: %d shard(s) did not finish (%s ...); run again to resume",
                    dataset, len(missing_shards), ", ".join(missing_shards[:5]))
    log.info("download %s: %d/%d samples ok, %d failed, %d shard(s); %.1f images/s while downloading, "
             "%.1f s in all", dataset, summary["successes"], summary["attempted"], summary["failed"],
             summary["shards"], summary["images_per_s"], elapsed)
    return summary


# --------------------------------------------------------------------------- index

_REASONS = [
    # (pattern on img2dataset's error_message, short reason); first match wins
    (re.compile(r"HTTP Error 413"), "too_large"),
    (re.compile(r"HTTP Error (\d{3})"), "http_{0}"),
    (re.compile(r"image decoding error", re.I), "decode_error"),  # not an image, or truncated bytes
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"IncompleteRead|truncated|Remote end closed", re.I), "truncated"),
    (re.compile(r"image area too large|response too large|CV_IO_MAX_IMAGE_PIXELS"), "too_large"),
    (re.compile(r"image too small"), "too_small"),
    (re.compile(r"aspect ratio too large"), "aspect_ratio"),
    (re.compile(r"X-Robots-Tag"), "disallowed"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), "dns"),
    (re.compile(r"CERTIFICATE|SSL", re.I), "ssl"),
    (re.compile(r"Connection refused|Connection reset|Network is unreachable|No route", re.I), "connection"),
    (re.compile(r"unknown url type|no host given|unsupported url scheme", re.I), "bad_url"),
]


def failure_reason(error_message: str | None) -> str:
    """A short, countable reason for one img2dataset error message (e.g. ``http_404``, ``decode_error``)."""
    msg = (error_message or "").strip()
    if not msg:
        return "other: no error message"
    for pattern, reason in _REASONS:
        m = pattern.search(msg)
        if m:
            return reason.format(*m.groups())
    return "other: " + msg.splitlines()[0][:80]


def _failures(shards_dir: Path, shard: str, stats: Mapping[str, Any]) -> Counter:
    """Failure reasons of one shard, from its per-row parquet (or the capped stats counter without it)."""
    import pyarrow.parquet as pq

    path = shards_dir / f"{shard}.parquet"
    reasons: Counter = Counter()
    if path.exists():
        rows = pq.read_table(path, columns=["status", "error_message"]).to_pydict()
        for status, message in zip(rows["status"], rows["error_message"], strict=True):
            if status != "success":
                reasons[failure_reason(message)] += 1
    else:
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                reasons[failure_reason(message)] += n
    return reasons


def count_tar_images(tar_path: str | os.PathLike) -> int:
    """Image members in a shard (headers only; the data is skipped, not read)."""
    with tarfile.open(tar_path, "r") as tf:
        return sum(1 for m in tf if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def write_index(config: Mapping[str, Any], dataset: str, shards_dir: str | os.PathLike) -> dict:
    """Write ``data/{dataset}/sizes.json`` and ``manifest.json`` from the shards' stats; return the manifest.

    Only shards whose tar exists are indexed. Raises ``ValueError`` when a tar's image members do not
    match its stats (an interrupted or edited download), because the loader's epoch length and the
    report's sample counts both rely on sizes.json.
    """
    ds = config["datasets"][dataset]
    shards_dir = Path(shards_dir)
    data_dir = Path(config["paths"]["data"]) / dataset
    stats = {s: st for s, st in _read_stats(shards_dir).items() if (shards_dir / f"{s}.tar").exists()}
    unfinished = sorted(p.name for p in shards_dir.glob("*.tar") if p.stem not in stats)
    if unfinished:
        log.warning("index %s: %d tar(s) without stats (interrupted download) are not indexed: %s",
                    dataset, len(unfinished), ", ".join(unfinished[:5]))
    if not stats:
        raise ValueError(f"index {dataset}: no finished shards (NNNNN.tar + NNNNN_stats.json) "
                         f"in {shards_dir}")

    sizes: dict[str, int] = {}
    failures: Counter = Counter()
    attempted = 0
    for shard, st in sorted(stats.items()):
        name = f"{shard}.tar"
        images = count_tar_images(shards_dir / name)
        if images != int(st["successes"]):
            raise ValueError(
                f"index {dataset}: {shards_dir / name} holds {images} images but its stats report "
                f"{st['successes']} successes; the shard is incomplete or was changed. Delete "
                f"{shard}.tar and {shard}_stats.json and run the download again to refetch it."
            )
        sizes[name] = images
        attempted += int(st["count"])
        failures += _failures(shards_dir, shard, st)

    samples = sum(sizes.values())
    failed = sum(failures.values())
    if samples + failed != attempted:
        log.warning("index %s: %d samples + %d failures != %d attempted (stats and parquet disagree)",
                    dataset, samples, failed, attempted)
    manifest = {
        "dataset": dataset,
        "source": ds["source"],
        "samples": samples,
        "shards": len(sizes),
        "attempted": attempted,
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failed": failed,
        "paper_samples": ds.get("paper_samples"),
        "image_size": ds["image_size"],
    }
    atomic_write_json(data_dir / "sizes.json", sizes)
    atomic_write_json(data_dir / "manifest.json", manifest)
    top = ", ".join(f"{k}={v}" for k, v in list(manifest["failures"].items())[:5]) or "none"
    log.info("index %s: %d samples in %d shards (%d attempted, %d failed: %s) -> %s",
             dataset, samples, len(sizes), attempted, failed, top, data_dir)
    return manifest
