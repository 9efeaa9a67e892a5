"""Fan-out (parts), the success-rate floor and retry-failed: the real img2dataset against a scripted
loopback server (amorlip/data/scripted_http.py), whose every url's outcome is known in advance.

The list (16 urls, 3 per shard, 3 parts: shards 0-1, 2-3, 4-5) mixes images, a redirect, a 404, an
HTML page, a 503 and a timeout that recover once the server is told to. Each url's final outcome is
checked against that ground truth, before and after retries.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from amorlip.config import load_config
from amorlip.data.download import download, write_index
from amorlip.data.parts import merge_parts, part_names, shard_ranges, split_urls
from amorlip.data.retry import retry_failed
from amorlip.data.scripted_http import OUTCOME, ScriptedServer

REPO = Path(__file__).resolve().parents[1]
KINDS = ["img"] * 9 + ["redirect", "404", "html", "flaky", "flaky", "flakyslow", "img"]
PER_SHARD, PARTS = 3, 3


def _config(work: Path, **overrides) -> dict:
    ds = {"source": "url_list", "url_list": "unused.tsv", "image_size": 32, "samples_per_shard": PER_SHARD,
          "processes": 1, "threads": 8, "timeout": 1, "parts": PARTS, "allowed_networks": ["127.0.0.1/32"],
          **overrides}
    return load_config({"paths": {k: str(work / k) for k in ("data", "runs", "results", "resources")},
                        "datasets": {"t": ds},
                        "runs": {"clip": {"method": "clip", "dataset": "t", "model": "amorlip-tiny"}}},
                       check_paths=False)


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(slow_s=3.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def fanned(tmp_path_factory, server) -> dict:
    """split -> 3 part downloads -> merge -> index, with the url list's ground truth."""
    work = tmp_path_factory.mktemp("fanout")
    config = _config(work)
    rows = [{"url": server.url(kind, i), "caption": f"{kind} {i}", "kind": kind} for i, kind in enumerate(KINDS)]
    random.Random(0).shuffle(rows)
    urls = work / "resources" / "t" / "urls.parquet"
    urls.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(urls, index=False)
    split_urls(config, "t", urls, work / "resources" / "t" / "parts")
    part_dirs = [work / "data" / "t" / "parts" / p for p in part_names(PARTS)]
    for name, folder in zip(part_names(PARTS), part_dirs, strict=True):
        download(config, "t", work / "resources" / "t" / "parts" / f"{name}.parquet", folder)
    shards = work / "data" / "t" / "shards"
    merge_parts(config, "t", urls, part_dirs, shards)
    manifest = write_index(config, "t", shards)
    return {"work": work, "config": config, "rows": rows, "shards": shards, "parts": part_dirs,
            "manifest": manifest, "urls": urls}


def _outcomes(shards: Path) -> dict[str, str]:
    """url -> status of the row that counts (retry rows supersede the rows they re-attempt)."""
    from amorlip.data.accounting import RETRY_OF_COL

    frames = [pd.read_parquet(p) for p in sorted(shards.glob("*.parquet"))]
    table = pd.concat(frames, ignore_index=True)
    superseded = set(table[RETRY_OF_COL].dropna()) if RETRY_OF_COL in table else set()
    final = table[~table["key"].isin(superseded)]
    assert final["url"].is_unique  # one row counts per url
    return dict(zip(final["url"], final["status"], strict=True))


def test_parts_merge_into_one_dense_set_keyed_as_one_download(fanned):
    shards, rows = fanned["shards"], fanned["rows"]
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == [f"{i:05d}.tar" for i in range(6)]  # unique and dense across the 3 parts
    sizes = json.loads((fanned["work"] / "data" / "t" / "sizes.json").read_text())
    assert sorted(sizes) == names
    # every sample's key is what a single download of the whole list gives its row: shard id, then
    # the row's offset in the shard (img2dataset's compute_key with 5 shard digits, 1 offset digit)
    table = pd.concat([pd.read_parquet(p) for p in sorted(shards.glob("*.parquet"))], ignore_index=True)
    row_of = {r["url"]: i for i, r in enumerate(rows)}
    for url, key in zip(table["url"], table["key"], strict=True):
        i = row_of[url]
        assert key == f"{i // PER_SHARD:05d}{i % PER_SHARD}", (url, key)


def test_manifest_accounts_every_url_per_part(fanned):
    manifest, rows = fanned["manifest"], fanned["rows"]
    truth = Counter(OUTCOME[r["kind"]] for r in rows)
    assert manifest["samples"] == truth[None] == 11
    assert manifest["failures"] == {k: v for k, v in truth.items() if k is not None}
    assert manifest["samples"] + manifest["failed"] == manifest["urls"] == len(rows)
    assert [p["part"] for p in manifest["parts"]] == ["000", "001", "002"]
    for part, (first, n) in zip(manifest["parts"], shard_ranges(len(rows), PER_SHARD, PARTS), strict=True):
        mine = rows[first * PER_SHARD:(first + n) * PER_SHARD]
        assert part["urls"] == len(mine)
        assert part["successes"] == sum(OUTCOME[r["kind"]] is None for r in mine)
        assert part["failures"] == dict(Counter(OUTCOME[r["kind"]] for r in mine if OUTCOME[r["kind"]]))
        assert part["success_rate"] == pytest.approx(part["successes"] / part["urls"])


