"""Fan-out of one url list over N download jobs, and the merge of their shards into one set.

``datasets.<name>.parts: N`` splits ``resources/{dataset}/urls.parquet`` into N part lists
(:func:`split_urls`), one ``amorlip download`` job per part (on a cluster each its own SLURM job),
and :func:`merge_parts` puts the parts' shards into ``data/{dataset}/shards``, which the index then
reads as it reads a single download.

The split is at shard boundaries: part ``p`` holds the rows of whole shards ``first .. first+n-1``
of the full list, and its download numbers its shards from ``first`` (the part list carries it in
its parquet metadata, :func:`first_shard_of`; img2dataset's reader is started at that id). A
part's shards therefore have exactly the names and sample keys (img2dataset's ``compute_key``: shard
id, then the row's offset) that a single download of the whole list gives them: names stay unique
and dense across parts, and the data-order contract of docs/architecture.md (shards in key order,
``samples_sha256``) is the same whatever N is.

The merge hard-links (or copies, across file systems) each part's ``NNNNN.tar``, ``NNNNN.parquet``
and ``NNNNN_stats.json`` into the shard folder, writes the full list's ``download.plan`` (the index
checks the set against it) and ``download.parts`` (which shard range each part downloaded; the
index reports success rates per part from it). It refuses parts that are incomplete, that were
downloaded from another split, or that do not cover the list exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from amorlip.fileio import atomic_write_text

log = logging.getLogger(__name__)

# parquet schema metadata keys of a part list: the id of its first shard in the full list, and the
# folder (relative to the part's) that scheme-less urls are paths in: the full list's folder
FIRST_SHARD_KEY = b"amorlip.first_shard"
LOCAL_ROOT_KEY = b"amorlip.local_root"
# not *.json: img2dataset takes every *.json in an output folder for a shard's stats
PARTS_FILE = "download.parts"
SHARD_SUFFIXES = (".tar", ".parquet", "_stats.json")


def part_names(parts: int) -> list[str]:
    """``["000", "001", ...]``: the part wildcard values of a dataset with ``parts`` parts."""
    return [f"{i:03d}" for i in range(parts)]


def shard_ranges(n_rows: int, per_shard: int, parts: int) -> list[tuple[int, int]]:
    """``[(first_shard, n_shards), ...]`` per part: the list's shards dealt out as evenly as possible."""
    n_shards = math.ceil(n_rows / per_shard)
    if parts > n_shards:
        raise ValueError(f"parts: {parts} is more than the {n_shards} shard(s) of the list ({n_rows} urls, "
                         f"{per_shard} per shard); every part needs at least one shard. Lower `parts` or "
                         "`samples_per_shard`")
    base, extra = divmod(n_shards, parts)
    out, first = [], 0
    for p in range(parts):
        n = base + (p < extra)
        out.append((first, n))
        first += n
    return out


def first_shard_of(urls: str | os.PathLike) -> int:
    """The first shard id of a part list (0 for a whole list, which carries no such metadata)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(urls).metadata or {}
    return int(meta[FIRST_SHARD_KEY]) if FIRST_SHARD_KEY in meta else 0


def local_root_of(urls: str | os.PathLike) -> Path:
    """The folder that the list's scheme-less urls (local files, the emoji demo) are relative to:
    the list's own folder, or for a part list the full list's folder."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(urls).metadata or {}
    folder = Path(urls).resolve().parent
    return (folder / meta[LOCAL_ROOT_KEY].decode()).resolve() if LOCAL_ROOT_KEY in meta else folder


def split_urls(config: Mapping[str, Any], dataset: str, urls: str | os.PathLike,
               out_dir: str | os.PathLike) -> list[dict]:
    """Write ``out_dir/NNN.parquet`` per part (rows of whole shards, first shard id in the metadata).

    Returns one ``{"part", "first_shard", "shards", "urls"}`` per part, also written to
    ``out_dir/parts.json``.
    """
    import pyarrow.parquet as pq

    ds = config["datasets"][dataset]
    parts, per_shard = int(ds["parts"]), int(ds["samples_per_shard"])
    table = pq.read_table(urls)
    if table.num_rows == 0:
        raise ValueError(f"{urls}: the url list is empty")
    ranges = shard_ranges(table.num_rows, per_shard, parts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # relative, so the workdir may move; local urls keep meaning paths next to the full list
    local_root = os.path.relpath(local_root_of(urls), out_dir.resolve())
    listing = []
    for name, (first, n) in zip(part_names(parts), ranges, strict=True):
        rows = table.slice(first * per_shard, n * per_shard)
        meta = dict(rows.schema.metadata or {})
        meta[FIRST_SHARD_KEY] = str(first).encode()
        meta[LOCAL_ROOT_KEY] = local_root.encode()
        path = out_dir / f"{name}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(rows.replace_schema_metadata(meta), tmp)
        os.replace(tmp, path)
        listing.append({"part": name, "first_shard": first, "shards": n, "urls": rows.num_rows})
        log.info("split %s: part %s = shards %05d..%05d (%d urls) -> %s",
                 dataset, name, first, first + n - 1, rows.num_rows, path)
    atomic_write_text(out_dir / "parts.json", json.dumps(listing, indent=1))
    return listing


def read_parts(shards_dir: str | os.PathLike) -> list[dict] | None:
    """The ``download.parts`` of a merged shard folder, or None for a single download."""
    path = Path(shards_dir) / PARTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy holds the same bytes
        shutil.copy2(src, dst)


def merge_parts(config: Mapping[str, Any], dataset: str, urls: str | os.PathLike,
                part_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Link the shards of every part folder into ``out_dir`` as one set; return the merge summary.

    ``urls`` is the full list (its plan is what the index checks the merged set against);
    ``part_dirs`` are the parts' shard folders in part order.
    """
    import pandas as pd

    from amorlip.data.download import PLAN_FILE, list_plan, read_plan, read_stats

    ds = config["datasets"][dataset]
    per_shard = int(ds["samples_per_shard"])
    table = pd.read_parquet(urls, columns=["url"])
    full = list_plan(table, per_shard)
    out_dir = Path(out_dir)
    part_dirs = [Path(p) for p in part_dirs]
    listing, problems, next_shard = [], [], 0
    for p, folder in enumerate(part_dirs):
        plan = read_plan(folder)
        if plan is None:
            problems.append(f"{folder}: no {PLAN_FILE} (its download never started)")
            continue
        first = int(plan.get("first_shard", 0))
        if first != next_shard:
            problems.append(f"{folder}: starts at shard {first:05d}, expected {next_shard:05d} "
                            "(parts of another split)")
        stats = read_stats(folder)
        shards = [f"{first + i:05d}" for i in range(int(plan["shards"]))]
        missing = [s for s in shards if s not in stats or not (folder / f"{s}.tar").exists()]
        if missing:
            problems.append(f"{folder}: {len(missing)} unfinished shard(s) ({', '.join(missing[:5])}); "
                            "run its download again")
        listing.append({"part": f"{p:03d}", "first_shard": first, "shards": len(shards), "urls": int(plan["urls"])})
        next_shard = first + len(shards)
    covered = sum(part["urls"] for part in listing)
    if not problems and (next_shard != full["shards"] or covered != full["urls"]):
        problems.append(f"the parts hold {covered} urls in {next_shard} shards but {urls} has {full['urls']} "
                        f"urls in {full['shards']} shards (parts of another list: split it again)")
    if problems:
        raise ValueError(f"merge {dataset}: " + "; ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder, part in zip(part_dirs, listing, strict=True):
        for i in range(part["shards"]):
            shard = f"{part['first_shard'] + i:05d}"
            for suffix in SHARD_SUFFIXES:
                src = folder / f"{shard}{suffix}"
                if src.exists():  # a shard's parquet may be absent (img2dataset without it)
                    _link(src, out_dir / src.name)
    atomic_write_text(out_dir / PLAN_FILE, json.dumps(full))
    atomic_write_text(out_dir / PARTS_FILE, json.dumps(listing, indent=1))
    log.info("merge %s: %d part(s), %d shards, %d urls -> %s", dataset, len(listing), full["shards"],
             full["urls"], out_dir)
    return {"parts": listing, **full}
