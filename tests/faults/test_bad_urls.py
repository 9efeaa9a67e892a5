"""A hostile url list through the real source -> img2dataset download -> index path.

The list mixes good images with everything a crawl of CC3M/CC12M-style lists meets, served by a
real HTTP server on 127.0.0.1 that misbehaves on purpose:

- a server that accepts and never answers (hang), one that announces 200 KB then drips one byte
  at a time (each socket read succeeds, so a per-read timeout never fires), a body announced as
  10 GB (cut short after 256 KB), a 10 GB stream without a Content-Length (the server stops after 48 MB: the
  test must never really send 10 GB), a decompression-bomb PNG (a small file that declares
  50000 x 50000 pixels), 404s, HTML instead of an image, a redirect to ``file://``;
- rows that are not http(s): ``file://`` of a real local image (a url list must not be able to copy
  local files into the shards), ``ftp://``, ``javascript:``, ``data:``, a relative path escaping the
  list's folder, a url without a host, an empty url; duplicate urls and a duplicate ``key`` column.

Figures: the download's wall time (bounded by the per-url timeout), the peak RSS of the download
process tree, and the bytes the hostile server managed to push into a worker; the manifest counts
each failure by reason.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import tarfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from amorlip.config import load_config
from amorlip.data.download import write_index
from amorlip.data.sources import write_url_parquet

from .conftest import Job

TIMEOUT_S = 2
MAX_IMAGE_BYTES = 1_000_000
FLOOD_CAP = 48 * 2**20  # the most the hostile server ever sends on one connection
TEN_GB = 10 * 2**30
N_GOOD = 16


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def decompression_bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels, followed by a few real rows.

    Decoders that trust the header allocate width x height x 3 bytes (7.5 GB here) before reading the
    data; the file itself is a few hundred bytes.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\x00" + b"\x00" * (3 * width) for _ in range(4)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class HostileServer:
    """Good images under /img/, and one misbehaving route per kind of trouble (see the module doc)."""

    def __init__(self):
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}  # route -> bytes written before the client went away
        self.held: dict[str, float] = {}  # route -> seconds the client stayed connected
        self.bomb = decompression_bomb_png()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when we close

            def log_message(self, *args):
                pass

            def _stream(self, route: str, chunk: bytes, pause: float, cap: int) -> None:
                t0, sent = time.monotonic(), 0
                try:
                    while sent < cap and not server.stop.is_set():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        if pause:
                            time.sleep(pause)
                except OSError:
                    pass
                server.sent[route] = server.sent.get(route, 0) + sent
                server.held[route] = max(server.held.get(route, 0.0), time.monotonic() - t0)

            def do_GET(self):  # noqa: N802 -- BaseHTTPRequestHandler's name
                path = self.path
                if path.startswith("/img/"):
                    body = _jpeg(int(path.split("/")[-1].split(".")[0]))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path == "/hang.jpg":
                    t0 = time.monotonic()
                    server.stop.wait(60)
                    server.held["/hang.jpg"] = time.monotonic() - t0
                elif path == "/drip.jpg":  # a plausible size, sent one byte every 0.2 s
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "200000")
                    self.end_headers()
                    self._stream(path, b"\xff", 0.2, 300)
                elif path == "/short.jpg":  # announces 10 GB, sends 256 KB, closes
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(TEN_GB))
                    self.end_headers()
                    self._stream(path, b"\xff\xd8" + b"\x00" * 65534, 0, 256 * 1024)
                elif path == "/flood.jpg":  # no Content-Length: a body that only ends when we stop
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.end_headers()
                    self._stream(path, b"\xff\xd8" + b"\x00" * 65534, 0, FLOOD_CAP)
                elif path == "/bomb.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(server.bomb)))
                    self.end_headers()
                    self.wfile.write(server.bomb)
                elif path == "/page.jpg":
                    body = b"<html><body>Access denied</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path == "/to-file.jpg":
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/hostname")
                    self.end_headers()
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _url_list(folder: Path, base: str) -> tuple[Path, dict[str, str]]:
    """A tsv url list (url, caption, key) and, for each hostile row, what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret.jpg"  # a real local image: a url list must not pull it into the shards
    secret.write_bytes(_jpeg(999))
    tiny_png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tiny_png, format="PNG")
    hostile = {
        f"{base}/hang.jpg": "hang", f"{base}/drip.jpg": "drip", f"{base}/short.jpg": "short 10 GB",
        f"{base}/flood.jpg": "flood", f"{base}/bomb.png": "bomb", f"{base}/gone.jpg": "404",
        f"{base}/page.jpg": "html", f"{base}/to-file.jpg": "redirect to file://",
        f"file://{secret}": "file://", "ftp://127.0.0.1:9/x.jpg": "ftp", "javascript:alert(1)": "javascript",
        "data:image/png;base64," + base64.b64encode(tiny_png.getvalue()).decode(): "data:",
        "../../../../../../etc/hostname": "path traversal", "http://": "no host",
    }
    rows = [(f"{base}/img/{i}.jpg", f"a good picture {i}") for i in range(N_GOOD)]
    rows += [(f"{base}/img/0.jpg", "the same url again"), (f"{base}/img/1.jpg", "and again")]
    rows += [(url, f"hostile {what}") for url, what in hostile.items()]
    rows += [("", "an empty url")]
    path = folder / "hostile.tsv"
    with open(path, "w") as fh:
        fh.write("url\tcaption\tkey\n")
        for url, caption in rows:
            fh.write(f"{url}\t{caption}\tdup\n")  # a `key` column, the same on every row
    return path, hostile


@pytest.fixture(scope="module")
def hostile_download(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-urls")
    with HostileServer() as server:
        url_list, hostile = _url_list(root / "lists", server.base)
        raw = {
            "paths": {k: str(root / k) for k in ("data", "runs", "results", "resources")},
            "datasets": {"hostile": {"source": "url_list", "url_list": str(url_list), "image_size": 32,
                                     "samples_per_shard": 20, "processes": 1, "threads": 8,
                                     "timeout": TIMEOUT_S, "retries": 0, "max_image_bytes": MAX_IMAGE_BYTES,
                                     # the hostile server is on loopback, which downloads refuse by default
                                     "allowed_networks": ["127.0.0.1/32"]}},
            "defaults": {"dataset": "hostile", "model": "amorlip-tiny"},
            "runs": {"clip": {"method": "clip"}},
        }
        config = load_config(raw)
        cfg_path = root / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        urls = root / "resources" / "hostile" / "urls.parquet"
        source_stats = write_url_parquet(config, "hostile", urls)
        shards = root / "data" / "hostile" / "shards"
        t0 = time.monotonic()
        job = Job(["download", "--config", str(cfg_path), "--dataset", "hostile", "--urls", str(urls),
                   "--out", str(shards)], root / "download.log")
        peak, per_process = 0, {}
        tree = psutil.Process(job.pid)
        while job.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                rss = {}
                for p in [tree] + tree.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss[p.pid] = p.memory_info().rss
                peak = max(peak, sum(rss.values()))
                for pid, value in rss.items():
                    per_process[pid] = max(per_process.get(pid, 0), value)
            if time.monotonic() - t0 > 240:
                job.kill9()
                pytest.fail(f"download still running after 240 s; log:\n{job.text()[-3000:]}")
            time.sleep(0.05)
        rc = job.wait(10)
        wall = time.monotonic() - t0
        manifest = write_index(config, "hostile", shards)
    print(f"\nhostile download: rc {rc}, {wall:.1f} s wall, peak RSS of the download tree {peak / 2**20:.0f} MiB "
          f"(per process: {sorted(round(v / 2**20) for v in per_process.values())} MiB), "
          f"bytes pushed by the hostile server: {server.sent}, seconds held: "
          f"{ {k: round(v, 1) for k, v in server.held.items()} }\nmanifest failures: {manifest['failures']}")
    return {"rc": rc, "wall": wall, "peak": peak, "per_process": list(per_process.values()), "server": server, "manifest": manifest,
            "source_stats": source_stats, "shards": shards, "log": job.text(), "hostile": hostile,
            "url_list": url_list}


def test_hostile_download_finishes_in_bounded_time(hostile_download):
    res = hostile_download
    assert res["rc"] == 0, res["log"][-3000:]
    # every hostile url costs at most a few timeouts; 8 threads work on them in parallel
    assert res["wall"] < 60, f"download took {res['wall']:.1f} s"
    # the drip server's connection was dropped by the client, not by our cap
    assert res["server"].held.get("/drip.jpg", 0) < 6 * TIMEOUT_S, res["server"].held


def test_hostile_bodies_do_not_reach_memory(hostile_download):
    res = hostile_download
    # a worker stops reading once a body passes max_image_bytes (kernel socket buffers come on top)
    assert res["server"].sent.get("/flood.jpg", 0) < MAX_IMAGE_BYTES + 12 * 2**20, res["server"].sent
    # The decompression bomb (7.5 GB if decoded) and the 10 GB bodies never become resident memory.
    # Each img2dataset process starts near 0.9 GiB (it imports torch through albumentations); the
    # tree's sum counts shared library pages once per process, so the bound is per process.
    assert max(res["per_process"]) < 2 * 2**30, f"peak RSS per process {res['per_process']}"


def test_every_row_is_accounted_for_by_reason(hostile_download):
    res = hostile_download
    m, stats = res["manifest"], res["source_stats"]
    assert stats["empty_url"] == 1 and stats["duplicate_url"] == 2 and stats["written"] == stats["rows"] - 1
    assert stats["non_http"] == 5  # file, ftp, javascript, data, the relative path ("http://" is http)
    assert m["attempted"] == stats["written"]
    assert m["samples"] + m["failed"] == m["attempted"]
    assert m["samples"] == N_GOOD + 2, m  # duplicates are downloaded again (and counted by `source`)
    f = m["failures"]
    assert f.get("timeout", 0) >= 2, f  # hang, drip
    assert f.get("too_large", 0) >= 3, f  # short 10 GB, flood, bomb
    assert f.get("bad_url", 0) >= 5, f  # file://, ftp, javascript, data:, no host
    assert f.get("http_404", 0) >= 2, f  # gone, path traversal (the loopback server refuses it)
    assert not [k for k in f if k.startswith("other")], f"unclassified failures: {f}"
    # the list's own `key` column (all "dup") is dropped with a warning; img2dataset's keys stay unique
    assert "columns ['key'] are reserved by img2dataset" in res["log"]
    keys = []
    for tar in res["shards"].glob("*.tar"):
        with tarfile.open(tar) as tf:
            keys += [m.name.split(".")[0] for m in tf if m.name.endswith(".jpg")]
    assert len(keys) == len(set(keys)) == m["samples"]


def test_local_files_never_enter_the_shards(hostile_download):
    """``file://`` rows and redirects to ``file://`` are refused: a url list cannot exfiltrate local files."""
    secret = (res := hostile_download)["url_list"].parent / "secret.jpg"
    for tar in res["shards"].glob("*.tar"):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".json"):
                    meta = json.load(tf.extractfile(member))
                    assert not str(meta.get("url", "")).startswith(("file:", "data:")), meta
    rows = pd.concat([pd.read_parquet(p) for p in res["shards"].glob("*.parquet")])
    local = rows[rows["url"].str.startswith("file:")]
    assert len(local) == 1 and (local["status"] != "success").all(), local
    assert str(secret) in local["url"].iloc[0]


@pytest.mark.parametrize("header, missing", [("link\tcaption", "url"), ("url\ttext", "caption")])
def test_url_list_without_its_columns_stops_naming_them(tmp_path, header, missing):
    """A list whose columns are not the configured ones stops at `source`, before any download."""
    path = tmp_path / "list.tsv"
    path.write_text(f"{header}\nhttp://127.0.0.1/a.jpg\ta caption\n")
    config = load_config({"datasets": {"x": {"source": "url_list", "url_list": str(path)}},
                          "defaults": {"dataset": "x", "model": "amorlip-tiny"}, "runs": {"clip": None}})
    with pytest.raises(ValueError) as err:
        write_url_parquet(config, "x", tmp_path / "urls.parquet")
    message = str(err.value)
    assert f"{missing} column '{missing}' not found" in message and "columns found:" in message
    assert "column_names" in message  # the fix for a headerless list
    assert not (tmp_path / "urls.parquet").exists()
