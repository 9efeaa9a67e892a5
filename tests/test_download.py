"""download / write_index / LoopbackFileServer: the real img2dataset against a real loopback server.

The url list mixes good JPEG/PNG files with the three failures a crawl meets most: a missing file
(404), an HTML page saved as .jpg, and a truncated JPEG. Urls are paths relative to the parquet, as
the emoji demo writes them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from amorlip.config import load_config
from amorlip.data.download import count_tar_images, download, failure_reason, write_index
from amorlip.data.loopback import LoopbackFileServer

N_GOOD = 20
PER_SHARD = 10


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = (int(x) for x in rng.integers(20, 60, size=2))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """resources/tiny/urls.parquet, relative urls: 20 good images + 404 + HTML-as-.jpg + truncated JPEG."""
    root = tmp_path_factory.mktemp("src") / "resources" / "tiny"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_GOOD):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        (root / "images" / f"{i:03d}.{ext}").write_bytes(_image_bytes(rng, fmt))
        rows.append({"url": f"images/{i:03d}.{ext}", "caption": f"a picture number {i}", "style": "good"})
    (root / "images" / "page.jpg").write_text("<html><body>Not an image</body></html>")
    whole = _image_bytes(rng, "JPEG")
    (root / "images" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    rows += [
        {"url": "images/missing.jpg", "caption": "gone", "style": "http_404"},
        {"url": "images/page.jpg", "caption": "html", "style": "html"},
        {"url": "images/cut.jpg", "caption": "cut", "style": "truncated"},
    ]
    # shuffle so that every shard meets good and bad rows
    order = np.random.default_rng(1).permutation(len(rows))
    pd.DataFrame([rows[i] for i in order]).to_parquet(root / "urls.parquet", index=False)
    return root / "urls.parquet"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("work")
    return load_config({
        "paths": {"data": str(work / "data"), "runs": str(work / "runs"), "results": str(work / "results"),
                  "resources": str(work / "resources")},
        "datasets": {"tiny": {"source": "url_list", "url_list": "unused.tsv", "image_size": 32,
                              "samples_per_shard": PER_SHARD, "processes": 1, "threads": 4, "timeout": 5}},
        "runs": {"clip": {"method": "clip", "dataset": "tiny", "model": "amorlip-tiny"}},
    }, check_paths=False)


@pytest.fixture(scope="module")
def downloaded(config, source) -> tuple[Path, dict]:
    out = Path(config["paths"]["data"]) / "tiny" / "shards"
    summary = download(config, "tiny", urls=source, out_dir=out)
    return out, summary


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


def test_download_writes_webdataset_shards(downloaded):
    out, summary = downloaded
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert all((out / f"0000{i}_stats.json").exists() for i in range(3))
    assert all((out / f"0000{i}.parquet").exists() for i in range(3))
    assert not (out / "_tmp").exists()
    assert summary["successes"] == N_GOOD and summary["attempted"] == N_GOOD + 3 and summary["failed"] == 3
    with tarfile.open(out / "00000.tar") as tf:
        names = tf.getnames()
        key = names[0].split(".")[0]
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(names)
        meta = json.loads(tf.extractfile(f"{key}.json").read())
        image = Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read()))
        caption = tf.extractfile(f"{key}.txt").read().decode()
    assert meta["style"] == "good"  # extra parquet columns travel into the sample's .json
    assert meta["url"].startswith("http://127.0.0.1:")
    assert caption.startswith("a picture number")
    assert image.size == (32, 32)


def test_index_counts_samples_and_failures_by_reason(config, downloaded):
    out, _ = downloaded
    manifest = write_index(config, "tiny", shards_dir=out)
    data_dir = Path(config["paths"]["data"]) / "tiny"
    sizes = json.loads((data_dir / "sizes.json").read_text())
    assert manifest == json.loads((data_dir / "manifest.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(sizes.values()) == manifest["samples"] == N_GOOD
    assert sizes == {name: count_tar_images(out / name) for name in sizes}
    assert manifest["attempted"] == N_GOOD + 3 and manifest["failed"] == 3 and manifest["shards"] == 3
    # the HTML page and the truncated JPEG both fail OpenCV's decode
    assert manifest["failures"] == {"decode_error": 2, "http_404": 1}
    assert manifest["dataset"] == "tiny" and manifest["source"] == "url_list" and manifest["image_size"] == 32
    assert not list(data_dir.glob(".*.tmp"))


def test_loader_reads_the_downloaded_shards(config, downloaded):
    """The contract between the stages: img2dataset's shards + index -> TrainLoader (sizes.json in the parent)."""
    from amorlip.data.loader import TrainLoader
    from amorlip.models import get_tokenizer, image_transform

    out, _ = downloaded
    write_index(config, "tiny", shards_dir=out)
    loader = TrainLoader(out, None, local_batch_size=4, rank=0, world_size=1, workers=0, seed=0,
                         preprocess=image_transform("amorlip-tiny", train=True),
                         tokenizer=get_tokenizer("amorlip-tiny"))
    batches = list(loader.epoch(0))
    assert len(batches) == N_GOOD // 4
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == N_GOOD and sum(b["skipped"] for b in batches) == 0
    assert batches[0]["images"].shape == (4, 3, 32, 32)


