"""Url-list sources (CC3M, CC12M, LAION-style lists) -> ``resources/{dataset}/urls.parquet``.

The parquet is what img2dataset reads: ``url`` and ``caption`` plus any other columns of the list.
Bad rows are never dropped silently: empty urls cannot be downloaded and are left out of the
parquet, but counted; duplicates and non-http urls stay in (img2dataset counts them as failures,
so the manifest accounts for them) and are counted too; NUL bytes are removed and the rows that
held one counted. The counts go to ``<out>.stats.json`` so the report can say how much of a list
was usable. A list that cannot be read as configured raises :class:`UrlListError` naming the file,
the line where there is one, and the fix.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import pandas as pd

from amorlip.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


class UrlListError(ValueError):
    """A url list that cannot be read as configured; the message names the file, the line and the fix."""


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
    raise UrlListError(
        f"cannot tell the format of url list {path} from its extension; set input_format "
        f"(one of tsv, csv, parquet, jsonl, txt)"
    )


def _open_raw(path: Path) -> IO[bytes]:
    """The list's bytes, decompressed as pandas would (by the file's suffix)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard  # pandas needs it for .zst too

        return zstandard.open(path, "rb")
    if suffix == ".zip":
        archive = zipfile.ZipFile(path)
        return archive.open(archive.namelist()[0])
    return open(path, "rb")


def _count_nul_bytes(path: Path) -> int:
    """NUL bytes in the list. pandas' C parser ends a field at a NUL without a word, so a caption
    with a NUL inside would arrive cut short; one fast pass over the bytes says whether that can happen."""
    count = 0
    with _open_raw(path) as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            count += block.count(b"\0")
    return count


def _first_bad_line(path: Path, check: Callable[[str], str | None]) -> tuple[int, str] | None:
    """(line number, problem) of the first line that is not UTF-8 or that ``check`` rejects."""
    with _open_raw(path) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, (f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8; "
                                "re-encode the list as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            problem = check(line)
            if problem:
                return number, problem
    return None


def _not_utf8(path: Path, fmt: str) -> UrlListError:
    found = _first_bad_line(path, lambda line: None)
    where = f"line {found[0]}: {found[1]}" if found else "it is not UTF-8"
    return UrlListError(f"url list {path} ({fmt}) cannot be decoded, {where}")


def _jsonl_problem(line: str) -> str | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.pos + 1})"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


_FIELDS_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _read_delimited(path: Path, fmt: str, column_names: list[str] | None) -> pd.DataFrame:
    """A tsv/csv list, every line read as data first, so its field count is checked, not guessed.

    With a header, pandas takes a first data row with one field more than the header as an index
    column (every column shifts: urls become captions); with ``column_names`` shorter than the
    rows, it does the same. Reading the header as a row and naming the columns here makes both a
    clear error, as is a later line with more fields (a tab inside a tsv caption).
    """
    kwargs: dict[str, Any] = {"dtype": str, "keep_default_na": False, "header": None}
    if fmt == "tsv":
        # captions in CC3M/CC12M contain bare quotes; tsv has no quoting
        kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    if _count_nul_bytes(path):
        kwargs["engine"] = "python"  # keeps the NUL, which normalise_urls counts and removes
    unit = "line" if fmt == "tsv" else "row"
    try:
        frame = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise UrlListError(f"url list {path} is empty: download it again or point url_list at the right file"
                           ) from None
    except UnicodeDecodeError:
        raise _not_utf8(path, fmt) from None
    except pd.errors.ParserError as exc:
        m = _FIELDS_RE.search(str(exc))
        if not m:
            raise UrlListError(f"url list {path} cannot be read as {fmt}: {' '.join(str(exc).split())}") from None
        expected, line, saw = m.groups()
        inside = "a tab inside a caption" if fmt == "tsv" else "an unquoted comma inside a caption"
        raise UrlListError(
            f"url list {path}: {unit} {line} has {saw} fields but {unit} 1 has {expected} ({inside}?); "
            f"remove the extra separator from that {unit}, or drop the {unit}") from None
    width = frame.shape[1]
    if column_names is not None:
        if width != len(column_names):
            raise UrlListError(
                f"url list {path} has {width} {fmt} fields per {unit} but column_names names "
                f"{len(column_names)} ({', '.join(column_names)}); give one name per field, in file order")
        frame.columns = list(column_names)
        return frame
    header = [str(v) for v in frame.iloc[0]] if len(frame) else []
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise UrlListError(f"url list {path}: the header names column(s) {', '.join(repeated)} twice; "
                           "rename them, or set column_names if the first line is data")
    frame = frame.iloc[1:].reset_index(drop=True)
    frame.columns = header
    return frame