def test_success_floor_stops_the_index_naming_the_part(fanned):
    worst = min(fanned["manifest"]["parts"], key=lambda p: p["success_rate"])
    floor = worst["success_rate"] + 0.01
    config = _config(fanned["work"], min_success_rate=floor)
    with pytest.raises(ValueError, match=rf"part {worst['part']} .*{worst['success_rate']:.1%}") as err:
        write_index(config, "t", fanned["shards"])
    assert "DNS throttling" in str(err.value) and "setting-up-a-high-performance-dns-resolver" in str(err.value)
    assert "amorlip retry-failed" in str(err.value)


def test_merge_refuses_a_part_with_an_unfinished_shard(fanned, tmp_path):
    parts = []
    for folder in fanned["parts"]:
        shutil.copytree(folder, tmp_path / folder.name)
        parts.append(tmp_path / folder.name)
    (parts[1] / "00003_stats.json").unlink()
    with pytest.raises(ValueError, match=r"001: 1 unfinished shard\(s\) \(00003\)"):
        merge_parts(fanned["config"], "t", fanned["urls"], parts, tmp_path / "shards")
    with pytest.raises(ValueError, match="starts at shard 00004, expected 00002"):
        merge_parts(fanned["config"], "t", fanned["urls"], [parts[0], parts[2], parts[1]], tmp_path / "shards2")


def test_retry_moves_recovered_urls_from_failed_to_success(fanned, server, tmp_path):
    shards = tmp_path / "data" / "t" / "shards"
    shutil.copytree(fanned["shards"], shards)
    config = _config(tmp_path)
    rows = fanned["rows"]
    server.recover()  # the 503s and the slow url answer from now on
    retry_failed(config, "t", shards, ["timeout", "5xx"])
    manifest = json.loads((tmp_path / "data" / "t" / "manifest.json").read_text())
    assert manifest["failures"] == {"http_404": 1, "decode_error": 1}
    assert manifest["samples"] == 14 and manifest["samples"] + manifest["failed"] == len(rows)
    assert manifest["retried"] == {"shards": 1, "superseded": 3, "recovered": 3}
    sizes = json.loads((tmp_path / "data" / "t" / "sizes.json").read_text())
    assert sizes["00006.tar"] == 3 and sum(sizes.values()) == 14
    outcomes = _outcomes(shards)
    for r in rows:
        expected = "success" if r["kind"] not in ("404", "html") else "failed_to_download"
        assert (outcomes[r["url"]] == "success") == (expected == "success"), r
    # the part that held the timeout is credited with its recovery
    assert [p["successes"] for p in manifest["parts"]] == [
        sum(r["kind"] not in ("404", "html") for r in rows[f * PER_SHARD:(f + n) * PER_SHARD])
        for f, n in shard_ranges(len(rows), PER_SHARD, PARTS)]

    # a url that fails again is still counted once, by its new outcome
    retry_failed(config, "t", shards, ["4xx"])
    again = json.loads((tmp_path / "data" / "t" / "manifest.json").read_text())
    assert again["failures"] == {"http_404": 1, "decode_error": 1} and again["samples"] == 14
    assert again["retried"]["superseded"] == 4 and again["retried"]["shards"] == 2

    from amorlip.data.loader import TrainLoader
    from amorlip.models import get_tokenizer, image_transform

    loader = TrainLoader(shards, None, local_batch_size=2, rank=0, world_size=1, workers=0, seed=0,
                         preprocess=image_transform("amorlip-tiny", train=True),
                         tokenizer=get_tokenizer("amorlip-tiny"))
    keys = [k for b in loader.epoch(0) for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 14  # the retried samples are read, each once


def test_dry_run_with_8_parts_plans_8_downloads_and_one_index(tmp_path):
    (tmp_path / "resources" / "big").mkdir(parents=True)
    (tmp_path / "resources" / "big" / "list.tsv").write_text("url\tcaption\nhttp://example.com/a.jpg\ta\n")
    config = {"datasets": {"big": {"source": "url_list", "url_list": "resources/big/list.tsv", "parts": 8}},
              "runs": {"clip": {"method": "clip", "dataset": "big", "model": "amorlip-tiny"}},
              "evaluation": {"suites": ["datacomp"], "download": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "data", "-n", "-s", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
    assert counts.get("download_part") == 8 and counts.get("index") == 1, proc.stdout
    assert counts.get("split_urls") == 1 and counts.get("merge_parts") == 1 and "download" not in counts


def test_shard_ranges_deal_whole_shards():
    assert shard_ranges(16, 3, 3) == [(0, 2), (2, 2), (4, 2)]
    assert shard_ranges(100, 10, 4) == [(0, 3), (3, 3), (6, 2), (8, 2)]
    with pytest.raises(ValueError, match="parts: 4 is more than the 3 shard"):
        shard_ranges(9, 3, 4)


def test_part_lists_keep_local_urls_relative_to_the_full_list(tmp_path):
    from amorlip.data.parts import first_shard_of, local_root_of

    folder = tmp_path / "resources" / "t"
    folder.mkdir(parents=True)
    pd.DataFrame({"url": [f"images/{i}.jpg" for i in range(7)], "caption": ["c"] * 7}).to_parquet(
        folder / "urls.parquet", index=False)
    listing = split_urls(_config(tmp_path), "t", folder / "urls.parquet", folder / "parts")
    assert [(p["first_shard"], p["urls"]) for p in listing] == [(0, 3), (1, 3), (2, 1)]
    for name, first in zip(part_names(PARTS), (0, 1, 2), strict=True):
        part = folder / "parts" / f"{name}.parquet"
        assert first_shard_of(part) == first
        assert local_root_of(part) == folder.resolve()  # the emoji demo's relative paths still resolve
    assert local_root_of(folder / "urls.parquet") == folder.resolve()
