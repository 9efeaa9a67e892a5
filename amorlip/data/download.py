"""img2dataset download into webdataset shards, and the index (sizes.json, manifest.json) over them.

``download(config, dataset, urls, out_dir)`` turns ``resources/{dataset}/urls.parquet`` into
``NNNNN.tar`` / ``NNNNN.parquet`` / ``NNNNN_stats.json`` shards with the real img2dataset (a part
list of a fan-out, :mod:`amorlip.data.parts`, numbers its shards from its first shard id). Urls
without a scheme are files relative to the list's folder (the emoji demo): a
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
Addresses: only public ones, on every redirect hop, unless ``allowed_networks`` covers them
(:mod:`amorlip.data.guarded_http`); the call's own loopback server is always allowed (its port only).

Every url is accounted for. img2dataset's Ctrl-C handler exits with status 0 and its pool waits
forever for a shard whose worker the kernel killed, so "img2dataset returned" proves nothing.
``download`` runs img2dataset's shards under :mod:`amorlip.data.workers` (a dead worker or a stop
signal ends the call, every child process with it), then counts each url of the list as a success,
a failure by reason, or never attempted (its shard has no stats), and raises
:class:`DownloadIncomplete` naming the latter. ``download.plan`` (url count, shard size, a digest of
the urls) lets ``write_index`` check the shards against the list and refuses to resume a folder that
another list started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from amorlip.data import count_tar_images
from amorlip.data.accounting import check_success_floor, final_outcomes, is_retry_shard, part_summaries
from amorlip.data.loopback import LoopbackFileServer
from amorlip.data.parts import first_shard_of, local_root_of, read_parts
from amorlip.data.reshard import canonicalize_shards
from amorlip.fileio import atomic_write_json, atomic_write_text, partial_dir

log = logging.getLogger(__name__)

URL_COL = "url"
CAPTION_COL = "caption"
# columns img2dataset writes itself and refuses in save_additional_columns
_RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height",
                     "status", "error_message", "exif", "md5", "sha256", "sha512"}
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")
# not *.json: img2dataset takes every *.json in the output folder for a shard's stats
PLAN_FILE = "download.plan"
NOT_ATTEMPTED_FILE = "not_attempted.txt"
_SHOW_URLS = 20


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


@contextlib.contextmanager
def _shards_from(first: int) -> Iterator[None]:
    """Number img2dataset's shards from ``first`` (a part of a fan-out; :mod:`amorlip.data.parts`).

    img2dataset's incremental mode always starts its reader at shard 0; the reader itself takes a
    start id, which names the shard files and enters each sample's key (``compute_key``), so a part's
    shards are those a single download of the whole list writes for the same rows.
    """
    if not first:
        yield
        return
    import importlib

    i2d_main = importlib.import_module("img2dataset.main")  # the module: the package's `main` is a function
    original = i2d_main.Reader

    def reader(*args, **kwargs):
        args = list(args)
        if len(args) != 11:  # the call of img2dataset 1.47's download(); another version: refuse, not guess
            raise RuntimeError(f"img2dataset's Reader was called with {len(args)} positional arguments, not 11: "
                               "this img2dataset version cannot download a part of a fan-out (parts > 1)")
        args[10] = first  # Reader(url_list, ..., done_shards, tmp_path, start_shard_id)
        return original(*args, **kwargs)

    i2d_main.Reader = reader
    try:
        yield
    finally:
        i2d_main.Reader = original


def _expected_shards(n_rows: int, per_shard: int, first: int = 0) -> list[str]:
    """Shard names of a list of ``n_rows`` urls whose first shard is ``first`` (a part of a fan-out)."""
    return [f"{first + i:05d}" for i in range(math.ceil(n_rows / per_shard))]


def read_stats(shards_dir: str | os.PathLike) -> dict[str, dict]:
    """``{"00000": stats, ...}`` for every ``NNNNN_stats.json`` (img2dataset writes it last per shard)."""
    out = {}
    for path in sorted(Path(shards_dir).glob("*_stats.json")):
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


class DownloadIncomplete(RuntimeError):  # noqa: N818 -- the outcome, not a bug: `amorlip download` exits with it
    """Some urls of the list were never attempted (or their shard was cut short); ``urls`` names them."""

    def __init__(self, message: str, urls: list[str], exit_code: int = 1):
        super().__init__(message)
        self.urls, self.exit_code = urls, exit_code


def list_plan(table, per_shard: int, first_shard: int = 0) -> dict:
    """What a complete download of ``table`` holds: url count, shard size, shard count, a digest of the
    urls, and (a part of a fan-out, :mod:`amorlip.data.parts`) the id of its first shard."""
    import pandas as pd

    digest = hashlib.sha256(pd.util.hash_pandas_object(table[URL_COL], index=False).to_numpy().tobytes())
    plan = {"urls": len(table), "samples_per_shard": per_shard,
            "shards": len(_expected_shards(len(table), per_shard)), "url_digest": digest.hexdigest()}
    if first_shard:  # absent for a whole list: plans written before fan-out existed stay equal
        plan["first_shard"] = first_shard
    return plan


def read_plan(shards_dir: str | os.PathLike) -> dict | None:
    """The ``download.plan`` of a shards folder, or None when there is none."""
    path = Path(shards_dir) / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _check_plan(out_dir: Path, plan: dict, dataset: str) -> None:
    old = read_plan(out_dir) if out_dir.is_dir() else None
    if old is not None and old != plan:
        raise ValueError(
            f"download {dataset}: {out_dir} holds shards of another url list or shard size "
            f"({old['urls']} urls, {old['samples_per_shard']} per shard; now {plan['urls']} urls, "
            f"{plan['samples_per_shard']} per shard{', different urls' if old.get('url_digest') != plan['url_digest'] else ''}); "
            f"resuming would mix the two. Delete {out_dir} and run the download again")


def _account(table, out_dir: Path, expected: list[str], per_shard: int, first: int = 0) -> dict:
    """Each url of ``table``: success, failure by reason (finished shards), or not attempted (the others)."""
    stats = {s: st for s, st in read_stats(out_dir).items() if (out_dir / f"{s}.tar").exists()}
    failures: Counter = Counter()
    attempted = successes = 0
    missing: list[str] = []
    for shard in expected:
        if shard not in stats:
            missing.append(shard)
            continue
        attempted += int(stats[shard]["count"])
        successes += int(stats[shard]["successes"])
        failures += _failures(out_dir, shard, stats[shard])
    rows = [int(s) - first for s in missing]
    urls = [u for r in rows for u in table[URL_COL].iloc[r * per_shard:(r + 1) * per_shard]]
    return {"urls": len(table), "attempted": attempted, "successes": successes,
            "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
            "missing_shards": missing, "not_attempted": urls}


def _incomplete(dataset: str, out_dir: Path, acc: dict, cause: str, exit_code: int) -> DownloadIncomplete:
    """The error naming the urls never attempted, with their full list written beside the shards."""
    urls = [str(u) for u in acc["not_attempted"]]
    listing = out_dir / NOT_ATTEMPTED_FILE
    atomic_write_text(listing, "".join(f"{u}\n" for u in urls))
    done = len(read_stats(out_dir))
    shown = ", ".join(u[:200] for u in urls[:_SHOW_URLS]) + (" ..." if len(urls) > _SHOW_URLS else "")
    shards = ", ".join(acc["missing_shards"][:10]) + (" ..." if len(acc["missing_shards"]) > 10 else "")
    if urls:
        message = (f"download {dataset}: {len(urls)} of {acc['urls']} urls were never attempted or their shard "
                   f"was cut short ({cause}); unfinished shard(s): {shards}. Not downloaded: {shown} "
                   f"(all {len(urls)} in {listing}). Run the same command again to download them: the "
                   f"{done} finished shard(s) are kept.")
    else:
        message = (f"download {dataset}: {cause} after every shard had finished; run the same command "
                   f"again (nothing is left to download)")
    return DownloadIncomplete(message, urls, exit_code)


def download(config: Mapping[str, Any], dataset: str, urls: str | os.PathLike,
             out_dir: str | os.PathLike) -> dict:
    """Download ``urls`` (parquet: url, caption, extras) into webdataset shards in ``out_dir``.

    Every url ends as a success or a failure by reason, or the call raises
    :class:`DownloadIncomplete` naming the urls never attempted (a stop signal, a worker the kernel
    killed, a shard that kept failing), after stopping every process it started. Re-running
    resumes: shards whose ``_stats.json`` exists are skipped (img2dataset's incremental mode), and
    when all are there img2dataset is not started at all. Extra columns of the parquet travel into
    each sample's ``.json``. Returns the summary that is also logged (urls, attempted, successes,
    failed, failures by reason, shards, images_per_s).
    """
    import pandas as pd

    from amorlip.data.guarded_http import ALLOWED_ENDPOINTS_ENV, ALLOWED_NETWORKS_ENV, parse_networks

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
    networks = parse_networks(ds["allowed_networks"], f"datasets.{dataset}.allowed_networks")

    per_shard = int(ds["samples_per_shard"])
    first = first_shard_of(urls)  # a part of a fan-out starts at its own shard id
    expected = _expected_shards(len(table), per_shard, first)
    plan = list_plan(table, per_shard, first)
    _check_plan(out_dir, plan, dataset)
    done = read_stats(out_dir) if out_dir.is_dir() else {}
    if expected and all(s in done and (out_dir / f"{s}.tar").exists() for s in expected):
        if read_plan(out_dir) is None:  # shards from before plans existed
            atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan))
        (out_dir / NOT_ATTEMPTED_FILE).unlink(missing_ok=True)
        summary = _summary({s: done[s] for s in expected})
        summary.update(urls=len(table), not_attempted=0)
        log.info("download %s: all %d shards already in %s (%d/%d samples ok); nothing to do",
                 dataset, len(expected), out_dir, summary["successes"], summary["attempted"])
        return summary

    from amorlip.data import workers

    local = table[URL_COL].map(_is_local)
    out_dir.mkdir(parents=True, exist_ok=True)
    if read_plan(out_dir) is None:  # (an existing one equals it: _check_plan)
        atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan))
    t0 = time.time()
    before = {p.pid for p in multiprocessing.active_children()}
    stopped: tuple[str, int] | None = None  # (cause, exit code)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(workers.stop_on_signals())
            stack.callback(workers.stop_children, before)  # runs after everything below has closed
            url_list, endpoints = urls, []
            if local.any():
                root = local_root_of(urls)  # the list's folder (a part list: the full list's)
                server = stack.enter_context(LoopbackFileServer(root, max_bytes=int(ds["max_image_bytes"])))
                endpoints.append(f"{server.host}:{server.port}")  # our own server: allowed, this port only
                served = table.copy()
                served.loc[local, URL_COL] = [server.url_for(Path(u).as_posix())
                                              for u in served.loc[local, URL_COL]]
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amorlip-urls-")))
                url_list = tmp / "urls.parquet"
                served.to_parquet(url_list, index=False)
                log.info("download %s: %d local file url(s) served from %s via %s",
                         dataset, int(local.sum()), root, server.base_url)
            max_pixels = int(ds["max_image_pixels"])
            stack.enter_context(_env(OPENCV_IO_MAX_IMAGE_PIXELS=str(max_pixels),
                                     WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
                                     NO_ALBUMENTATIONS_UPDATE="1",
                                     **{ALLOWED_NETWORKS_ENV: ",".join(str(n) for n in networks),
                                        ALLOWED_ENDPOINTS_ENV: ",".join(endpoints)}))
            from img2dataset import download as img2dataset_download

            from amorlip.data.fetch import patched as bounded_fetch

            stack.enter_context(bounded_fetch(int(ds["max_image_bytes"])))
            stack.enter_context(workers.patched())
            stack.enter_context(_shards_from(first))

            log.info("download %s: %d urls -> %s (%d per shard, %d process(es) x %d threads)",
                     dataset, len(table), out_dir, per_shard, ds["processes"], ds["threads"])
            try:
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
            except SystemExit as exc:  # img2dataset's own Ctrl-C handler exits 0: an interruption all the same
                raise workers.Interrupted(signal.SIGINT) from exc
    except workers.Interrupted as exc:
        stopped = (str(exc), 128 + exc.signum)
    except workers.WorkerDiedError as exc:
        stopped = (str(exc), 1)
    if stopped:
        log.error("download %s: %s", dataset, stopped[0])
        shutil.rmtree(out_dir / "_tmp", ignore_errors=True)  # img2dataset's per-shard url lists

    acc = _account(table, out_dir, expected, per_shard, first)
    stats = {s: st for s, st in read_stats(out_dir).items() if s in expected}
    summary = _summary(stats)
    elapsed = time.time() - t0
    summary.update(call_s=elapsed, urls=acc["urls"], not_attempted=len(acc["not_attempted"]),
                   failures=acc["failures"])
    top = ", ".join(f"{k}={v}" for k, v in list(acc["failures"].items())[:5]) or "none"
    log.info("download %s: %d urls: %d ok, %d failed (%s), %d not attempted; %d shard(s); %.1f images/s while "
             "downloading, %.1f s in all", dataset, acc["urls"], summary["successes"], summary["failed"], top,
             summary["not_attempted"], summary["shards"], summary["images_per_s"], elapsed)
    if stopped or acc["not_attempted"]:
        cause = stopped[0] if stopped else "img2dataset returned without finishing them: see the errors above"
        raise _incomplete(dataset, out_dir, acc, cause, stopped[1] if stopped else 1)
    (out_dir / NOT_ATTEMPTED_FILE).unlink(missing_ok=True)
    return summary


# --------------------------------------------------------------------------- index

_REASONS = [
    # (pattern on img2dataset's error_message, short reason); first match wins
    (re.compile(r"blocked address"), "blocked_address"),  # amorlip.data.guarded_http's address policy
    (re.compile(r"unsupported url scheme"), "bad_url"),  # a listed or redirected url that is not http(s)
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


def check_against_plan(shards_dir: Path, stats: Mapping[str, dict], dataset: str) -> tuple[dict, list, list]:
    """Every url of the list must be in a finished shard: the shards are checked against ``download.plan``.

    Returns the plan, the list's own shards and the retry shards (:mod:`amorlip.data.retry`).
    """
    plan = read_plan(shards_dir)
    if plan is None:
        raise ValueError(f"index {dataset}: {shards_dir} has no {PLAN_FILE}, so nothing says how many urls "
                         "the list had; run `amorlip download` on it again (finished shards are kept; it "
                         "writes the plan and fetches what is missing)")
    expected = _expected_shards(plan["urls"], plan["samples_per_shard"], int(plan.get("first_shard", 0)))
    missing = [s for s in expected if s not in stats]
    # shards beyond the list: those `amorlip retry-failed` added are part of the set, others are not
    extra = sorted(set(stats) - set(expected))
    retries = [s for s in extra if is_retry_shard(shards_dir, s)]
    foreign = [s for s in extra if s not in retries]
    if missing or foreign:
        lost = sum(min(plan["samples_per_shard"], plan["urls"] - int(s) * plan["samples_per_shard"]) for s in missing)
        raise ValueError(
            f"index {dataset}: {shards_dir} lacks {len(missing)} of its {len(expected)} shards "
            f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}): {lost} of the {plan['urls']} "
            f"urls of the list were never downloaded (an interrupted or failed download; see "
            f"{NOT_ATTEMPTED_FILE} there). Run `amorlip download` again to complete it (finished shards are "
            "kept)" + (f"; shards {', '.join(foreign[:10])} are not part of the list: delete them" if foreign else ""))
    attempted = sum(int(stats[s]["count"]) for s in expected)
    if attempted != plan["urls"]:
        raise ValueError(f"index {dataset}: the shards' stats account for {attempted} urls but the list has "
                         f"{plan['urls']}; delete {shards_dir} and download again")
    return plan, expected, retries


def write_index(config: Mapping[str, Any], dataset: str, shards_dir: str | os.PathLike) -> dict:
    """Write ``data/{dataset}/sizes.json`` and ``manifest.json`` from the shards' stats; return the manifest.

    Only shards whose tar exists are indexed. Raises ``ValueError`` when a shard of the url list is
    missing or the stats do not account for every url (``download.plan``), or when a tar's image
    members do not match its stats (an interrupted or edited download), because the loader's epoch
    length and the report's sample counts both rely on sizes.json. Before writing, every tar is put
    in key order (:mod:`amorlip.data.reshard`), so the training data order does not depend on the
    order in which downloads completed; the manifest's ``samples_sha256`` digests the sample set.
    """
    ds = config["datasets"][dataset]
    shards_dir = Path(shards_dir)
    data_dir = Path(config["paths"]["data"]) / dataset
    if not shards_dir.is_dir():
        work = partial_dir(shards_dir)
        if work.is_dir():
            raise ValueError(f"index {dataset}: {shards_dir} does not exist yet: the download is unfinished "
                             f"in {work} ({NOT_ATTEMPTED_FILE} there lists what is left). Run the download "
                             f"again: it resumes there and moves the folder to {shards_dir} when complete")
        raise ValueError(f"index {dataset}: no shards folder {shards_dir}; run the download first")
    stats = {s: st for s, st in read_stats(shards_dir).items() if (shards_dir / f"{s}.tar").exists()}
    unfinished = sorted(p.name for p in shards_dir.glob("*.tar") if p.stem not in stats)
    if unfinished:
        log.warning("index %s: %d tar(s) without stats (interrupted download) are not indexed: %s",
                    dataset, len(unfinished), ", ".join(unfinished[:5]))
    if not stats:
        raise ValueError(f"index {dataset}: no finished shards (NNNNN.tar + NNNNN_stats.json) "
                         f"in {shards_dir}")
    # every url of the list: in a finished shard; retry shards re-attempt some of the failed ones
    plan, originals, retries = check_against_plan(shards_dir, stats, dataset)

    sizes: dict[str, int] = {}
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
    outcomes = final_outcomes(shards_dir, originals, retries, stats)
    failures = sum(outcomes["failures"].values(), Counter())
    parts = read_parts(shards_dir) or [{"part": "all", "first_shard": int(originals[0]), "shards": len(originals)}]
    per_part = part_summaries(parts, outcomes, {s: int(stats[s]["count"]) for s in originals})
    floor = float(ds.get("min_success_rate", 0.0))
    check_success_floor(dataset, per_part, floor, shards_dir)

    # key order inside every tar, so the loader's order does not depend on download timing
    order = canonicalize_shards(shards_dir, stats, stale=(data_dir / "sizes.json", data_dir / "manifest.json"))
    samples = sum(sizes.values())
    failed = sum(failures.values())
    attempted = plan["urls"]
    if samples != sum(outcomes["successes"].values()) or samples + failed != attempted:
        raise ValueError(f"index {dataset}: {samples} images in the tars + {failed} failures != {attempted} urls "
                         f"of the list ({sum(outcomes['successes'].values())} successes in the shards' parquet "
                         f"files): the shards' parquet and tars disagree. Delete {shards_dir} and download again")
    manifest = {
        "dataset": dataset,
        "source": ds["source"],
        "samples": samples,
        "shards": len(sizes),
        "urls": plan["urls"],
        "attempted": attempted,
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failed": failed,
        "success_rate": samples / attempted if attempted else 0.0,
        "parts": per_part,
        "retried": {"shards": len(retries), "superseded": outcomes["superseded"],
                    "recovered": samples - sum(int(stats[s]["successes"]) for s in originals)},
        "paper_samples": ds.get("paper_samples"),
        "image_size": ds["image_size"],
        "samples_sha256": order["samples_sha256"],
    }
    atomic_write_json(data_dir / "sizes.json", sizes)
    atomic_write_json(data_dir / "manifest.json", manifest)
    top = ", ".join(f"{k}={v}" for k, v in list(manifest["failures"].items())[:5]) or "none"
    log.info("index %s: %d samples in %d shards (%d attempted, %d failed: %s) -> %s",
             dataset, samples, len(sizes), attempted, failed, top, data_dir)
    return manifest
