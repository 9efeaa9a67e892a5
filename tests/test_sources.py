"""Url-list sources: every format CC3M/CC12M/LAION lists come in -> urls.parquet + stats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from amorlip.cli import main as cli_main
from amorlip.config import ConfigError, expand_runs, load_config
from amorlip.data.sources import UrlListError, infer_format, write_url_parquet

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    ("https://example.com/a.jpg", 'a dog on a "red" sofa'),
    ("http://example.com/b.png", "two cats, sleeping"),
    ("https://example.com/c.jpg", "a boat"),
]


def url_config(path: Path, **options) -> dict:
    dataset = {"source": "url_list", "url_list": str(path), **options}
    return load_config({"datasets": {"web": dataset}, "runs": {"clip": {"method": "clip", "dataset": "web"}}})


def written(out: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_parquet(out), json.loads(Path(f"{out}.stats.json").read_text())


def test_tsv_with_header(tmp_path):
    src = tmp_path / "list.tsv"
    src.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in ROWS))
    out = tmp_path / "urls.parquet"
    stats = write_url_parquet(url_config(src), "web", out)
    frame, on_disk = written(out)
    assert list(frame.columns) == ["url", "caption"]
    assert list(zip(frame["url"], frame["caption"])) == ROWS  # quotes in captions survive
    assert stats == on_disk == {"rows": 3, "written": 3, "empty_url": 0, "duplicate_url": 0, "non_http": 0,
                               "nul_byte": 0}


def test_headerless_cc3m_tsv_with_column_names(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("".join(f"{c}\t{u}\n" for u, c in ROWS))
    out = tmp_path / "urls.parquet"
    write_url_parquet(url_config(src, column_names=["caption", "url"]), "web", out)
    frame, stats = written(out)
    assert list(zip(frame["url"], frame["caption"])) == ROWS
    assert stats["rows"] == 3, "the first line is data, not a header"


def test_gzipped_tsv_is_detected(tmp_path):
    import gzip

    src = tmp_path / "cc12m.tsv.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("".join(f"{u}\t{c}\n" for u, c in ROWS))
    assert infer_format(src) == "tsv"
    out = tmp_path / "urls.parquet"
    write_url_parquet(url_config(src, column_names=["url", "caption"]), "web", out)
    assert list(written(out)[0]["url"]) == [u for u, _ in ROWS]


def test_csv_with_other_column_names_keeps_extra_columns(tmp_path):
    src = tmp_path / "list.csv"
    pd.DataFrame(
        {"URL": [u for u, _ in ROWS], "TEXT": [c for _, c in ROWS], "similarity": [0.3, 0.2, 0.1]}
    ).to_csv(src, index=False)
    out = tmp_path / "urls.parquet"
    write_url_parquet(url_config(src, url_col="URL", caption_col="TEXT"), "web", out)
    frame, _ = written(out)
    assert list(frame.columns) == ["url", "caption", "similarity"]
    assert list(frame["caption"]) == [c for _, c in ROWS]
    assert frame["similarity"].tolist() == ["0.3", "0.2", "0.1"]


def test_parquet_and_jsonl(tmp_path):
    data = pd.DataFrame(
        {"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS], "width": [640, 480, 320]}
    )
    data.to_parquet(tmp_path / "list.parquet")
    data.to_json(tmp_path / "list.jsonl", orient="records", lines=True)
    for name in ("list.parquet", "list.jsonl"):
        out = tmp_path / f"{name}.urls.parquet"
        write_url_parquet(url_config(tmp_path / name), "web", out)
        frame, stats = written(out)
        assert list(zip(frame["url"], frame["caption"])) == ROWS, name
        assert frame["width"].tolist() == [640, 480, 320], name
        assert stats["written"] == 3


def test_plain_txt_list_has_empty_captions(tmp_path):
    src = tmp_path / "urls.txt"
    src.write_text("".join(f"{u}\n" for u, _ in ROWS))
    out = tmp_path / "urls.parquet"
    write_url_parquet(url_config(src), "web", out)
    frame, _ = written(out)
    assert list(frame["url"]) == [u for u, _ in ROWS]
    assert set(frame["caption"]) == {""}


def test_missing_column_is_named_with_the_columns_found(tmp_path):
    src = tmp_path / "list.tsv"
    src.write_text("image\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in ROWS))
    with pytest.raises(ValueError) as info:
        write_url_parquet(url_config(src), "web", tmp_path / "urls.parquet")
    message = str(info.value)
    assert "'url'" in message and str(src) in message and "image, caption" in message
    assert not (tmp_path / "urls.parquet").exists()


def test_headerless_list_without_column_names_fails_clearly(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("".join(f"{c}\t{u}\n" for u, c in ROWS))
    with pytest.raises(ValueError, match="column_names"):
        write_url_parquet(url_config(src), "web", tmp_path / "urls.parquet")


def test_bad_urls_are_counted_not_silently_dropped(tmp_path):
    lines = [
        ("https://example.com/a.jpg", "a"),
        ("", "no url at all"),
        ("   ", "only spaces"),
        ("https://example.com/a.jpg", "the same url again"),
        ("ftp://example.com/c.jpg", "not http"),
        ("images/local.jpg", "relative path"),
    ]
    src = tmp_path / "list.tsv"
    src.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in lines))
    out = tmp_path / "urls.parquet"
    write_url_parquet(url_config(src), "web", out)
    frame, stats = written(out)
    assert stats == {"rows": 6, "written": 4, "empty_url": 2, "duplicate_url": 1, "non_http": 2, "nul_byte": 0}
    # duplicates and non-http urls stay: img2dataset records them as failures in the manifest
    assert list(frame["caption"]) == ["a", "the same url again", "not http", "relative path"]


def test_rewrite_leaves_no_temporary_files(tmp_path):
    src = tmp_path / "list.csv"
    src.write_text("url,caption\n" + "".join(f"{u},{c.replace(',', ' ')}\n" for u, c in ROWS))
    out = tmp_path / "out" / "urls.parquet"
    for _ in range(2):
        write_url_parquet(url_config(src), "web", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["urls.parquet", "urls.parquet.stats.json"]


def test_column_names_must_be_a_list_of_strings(tmp_path):
    with pytest.raises(ConfigError, match="column_names"):
        url_config(tmp_path / "x.tsv", column_names="caption,url")


@pytest.mark.parametrize(
    "name, model, batch, dataset, samples",
    [
        ("cc3m-rn50.yaml", "RN50", 1024, "cc3m", 2274566),
        ("cc12m-vitb32.yaml", "ViT-B-32", 2048, "cc12m", 8059642),
    ],
)
def test_shipped_paper_configs_load(name, model, batch, dataset, samples, tmp_path, monkeypatch):
    config = load_config(REPO / "config" / name, check_paths=False)
    ds = config["datasets"][dataset]
    assert ds["source"] == "url_list" and ds["column_names"] and ds["paper_samples"] == samples
    assert config["evaluation"]["suites"] == ["datacomp"]
    runs = expand_runs(config)
    assert {r.method for r in runs.values()} == {"clip", "amorlip", "fastclip"}  # FastCLIP: its authors' recipe
    for run in runs.values():
        assert (run.model, run.batch_size, run.dataset, run.precision) == (model, batch, dataset, "bf16")
    monkeypatch.chdir(tmp_path)  # url_list is relative to the working directory: here it is absent
    with pytest.raises(ConfigError, match="url_list"):
        load_config(REPO / "config" / name, check_paths=True)


# --------------------------------------------------------------------------- lists nobody here wrote


def _refused(tmp_path, name: str, data: bytes, **options) -> str:
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "urls.parquet"
    with pytest.raises(UrlListError) as info:
        write_url_parquet(url_config(src, **options), "web", out)
    assert not out.exists(), "nothing is written for a list that was refused"
    message = str(info.value)
    assert str(src) in message and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("column_names, fields", [(["caption", "url"], 3), (["caption", "url", "a", "b"], 3)])
def test_column_names_that_do_not_match_the_fields_are_an_error(tmp_path, column_names, fields):
    """Two names for three fields made pandas take the first field as the index: urls became captions."""
    data = "".join(f"{c}\t{u}\t0.3\n" for u, c in ROWS).encode()
    message = _refused(tmp_path, "cc3m.tsv", data, column_names=column_names)
    assert f"{fields} tsv fields per line" in message and f"column_names names {len(column_names)}" in message


def test_a_first_data_row_wider_than_the_header_is_an_error_not_a_shift(tmp_path):
    message = _refused(tmp_path, "list.tsv", b"url\tcaption\nhttp://x/a.jpg\ta dog\textra\nhttp://x/b.jpg\tb\n")
    assert "line 2 has 3 fields but line 1 has 2" in message


def test_a_tab_inside_a_tsv_caption_names_the_line(tmp_path):
    data = b"url\tcaption\n\nhttp://x/a.jpg\ta dog\nhttp://x/b.jpg\ttwo\tcats\n"
    message = _refused(tmp_path, "list.tsv", data)
    assert "line 4 has 3 fields" in message and "a tab inside a caption" in message


def test_nul_bytes_are_removed_and_counted_not_cutting_the_caption(tmp_path, caplog):
    src = tmp_path / "list.tsv"
    src.write_bytes(b"url\tcaption\nhttp://x/a.jpg\ta dog\x00 on a sofa\nhttp://x/b.jpg\tcats\n")
    out = tmp_path / "urls.parquet"
    with caplog.at_level(logging.WARNING, logger="amorlip.data.sources"):
        stats = write_url_parquet(url_config(src), "web", out)
    frame, on_disk = written(out)
    assert list(frame["caption"]) == ["a dog on a sofa", "cats"]  # pandas' C parser kept "a dog"
    assert stats["nul_byte"] == on_disk["nul_byte"] == 1 and stats["written"] == 2
    assert any("NUL byte" in r.getMessage() for r in caplog.records)


def test_non_utf8_bytes_name_the_line(tmp_path):
    data = "url\tcaption\nhttp://x/a.jpg\ta\nhttp://x/b.jpg\tcaf\u00e9\n".encode("latin-1")
    message = _refused(tmp_path, "list.tsv", data)
    assert "line 3" in message and "0xe9" in message and "UTF-8" in message


def test_non_utf8_bytes_in_a_gzipped_list_name_the_line(tmp_path):
    import gzip

    message = _refused(tmp_path, "list.tsv.gz", gzip.compress(b"url\tcaption\nhttp://x/a.jpg\t\xff\xfe\n"))
    assert "line 2" in message and "0xff" in message


def test_malformed_jsonl_line_is_named(tmp_path):
    data = b'{"url": "http://x/a.jpg", "caption": "a"}\n{"url": "http://x/b.jpg", "caption": \n{"url": 1}\n'
    message = _refused(tmp_path, "list.jsonl", data)
    assert "line 2 is not valid JSON" in message
    message = _refused(tmp_path, "list.jsonl", b'{"url": "http://x/a.jpg", "caption": "a"}\n["not", "an object"]\n')
    assert "line 2 is a JSON list, not an object" in message


@pytest.mark.parametrize("name, data, expected", [
    ("empty.tsv", b"", "is empty"),
    ("blank.csv", b"\n\n", "is empty"),
    ("header-only.tsv", b"url\tcaption\n", "no url to download (it has no rows)"),
    ("no-urls.tsv", b"url\tcaption\n\ta\n \tb\n", "no url to download (all 2 rows have an empty url)"),
    ("not-parquet.parquet", b"url,caption\nhttp://x/a.jpg,a\n", "cannot be read as parquet"),
    ("empty.parquet", b"", "cannot be read as parquet"),
])
def test_empty_or_unparseable_lists_are_one_clear_line(tmp_path, name, data, expected):
    assert expected in _refused(tmp_path, name, data)


def test_cli_source_prints_one_line_for_a_bad_list(tmp_path, capsys):
    src = tmp_path / "list.tsv"
    src.write_bytes(b"url\tcaption\nhttp://x/a.jpg\ta\tb\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"datasets:\n  web: {{source: url_list, url_list: '{src}'}}\n"
                      "runs:\n  clip: {method: clip, dataset: web}\n")
    rc = cli_main(["source", "--config", str(config), "--dataset", "web", "--out", str(tmp_path / "u.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("amorlip: url list") and "line 2 has 3 fields" in err and "\n" not in err


def test_the_summary_log_line_formats(tmp_path, caplog):
    """Its format had 8 placeholders for 7 arguments: every url-list source printed `--- Logging error ---`."""
    src = tmp_path / "list.tsv"
    src.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in ROWS))
    out = tmp_path / "urls.parquet"
    with caplog.at_level(logging.INFO, logger="amorlip.data.sources"):
        write_url_parquet(url_config(src), "web", out)
    lines = [r.getMessage() for r in caplog.records if r.name == "amorlip.data.sources"]  # raises on a mismatch
    assert any(line.startswith(f"url list {src} (tsv): 3 rows, 3 written") and line.endswith(f"-> {out}")
               for line in lines), lines
