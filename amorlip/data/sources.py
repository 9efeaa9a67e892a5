"""Url-list sources (CC3M, CC12M, LAION-style lists) -> ``resources/{dataset}/urls.parquet``.

The parquet is what img2dataset reads: ``url`` and ``caption`` plus any other columns of the list.
Bad rows are never dropped silently: empty urls cannot be downloaded and are left out of the
parquet, but counted; duplicates and non-http urls stay in (img2dataset counts them as failures,
so the manifest accounts for them) and are counted too. The counts go to ``<out>.stats.json`` so
the report can say how much of a list was usable.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from amorlip.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".txt": "txt",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")


def infer_format(path: str | os.PathLike) -> str:
    """The list's format from its extension, ignoring a compression suffix (``.tsv.gz`` -> tsv)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    if suffixes and suffixes[-1] in _EXTENSIONS:
        return _EXTENSIONS[suffixes[-1]]
    raise ValueError(
        f"cannot tell the format of url list {path} from its extension; set input_format "
        f"(one of tsv, csv, parquet, jsonl, txt)"
    )


def read_url_list(
    path: str | os.PathLike, fmt: str = "auto", column_names: list[str] | None = None
) -> pd.DataFrame:
    """Read a url list as strings (no NA conversion, so an empty url stays an empty string)."""
    fmt = infer_format(path) if fmt == "auto" else fmt
    if column_names is not None and fmt not in ("tsv", "csv"):
        raise ValueError(
            f"column_names applies to headerless tsv/csv lists only; {path} is read as {fmt}, "
            "which names its own columns"
        )
    if fmt in ("tsv", "csv"):
        header = None if column_names is not None else "infer"
        kwargs: dict[str, Any] = {
            "dtype": str,
            "keep_default_na": False,
            "header": header,
            "names": column_names,
        }
        if fmt == "tsv":
            # captions in CC3M/CC12M contain bare quotes; tsv has no quoting
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
        return pd.read_csv(path, **kwargs)
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if fmt == "txt":
        with open(path, encoding="utf-8") as fh:
            urls = [line.rstrip("\r\n") for line in fh]
        return pd.DataFrame({"url": urls})
    raise ValueError(f"unknown url-list format '{fmt}' (use tsv, csv, parquet, jsonl or txt)")


def _require_column(frame: pd.DataFrame, column: str, role: str, path: str) -> None:
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns))
        hint = " (a headerless list needs datasets.<name>.column_names, e.g. [caption, url] for CC3M)"
        raise ValueError(f"{role} column '{column}' not found in {path}; columns found: {found}{hint}")


def normalise_urls(
    frame: pd.DataFrame, url_col: str, caption_col: str | None, path: str
) -> tuple[pd.DataFrame, dict]:
    """Rename to ``url`` / ``caption``, drop empty urls, and count what img2dataset will reject."""
    _require_column(frame, url_col, "url", path)
    if caption_col is not None:
        _require_column(frame, caption_col, "caption", path)
    frame = frame.rename(columns={url_col: "url", **({caption_col: "caption"} if caption_col else {})})
    if "caption" not in frame.columns:
        frame["caption"] = ""
    urls = frame["url"].astype("string").fillna("").str.strip()
    frame["url"] = urls
    frame["caption"] = frame["caption"].astype("string").fillna("")
    empty = urls == ""
    kept = frame[~empty].reset_index(drop=True)
    lowered = kept["url"].str.lower()
    stats = {
        "rows": int(len(frame)),
        "written": int(len(kept)),
        "empty_url": int(empty.sum()),
        "duplicate_url": int(kept["url"].duplicated().sum()),
        "non_http": int((~(lowered.str.startswith("http://") | lowered.str.startswith("https://"))).sum()),
    }
    columns = ["url", "caption"] + [c for c in kept.columns if c not in ("url", "caption")]
    return kept[columns], stats


def write_url_parquet(config: Mapping[str, Any], dataset: str, out: str | os.PathLike) -> dict:
    """Read ``datasets.<dataset>.url_list`` and write ``out`` (parquet) and ``<out>.stats.json``.

    Returns the stats: rows read, rows written, and counts of empty, duplicate and non-http urls.
    """
    ds = config["datasets"][dataset]
    if ds["source"] != "url_list":
        raise ValueError(f"dataset '{dataset}' has source '{ds['source']}', not 'url_list'")
    path = ds["url_list"]
    fmt = infer_format(path) if ds["input_format"] == "auto" else ds["input_format"]
    frame = read_url_list(path, fmt, ds.get("column_names"))
    caption_col = None if fmt == "txt" else ds["caption_col"]
    url_col = "url" if fmt == "txt" else ds["url_col"]
    kept, stats = normalise_urls(frame, url_col, caption_col, str(path))
    out = Path(out)
    buffer = io.BytesIO()
    kept.to_parquet(buffer, index=False)
    atomic_write_bytes(out, buffer.getvalue())
    atomic_write_json(Path(f"{out}.stats.json"), stats)
    log.info(
        "url list %s (%s): %d rows, %d written, %d empty urls left out, %d duplicates, %d non-http -> %s",
        path,
        fmt,
        stats["rows"],
        stats["written"],
        stats["empty_url"],
        stats["duplicate_url"],
        stats["non_http"],
    )
    if stats["empty_url"]:
        log.warning("%d rows of %s have an empty url and were left out", stats["empty_url"], path)
    if fmt == "txt":
        log.warning("%s is a plain url list: captions are empty, which contrastive training cannot use", path)
    return stats