def read_url_list(
    path: str | os.PathLike, fmt: str = "auto", column_names: list[str] | None = None
) -> pd.DataFrame:
    """Read a url list as strings (no NA conversion, so an empty url stays an empty string).

    Every way a list can be unreadable raises :class:`UrlListError` naming the file and, where
    there is one, the line: empty, not UTF-8, a malformed jsonl line, a line with too many fields,
    ``column_names`` that do not match the fields.
    """
    path = Path(path)
    fmt = infer_format(path) if fmt == "auto" else fmt
    if column_names is not None and fmt not in ("tsv", "csv"):
        raise UrlListError(
            f"column_names applies to headerless tsv/csv lists only; {path} is read as {fmt}, "
            "which names its own columns"
        )
    if fmt in ("tsv", "csv"):
        return _read_delimited(path, fmt, column_names)
    if fmt == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a file that is not parquet
            raise UrlListError(f"url list {path} cannot be read as parquet: {type(exc).__name__}: {exc}; "
                               "is it a parquet file (else set input_format)?") from None
    if fmt == "jsonl":
        try:
            return pd.read_json(path, lines=True, dtype=False)
        except (ValueError, TypeError, AttributeError):  # pandas' errors for a bad line name no line
            found = _first_bad_line(path, _jsonl_problem)
            where = f"line {found[0]} is {found[1]}" if found else "it is not one JSON object per line"
            raise UrlListError(f"url list {path} (jsonl): {where}; fix or remove that line") from None
    if fmt == "txt":
        try:
            with open(path, encoding="utf-8") as fh:
                urls = [line.rstrip("\r\n") for line in fh]
        except UnicodeDecodeError:
            raise _not_utf8(path, fmt) from None
        return pd.DataFrame({"url": urls})
    raise UrlListError(f"unknown url-list format '{fmt}' (use tsv, csv, parquet, jsonl or txt)")


def _require_column(frame: pd.DataFrame, column: str, role: str, path: str) -> None:
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns))
        hint = " (a headerless list needs datasets.<name>.column_names, e.g. [caption, url] for CC3M)"
        raise UrlListError(f"{role} column '{column}' not found in {path}; columns found: {found}{hint}")


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
    urls = frame["url"].astype("string").fillna("")
    captions = frame["caption"].astype("string").fillna("")
    # a NUL byte would end the caption (or url) wherever C code reads it (the tokenizer, libcurl):
    # removed here, and the rows that had one counted
    nul = urls.str.contains("\x00", regex=False) | captions.str.contains("\x00", regex=False)
    urls = urls.str.replace("\x00", "", regex=False).str.strip()
    frame["url"] = urls
    frame["caption"] = captions.str.replace("\x00", "", regex=False)
    empty = urls == ""
    kept = frame[~empty].reset_index(drop=True)
    lowered = kept["url"].str.lower()
    stats = {
        "rows": int(len(frame)),
        "written": int(len(kept)),
        "empty_url": int(empty.sum()),
        "duplicate_url": int(kept["url"].duplicated().sum()),
        "non_http": int((~(lowered.str.startswith("http://") | lowered.str.startswith("https://"))).sum()),
        "nul_byte": int(nul.sum()),
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
    if not stats["written"]:
        why = f"all {stats['rows']} rows have an empty url" if stats["rows"] else "it has no rows"
        raise UrlListError(f"url list {path} has no url to download ({why}); check the file and "
                           f"datasets.{dataset}.url_col / column_names")
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
        out,
    )
    if stats["empty_url"]:
        log.warning("%d rows of %s have an empty url and were left out", stats["empty_url"], path)
    if stats["nul_byte"]:
        log.warning("%d rows of %s hold a NUL byte in the url or caption; it was removed (nul_byte in %s.stats.json)",
                    stats["nul_byte"], path, out)
    if fmt == "txt":
        log.warning("%s is a plain url list: captions are empty, which contrastive training cannot use", path)
    return stats