def test_download_again_is_incremental(config, source, downloaded):
    out, _ = downloaded
    before = _mtimes(out)
    summary = download(config, "tiny", urls=source, out_dir=out)
    assert _mtimes(out) == before  # nothing re-downloaded
    assert summary["successes"] == N_GOOD
    # a lost shard is fetched again by img2dataset's incremental mode; the others are kept as they are
    for name in ("00001.tar", "00001_stats.json", "00001.parquet"):
        (out / name).unlink()
    download(config, "tiny", urls=source, out_dir=out)
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if not k.startswith("00001")} == \
        {k: v for k, v in before.items() if not k.startswith("00001")}
    assert {"00001.tar", "00001_stats.json", "00001.parquet"} <= set(after)
    assert write_index(config, "tiny", shards_dir=out)["samples"] == N_GOOD


def test_index_refuses_stats_that_disagree_with_the_tars(config, downloaded, tmp_path):
    out, _ = downloaded
    copy = tmp_path / "shards"
    copy.mkdir()
    for p in out.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    stats = json.loads((copy / "00000_stats.json").read_text())
    stats["successes"] += 1
    (copy / "00000_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="00000.tar holds"):
        write_index(config, "tiny", shards_dir=copy)


def test_index_checks_the_shards_against_the_url_list(config, source, downloaded, tmp_path):
    """download.plan holds the list's url count: a lost shard, a stats file that drops urls, or no plan
    at all stops the index, and a download into a folder another list started stops before fetching."""
    out, _ = downloaded

    def copy(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for p in out.iterdir():
            if p.is_file():
                (folder / p.name).write_bytes(p.read_bytes())
        return folder

    lost = copy("lost")
    for name in ("00002.tar", "00002_stats.json", "00002.parquet"):
        (lost / name).unlink()  # the last shard: nothing else in the folder shows it is missing
    with pytest.raises(ValueError, match=r"lacks 1 of its 3 shards \(00002\): 3 of the 23 urls"):
        write_index(config, "tiny", shards_dir=lost)
    short = copy("short")
    stats = json.loads((short / "00001_stats.json").read_text())
    stats["count"] -= 1
    (short / "00001_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="account for 22 urls but the list has 23"):
        write_index(config, "tiny", shards_dir=short)
    unplanned = copy("unplanned")
    (unplanned / "download.plan").unlink()
    with pytest.raises(ValueError, match="has no download.plan"):
        write_index(config, "tiny", shards_dir=unplanned)
    other = pd.read_parquet(source).iloc[:-1]
    other.to_parquet(tmp_path / "other.parquet", index=False)
    with pytest.raises(ValueError, match="holds shards of another url list"):
        download(config, "tiny", urls=tmp_path / "other.parquet", out_dir=copy("resumed"))


def test_loopback_server_serves_its_root_only_on_loopback(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_bytes(b"hello")
    (root / "big.bin").write_bytes(b"x" * 2000)
    (tmp_path / "secret.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    with LoopbackFileServer(root, max_bytes=1000) as server:
        assert server._server.server_address[0] == "127.0.0.1"
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(server.url_for("sub/a.txt"), timeout=5) as r:
            assert r.read() == b"hello"

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(server.base_url + path, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        assert status("/missing.jpg") == 404
        assert status("/sub/") == 404  # no directory listings
        assert status("/../secret.txt") == 404
        assert status("/sub/%2e%2e/%2e%2e/secret.txt") == 404
        assert status("/link.txt") == 404  # a symlink out of the root
        assert status("/big.bin") == 413  # max_bytes
        port = server.port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/sub/a.txt", timeout=2)


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: File not found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("HTTP Error 413: File larger than max_bytes", "too_large"),
    ("Image decoding error", "decode_error"),
    ("<urlopen error timed out>", "timeout"),
    ("IncompleteRead(100 bytes read, 900 more expected)", "truncated"),
    ("<urlopen error [Errno 111] Connection refused>", "connection"),
    ("image area too large", "too_large"),
    ("something new", "other: something new"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason
