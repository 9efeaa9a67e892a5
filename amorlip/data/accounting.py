"""Each url's final outcome over a shard set: the download's shards, then the retries of failed urls.

A url of the list ends in exactly one row that counts: its row in the shard of the first download,
unless a retry (:mod:`amorlip.data.retry`) re-attempted it. A retry shard's rows carry two extra
columns (they travel through img2dataset's ``save_additional_columns`` into its ``NNNNN.parquet``):
``amorlip_retry_of``, the key of the failed row it re-attempts (that row no longer counts), and
``amorlip_origin``, the key of the url's row in the first download (to credit the outcome to the
shard, and so the part, the url belongs to). A url retried twice has two superseded rows and one
that counts; nothing is counted twice, and successes + failures = urls of the list exactly.

Per part (``download.parts`` of a fan-out, else the whole set as one part) the success rate is
checked against ``datasets.<name>.min_success_rate``: below it the index stops with the part and its
rate named, since a part far below the others usually means its node's DNS resolver was throttled.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RETRY_OF_COL = "amorlip_retry_of"
ORIGIN_COL = "amorlip_origin"
DNS_ADVICE = "https://github.com/rom1504/img2dataset#setting-up-a-high-performance-dns-resolver"


def is_retry_shard(shards_dir: str | os.PathLike, shard: str) -> bool:
    """True when ``shard``'s parquet holds rows a retry wrote (the ``amorlip_retry_of`` column)."""
    import pyarrow.parquet as pq

    path = Path(shards_dir) / f"{shard}.parquet"
    return path.exists() and RETRY_OF_COL in pq.read_schema(path).names


def final_outcomes(shards_dir: str | os.PathLike, originals: Sequence[str], retries: Sequence[str],
                   stats: Mapping[str, Mapping[str, Any]]) -> dict:
    """Successes per original shard and the failures that still count (``key -> (shard, reason)``).

    ``originals`` are the shards of the list itself, ``retries`` those a retry added. A shard of the
    list without its parquet (img2dataset can be told not to write one) is counted from its stats:
    its failures have no keys and cannot be retried.
    """
    import pyarrow.parquet as pq

    from amorlip.data.download import failure_reason

    shards_dir = Path(shards_dir)
    successes: Counter = Counter()
    failed: dict[str, tuple[str, str]] = {}
    keyless: Counter = Counter()  # (shard, reason) of failures known from the stats only
    for shard in originals:
        path = shards_dir / f"{shard}.parquet"
        if not path.exists():
            successes[shard] += int(stats[shard]["successes"])
            for message, n in stats[shard].get("status_dict", {}).items():
                if message != "success":
                    keyless[(shard, failure_reason(message))] += n
            continue
        rows = pq.read_table(path, columns=["key", "status", "error_message"]).to_pydict()
        for key, status, message in zip(rows["key"], rows["status"], rows["error_message"], strict=True):
            if status == "success":
                successes[shard] += 1
            else:
                failed[key] = (shard, failure_reason(message))
    superseded: set[str] = set()
    for shard in retries:
        cols = ["key", "status", "error_message", RETRY_OF_COL, ORIGIN_COL]
        rows = pq.read_table(shards_dir / f"{shard}.parquet", columns=cols).to_pydict()
        for key, status, message, retry_of, origin in zip(*(rows[c] for c in cols), strict=True):
            if retry_of not in failed or origin not in failed:
                raise ValueError(f"{shards_dir / shard}.parquet: row {key} retries {retry_of} (first downloaded "
                                 f"as {origin}), which is not a failed row of this shard set; the retry shards "
                                 "belong to another download. Delete the retry shards (those whose parquet has "
                                 f"the {RETRY_OF_COL} column) and retry again")
            superseded.add(retry_of)
            home = failed[origin][0]
            if status == "success":
                successes[home] += 1
            else:
                failed[key] = (home, failure_reason(message))
    for key in superseded:
        del failed[key]
    by_shard: dict[str, Counter] = {}
    for home, reason in failed.values():
        by_shard.setdefault(home, Counter())[reason] += 1
    for (home, reason), n in keyless.items():
        by_shard.setdefault(home, Counter())[reason] += n
    return {"successes": successes, "failures": by_shard, "failed_keys": failed, "superseded": len(superseded)}


def part_summaries(parts: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Any],
                   urls_per_shard: Mapping[str, int]) -> list[dict]:
    """Per part: urls, successes, success rate and failures by reason (after retries)."""
    out = []
    for part in parts:
        shards = [f"{part['first_shard'] + i:05d}" for i in range(part["shards"])]
        urls = sum(urls_per_shard[s] for s in shards)
        ok = sum(outcomes["successes"][s] for s in shards)
        reasons = sum((outcomes["failures"].get(s, Counter()) for s in shards), Counter())
        out.append({"part": part["part"], "first_shard": part["first_shard"], "shards": len(shards),
                    "urls": urls, "successes": ok, "success_rate": ok / urls if urls else 0.0,
                    "failures": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))})
    return out


def check_success_floor(dataset: str, parts: Sequence[Mapping[str, Any]], floor: float, shards_dir: Path) -> None:
    """Stop with the parts below ``floor`` named (rate, top failure reasons) and what to do about it."""
    low = [p for p in parts if p["success_rate"] < floor]
    if not low:
        return
    named = "; ".join(
        f"part {p['part']} (shards {p['first_shard']:05d}..{p['first_shard'] + p['shards'] - 1:05d}): "
        f"{p['success_rate']:.1%} of {p['urls']} urls ("
        + (", ".join(f"{k}={v}" for k, v in list(p["failures"].items())[:3]) or "no failures recorded") + ")"
        for p in low)
    raise ValueError(
        f"index {dataset}: success rate below datasets.{dataset}.min_success_rate = {floor:.1%}: {named}. "
        "The usual cause is DNS throttling (many `dns` or `timeout` failures): set up a caching resolver as "
        f"img2dataset advises ({DNS_ADVICE}), then re-attempt the failed urls with "
        f"`amorlip retry-failed --config CONFIG --dataset {dataset} --reasons timeout,5xx,dns` (shards in "
        f"{shards_dir}), or lower min_success_rate if the list is simply that old")
