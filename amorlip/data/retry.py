"""Re-attempt the failed urls of a downloaded shard set, for chosen failure reasons only.

``amorlip retry-failed --config C --dataset D --reasons timeout,5xx,dns`` reads the rows that
img2dataset marked failed (``status`` / ``error_message`` of each ``NNNNN.parquet``), keeps those
whose reason (:func:`amorlip.data.download.failure_reason`) is selected and that no earlier retry
re-attempted already, and downloads them with the same settings as extra shards numbered after the
last one. Each retried row carries the key of the row it re-attempts and of the url's first row
(:mod:`amorlip.data.accounting`), so the index counts every url once: a url that succeeds on retry
moves from failed to success, one that fails again is counted by its new reason. The index
(sizes.json, manifest.json) is written again at the end, so the loader reads the new samples.

Transient failures are the ones worth retrying: ``timeout``, ``5xx`` (any ``http_5NN``), ``dns``,
``connection``, ``truncated``; a reason name (``http_429``) selects just that one. A 404 or a page
that is not an image fails the same way again.

The retry downloads into ``retry.tmp/`` inside the shard folder (a stop resumes there with the same
selection) and moves each finished shard in, its stats file last: a shard without stats is not
part of the set, and the next retry removes it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from amorlip.data.accounting import ORIGIN_COL, RETRY_OF_COL, final_outcomes

log = logging.getLogger(__name__)

REASON_GROUPS = {"5xx": re.compile(r"^http_5\d\d$"), "4xx": re.compile(r"^http_4\d\d$")}
TRANSIENT = ("timeout", "5xx", "dns", "connection", "truncated")
RETRY_DIR = "retry.tmp"


def reason_selector(names: Iterable[str]):
    """A predicate on short failure reasons: groups (``5xx``, ``4xx``) or exact names (``timeout``)."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"--reasons names no failure reason (e.g. {','.join(TRANSIENT)})")
    groups = [REASON_GROUPS[n] for n in names if n in REASON_GROUPS]
    exact = {n for n in names if n not in REASON_GROUPS}
    return lambda reason: reason in exact or any(g.match(reason) for g in groups)


def _failed_rows(shards_dir: Path, keys: Mapping[str, str], shards: Iterable[str]):
    """The parquet rows of ``keys`` (failed row key -> its url's first key) as one url list."""
    import pandas as pd

    from amorlip.data.download import _RESERVED_COLUMNS

    frames = []
    for shard in shards:
        table = pd.read_parquet(shards_dir / f"{shard}.parquet")
        table = table[table["key"].isin(keys)]
        if len(table):
            frames.append(table)
    rows = pd.concat(frames, ignore_index=True).sort_values("key", kind="stable")
    extras = [c for c in rows.columns if c not in _RESERVED_COLUMNS and c not in (RETRY_OF_COL, ORIGIN_COL)]
    out = rows[["url", "caption", *extras]].copy()
    out[RETRY_OF_COL] = rows["key"].to_numpy()
    out[ORIGIN_COL] = [keys[k] for k in rows["key"]]
    return out.reset_index(drop=True)


def _origins(shards_dir: Path, retries: list[str]) -> dict[str, str]:
    """Key of a retry row -> key of its url's row in the first download."""
    import pyarrow.parquet as pq

    out = {}
    for shard in retries:
        rows = pq.read_table(shards_dir / f"{shard}.parquet", columns=["key", ORIGIN_COL]).to_pydict()
        out.update(zip(rows["key"], rows[ORIGIN_COL], strict=True))
    return out


def _drop_leftovers(shards_dir: Path, finished: Iterable[str]) -> None:
    """Files of shards without stats (a retry stopped while moving them in): not part of the set."""
    finished = set(finished)
    for path in shards_dir.iterdir():
        m = re.match(r"^(\d+)(\.tar|\.parquet)$", path.name)
        if m and m.group(1) not in finished:
            log.warning("retry: removing %s (a shard without stats, left by an interrupted retry)", path)
            path.unlink()


def retry_failed(config: Mapping[str, Any], dataset: str, shards_dir: str | os.PathLike,
                 reasons: Iterable[str]) -> dict:
    """Download again the failed urls of ``shards_dir`` whose reason is selected; re-index; return counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amorlip.data.download import check_against_plan, download, read_stats, write_index
    from amorlip.data.parts import FIRST_SHARD_KEY

    shards_dir = Path(shards_dir)
    selected = reason_selector(reasons)
    stats = {s: st for s, st in read_stats(shards_dir).items() if (shards_dir / f"{s}.tar").exists()}
    if not stats:
        raise ValueError(f"retry {dataset}: no finished shards in {shards_dir}; run the download first")
    _drop_leftovers(shards_dir, stats)
    plan, originals, retries = check_against_plan(shards_dir, stats, dataset)
    outcomes = final_outcomes(shards_dir, originals, retries, stats)
    origins = _origins(shards_dir, retries)
    picked = {key: origins.get(key, key) for key, (_, reason) in outcomes["failed_keys"].items() if selected(reason)}
    available = Counter(reason for _, reason in outcomes["failed_keys"].values())
    if not picked:
        log.info("retry %s: no failed url has a selected reason (failures now: %s)", dataset,
                 ", ".join(f"{k}={v}" for k, v in available.most_common()) or "none")
        return {"retried": 0, "recovered": 0, "failures": dict(available)}
    table = _failed_rows(shards_dir, picked, sorted(stats))
    first = max(int(s) for s in stats) + 1
    work = shards_dir / RETRY_DIR
    urls = work / "urls.parquet"
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[FIRST_SHARD_KEY] = str(first).encode()
    if urls.exists() and not pq.read_table(urls).equals(arrow.replace_schema_metadata(meta)):
        shutil.rmtree(work)  # an interrupted retry of another selection: start this one afresh
    work.mkdir(exist_ok=True)
    pq.write_table(arrow.replace_schema_metadata(meta), urls)
    log.info("retry %s: %d failed url(s) (%s) -> shards from %05d", dataset, len(table),
             ", ".join(f"{k}={v}" for k, v in Counter(outcomes["failed_keys"][k][1] for k in picked).most_common()),
             first)
    summary = download(config, dataset, urls=urls, out_dir=work / "shards")
    for shard in sorted(read_stats(work / "shards")):
        for suffix in (".parquet", ".tar", "_stats.json"):  # stats last: before it the shard is not in the set
            src = work / "shards" / f"{shard}{suffix}"
            if src.exists():
                os.replace(src, shards_dir / src.name)
    shutil.rmtree(work)
    manifest = write_index(config, dataset, shards_dir)
    log.info("retry %s: %d of %d retried url(s) now succeed; %d samples, %d failed in all",
             dataset, summary["successes"], len(table), manifest["samples"], manifest["failed"])
    return {"retried": len(table), "recovered": int(summary["successes"]), "failures": manifest["failures"],
            "samples": manifest["samples"]}
