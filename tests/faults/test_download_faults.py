"""Download faults: interruption, a worker the kernel kills, kills of ``amorlip download``, headers that
never end, and urls that point inside the network.

Each test runs the real img2dataset (through ``amorlip download`` as Snakemake starts it, or through
``download()``) against real HTTP servers on loopback addresses (127.0.0.0/8 and ::1 only; urls to
other non-public addresses are checked with the address classifier alone, so no test can send a
packet off this machine). The server holds chosen urls at a gate, so a test knows a worker is busy
on a given shard when it injects the fault:

- Ctrl-C (SIGINT to the process group) mid-download: img2dataset's own handler exits 0, so the
  download looked complete. Now the exit status is non-zero, the urls never attempted are named
  (log and ``not_attempted.txt``), ``amorlip index`` refuses the partial shards, and a rerun completes;
- SIGKILL of the worker holding a shard (what the OOM killer does): img2dataset's pool waited for it
  forever. Now the download stops within seconds naming the worker's pid, the signal and the shard;
- SIGTERM or SIGKILL of ``amorlip download`` alone: img2dataset's logger process ran on as an orphan
  (and a worker could too). Now every descendant is gone within seconds;
- one header line every 1.5 s, and ``100 Continue`` forever, with ``timeout: 2``: each held a
  download thread until the server gave up. Now the connection is dropped at the deadline;
- loopback targets by IP, by decimal IP, by ``localhost``, over IPv6, behind redirect chains, and a
  redirect to ``ftp:``: all were fetched (urllib logged in to the FTP server). Now they are
  refused unless ``allowed_networks`` covers them, and no request reaches the servers.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from amorlip.config import load_config
from amorlip.data.download import NOT_ATTEMPTED_FILE, download, failure_reason, write_index
from amorlip.data.fetch import bounded_download_image
from amorlip.data.guarded_http import ALLOWED_ENDPOINTS_ENV, ALLOWED_NETWORKS_ENV, non_public_reason
from amorlip.fileio import partial_dir

from .conftest import BIN, REPO, Job, child_env, wait_for

TIMEOUT_S = 2  # per-url deadline of the header tests
GATE_TIMEOUT_S = 20  # long enough that a gated url is still in flight when the fault is injected
HOSTILE_CAP_S = 30  # the longest any hostile route keeps a connection (the old code waited this long)
PER_SHARD = 4


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _client_gone(sock: socket.socket, wait: float) -> bool:
    """Wait up to ``wait`` s; True once the client has closed (it sends nothing after its request)."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server:
    """An HTTP server on one loopback address: good images, a gate, slow headers, endless 100s, redirects.

    ``hits`` counts requests per route, ``clients`` keeps each route's client address, ``held`` how
    long a hostile route's client stayed connected.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.gate, self.stop = threading.Event(), threading.Event()
        self.hits: Counter = Counter()
        self.clients: dict[str, tuple] = {}
        self.held: dict[str, float] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _image(self, seed: int) -> None:
                body = _jpeg(seed)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _drip(self, route: str, first: bytes, each: bytes, pause: float) -> None:
                t0 = time.monotonic()
                with contextlib.suppress(OSError):
                    self.wfile.write(first)
                    self.wfile.flush()
                    while time.monotonic() - t0 < HOSTILE_CAP_S and not server.stop.is_set():
                        if _client_gone(self.connection, pause):
                            break
                        self.wfile.write(each)
                        self.wfile.flush()
                server.held[route] = max(server.held.get(route, 0.0), time.monotonic() - t0)

            def do_GET(self):  # noqa: N802 -- BaseHTTPRequestHandler's name
                path, _, query = self.path.partition("?")
                server.hits[path] += 1
                server.clients[path] = self.client_address
                name = path.rsplit("/", 1)[-1]
                if path.startswith("/img/"):
                    self._image(int(name.split(".")[0]))
                elif path.startswith("/gate/"):  # held until the test opens the gate
                    opened = server.gate.wait(HOSTILE_CAP_S)
                    with contextlib.suppress(OSError):  # the client of an interrupted run is gone
                        if opened and not server.stop.is_set():
                            self._image(int(name.split(".")[0]))
                elif path == "/slow-headers.jpg":  # a valid status line, then one header line every 1.5 s
                    self._drip(path, b"HTTP/1.0 200 OK\r\n", b"X-Padding: still coming\r\n", 1.5)
                elif path == "/continue.jpg":  # interim responses only, forever
                    self._drip(path, b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", 0.5)
                elif path.startswith("/hop/"):  # /hop/3 -> /hop/2 -> /hop/1 -> /hop/0 -> /img/7.jpg
                    n = int(name)
                    self._redirect(f"/hop/{n - 1}" if n > 0 else "/img/7.jpg")
                elif path == "/to":  # a redirect to wherever ?u= says
                    self._redirect(urllib.parse.parse_qs(query)["u"][0])
                else:
                    self.send_error(404)

        self.httpd = (_V6Server if ":" in host else ThreadingHTTPServer)((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class FtpListener:
    """A TCP listener on loopback that counts connections (and what the client sends) in a real FTP dialogue."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections, self.received = 0, b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1)
                conn.sendall(b"220 ready\r\n")
                self.received += conn.recv(1024)

    def __enter__(self) -> FtpListener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _write_dataset(root: Path, rows: list[tuple[str, str]], **options) -> tuple[Path, Path, dict]:
    """``urls.parquet`` (the list `amorlip source` would write) + ``config.yaml``; returns both and the config."""
    urls = root / "resources" / "d" / "urls.parquet"
    urls.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(urls, index=False)
    raw = {
        "paths": {k: str(root / k) for k in ("data", "runs", "results", "resources")},
        "datasets": {"d": {"source": "url_list", "url_list": str(urls), "image_size": 32,
                           "samples_per_shard": PER_SHARD, "processes": 1, "threads": 4, "retries": 0,
                           **options}},
        "defaults": {"dataset": "d", "model": "amorlip-tiny"},
        "runs": {"clip": {"method": "clip"}},
    }
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return urls, cfg, load_config(raw)


def _download_job(root: Path, cfg: Path, urls: Path, log: str) -> Job:
    return Job(["download", "--config", str(cfg), "--dataset", "d", "--urls", str(urls),
                "--out", str(root / "data" / "d" / "shards")], root / log)


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def _worker_fetching(job: Job, server: Server) -> psutil.Process | None:
    """The descendant of ``job`` holding a connection to ``server`` (the worker downloading from it)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(job.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(c.raddr and c.raddr.port == server.port for c in child.net_connections("tcp")):
                    return child
    return None


def _gated_list(server: Server, gate_shard: int, shards: int = 3) -> list[tuple[str, str]]:
    """``shards`` x PER_SHARD good urls; the last url of shard ``gate_shard`` waits at the gate."""
    rows = [(f"{server.base}/img/{i}.jpg", f"picture {i}") for i in range(shards * PER_SHARD)]
    i = gate_shard * PER_SHARD + PER_SHARD - 1
    rows[i] = (f"{server.base}/gate/{i}.jpg", f"picture {i}, gated")
    return rows


# --------------------------------------------------------------------------- interrupted download


def test_interrupted_download_names_unattempted_urls_and_rerun_completes(tmp_path):
    with Server() as server:
        rows = _gated_list(server, gate_shard=1)
        urls, cfg, config = _write_dataset(tmp_path, rows, timeout=GATE_TIMEOUT_S,
                                           allowed_networks=["127.0.0.1/32"])
        shards = tmp_path / "data" / "d" / "shards"
        job = _download_job(tmp_path, cfg, urls, "download-1.log")
        wait_for(lambda: server.hits["/gate/7.jpg"], 120, what="the gated url of shard 1", proc=job.proc)
        tree = [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
        t0 = time.monotonic()
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground group
        rc = job.wait(60)
        stop_s = time.monotonic() - t0
        log = job.text()
        never = [u for u, _ in rows[PER_SHARD:]]  # shard 1 was cut short, shard 2 never started
        print(f"\nCtrl-C mid-download: rc {rc} after {stop_s:.1f} s (interpreter shutdown included)")
        assert rc == 128 + signal.SIGINT, log[-3000:]
        assert "interrupted by SIGINT" in log and "8 of 12 urls were never attempted" in log, log[-3000:]
        for url in never:
            assert url in log, f"{url} not named:\n{log[-3000:]}"
        print(f"the {len(never)} urls of the unfinished shards 00001 and 00002 are named")
        # the CLI builds the folder in shards.partial (fileio.staged_dir): what a workflow manager deletes
        # after a failed job is the output, shards/, which does not exist until the download is complete
        building = partial_dir(shards)
        assert not shards.exists()
        assert (building / NOT_ATTEMPTED_FILE).read_text().split() == never
        wait_for(lambda: not _alive(tree), 10, what=f"children {_alive(tree)} to exit")
        # the index refuses the unfinished download, naming where it is, instead of indexing 4 of 12 samples
        with pytest.raises(ValueError, match=r"the download is unfinished in .*shards\.partial"):
            write_index(config, "d", shards)
        # ... and the two-thirds-missing shard set itself, were it pointed at
        with pytest.raises(ValueError, match=r"lacks 2 of its 3 shards \(00001, 00002\): 8 of the 12 urls"):
            write_index(config, "d", building)
        assert not (tmp_path / "data" / "d" / "manifest.json").exists()

        server.gate.set()
        job = _download_job(tmp_path, cfg, urls, "download-2.log")
        assert job.wait(120) == 0, job.text()[-3000:]
    assert not building.exists()  # moved to shards/ once complete, the 4 finished samples resumed in it
    manifest = write_index(config, "d", shards)
    assert manifest["urls"] == manifest["attempted"] == manifest["samples"] == 12, manifest
    assert not (shards / NOT_ATTEMPTED_FILE).exists()
    print(f"rerun: {manifest['samples']}/{manifest['urls']} samples indexed")


def test_a_failed_download_job_keeps_its_shards_for_snakemakes_retry(tmp_path):
    """Through the real `download` rule: Snakemake deletes a failed job's output folder before anything
    reruns it, which would throw away every finished shard of a download stopped at its time limit.
    The CLI builds the folder in <out>.partial, which is no output: the rerun resumes there (the
    finished shard is not fetched again) and the folder appears as the output only when complete."""
    with Server() as server:
        rows = _gated_list(server, gate_shard=1)
        listing = tmp_path / "list.parquet"
        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(listing, index=False)
        _write_dataset(tmp_path, rows, timeout=GATE_TIMEOUT_S, allowed_networks=["127.0.0.1/32"],
                       url_list=str(listing))
        shards = tmp_path / "data" / "d" / "shards"
        building = partial_dir(shards)
        cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
               str(tmp_path / "config.yaml"), "--cores", "1", str(shards)]
        with open(tmp_path / "snakemake-1.log", "w") as out:
            sm = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            wait_for(lambda: server.hits["/gate/7.jpg"], 180, what="the gated url of shard 1", proc=sm)
            assert (building / "00000_stats.json").exists() and not shards.exists()
            # the job's end as at a SLURM time limit: SIGTERM to the `amorlip download` process
            for proc in psutil.Process(sm.pid).children(recursive=True):
                if "download" in proc.cmdline() and "amorlip" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGTERM)
            assert sm.wait(120) != 0
        finally:
            if sm.poll() is None:
                os.killpg(sm.pid, signal.SIGKILL)
        text = (tmp_path / "snakemake-1.log").read_text()
        assert "Error in rule download" in text, text[-3000:]
        assert not shards.exists() and (building / "00000.tar").exists(), text[-3000:]
        first_hits = sum(server.hits[f"/img/{i}.jpg"] for i in range(PER_SHARD))

        server.gate.set()
        rerun = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert sum(server.hits[f"/img/{i}.jpg"] for i in range(PER_SHARD)) == first_hits  # shard 0: not again
    assert not building.exists()
    assert sorted(p.name for p in shards.glob("*_stats.json")) == [f"0000{i}_stats.json" for i in range(3)]


# --------------------------------------------------------------------------- killed worker


def test_worker_killed_by_the_kernel_stops_the_download_naming_it(tmp_path):
    with Server() as server:
        rows = _gated_list(server, gate_shard=1)
        urls, cfg, _ = _write_dataset(tmp_path, rows, timeout=GATE_TIMEOUT_S, allowed_networks=["127.0.0.1/32"])
        job = _download_job(tmp_path, cfg, urls, "download.log")
        wait_for(lambda: server.hits["/gate/7.jpg"], 120, what="the gated url of shard 1", proc=job.proc)
        worker = wait_for(lambda: _worker_fetching(job, server), 10, what="the worker's connection")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGKILL)  # what the OOM killer does
        rc = job.wait(60)  # img2dataset's pool waited here forever
        stop_s = time.monotonic() - t0
    log = job.text()
    print(f"\nworker {worker.pid} SIGKILLed on shard 00001: download exited rc {rc} after {stop_s:.1f} s")
    assert rc == 1, log[-3000:]
    assert f"download worker process {worker.pid} was killed by SIGKILL" in log, log[-3000:]
    assert "while downloading shard 00001" in log and "OOM" in log
    assert "8 of 12 urls were never attempted" in log and rows[-1][0] in log
    assert stop_s < 15


# --------------------------------------------------------------------------- orphans


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_download_leaves_no_child_running(tmp_path, signum):
    with Server() as server:
        rows = _gated_list(server, gate_shard=0, shards=2)
        urls, cfg, _ = _write_dataset(tmp_path, rows, timeout=GATE_TIMEOUT_S, allowed_networks=["127.0.0.1/32"])
        job = _download_job(tmp_path, cfg, urls, "download.log")
        wait_for(lambda: server.hits["/gate/3.jpg"], 120, what="the gated url of shard 0", proc=job.proc)
        worker = wait_for(lambda: _worker_fetching(job, server), 10, what="the worker's connection")
        tree = [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
        assert worker.pid in tree, tree
        t0 = time.monotonic()
        os.kill(job.pid, signum)  # the parent alone, as `kill PID` or a job scheduler does
        rc = job.wait(30)
        wait_for(lambda: not _alive(tree), 15, what=f"children {_alive(tree)} to exit after the parent's {signum.name}")
        gone_s = time.monotonic() - t0
    print(f"\n{signum.name} to amorlip download: rc {rc}; its {len(tree)} descendants gone {gone_s:.1f} s later")
    if signum == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM, job.text()[-3000:]
        assert "interrupted by SIGTERM" in job.text() and rows[-1][0] in job.text()
    else:
        assert rc == -signal.SIGKILL


# --------------------------------------------------------------------------- headers and addresses


@pytest.fixture(scope="module")
def guarded_download(tmp_path_factory):
    """One download under ``allowed_networks: [127.0.0.1/32]``: slow headers, endless 100s, redirects."""
    root = tmp_path_factory.mktemp("guarded")
    with Server() as server, Server("127.0.0.2") as inside, FtpListener() as ftp:
        other_v6 = contextlib.nullcontext(None)
        with contextlib.suppress(OSError):
            other_v6 = Server("::1")
        with other_v6 as v6:
            def to(url: str) -> str:
                return f"{server.base}/to?u={urllib.parse.quote(url, safe='')}"

            hostile = {
                f"{server.base}/slow-headers.jpg": "slow headers",
                f"{server.base}/continue.jpg": "endless 100 Continue",
                f"{server.base}/hop/3": "4 redirects inside the allowed network",
                to(f"{inside.base}/img/1.jpg"): "redirect to another loopback address",
                to(f"http://{int.from_bytes(socket.inet_aton('127.0.0.2'), 'big')}:{inside.port}/img/2.jpg"):
                    "redirect to it as a decimal IP",
                to(f"ftp://anonymous:secret@127.0.0.1:{ftp.port}/x.jpg"): "redirect to ftp",
                to("file:///etc/hostname"): "redirect to file",
                f"{inside.base}/img/3.jpg": "another loopback address, listed",
            }
            if v6 is not None:
                hostile[to(f"{v6.base}/img/4.jpg")] = "redirect to ::1"
            rows = [(f"{server.base}/img/{i}.jpg", f"picture {i}") for i in range(3)]
            rows += [(url, what) for url, what in hostile.items()]
            urls, _, config = _write_dataset(root, rows, timeout=TIMEOUT_S, threads=len(rows),
                                             samples_per_shard=len(rows), allowed_networks=["127.0.0.1/32"])
            t0 = time.monotonic()
            summary = download(config, "d", urls, root / "data" / "d" / "shards")
            wall = time.monotonic() - t0
            time.sleep(0.5)  # let the hostile handlers record how long they were held
            table = pd.read_parquet(root / "data" / "d" / "shards" / "00000.parquet")
            failures = Counter(failure_reason(m) for m, st in zip(table["error_message"], table["status"],
                                                                    strict=True) if st != "success")
            result = {"summary": summary, "wall": wall, "server": server, "inside": inside, "ftp": ftp, "v6": v6,
                      "rows": table, "failures": failures}
    print(f"\nguarded download: {wall:.1f} s wall (worker start-up included); slow routes held "
          f"{ {k: round(v, 2) for k, v in server.held.items()} } s with timeout {TIMEOUT_S}; "
          f"failures {dict(result['failures'])}; hits inside: {dict(inside.hits)}, ftp connections: {ftp.connections}")
    return result


def _status(rows: pd.DataFrame, caption: str) -> str:
    row = rows[rows["caption"] == caption].iloc[0]
    return "success" if row["status"] == "success" else str(row["error_message"])


def test_slow_headers_and_endless_100_continue_are_cut_at_the_deadline(guarded_download):
    res = guarded_download
    held = res["server"].held
    for route, caption in [("/slow-headers.jpg", "slow headers"), ("/continue.jpg", "endless 100 Continue")]:
        assert route in held, f"{route} was never requested"
        # the connection ends at the per-url deadline (the old code held it until the server gave up)
        assert held[route] < TIMEOUT_S + 1.0, f"{route} held {held[route]:.1f} s with timeout {TIMEOUT_S}"
        assert "timed out" in _status(res["rows"], caption), _status(res["rows"], caption)
    assert res["failures"]["timeout"] == 2, res["failures"]


def test_redirects_are_checked_at_every_hop(guarded_download):
    res, rows = guarded_download, guarded_download["rows"]
    assert _status(rows, "4 redirects inside the allowed network") == "success"
    assert res["server"].hits["/hop/0"] == 1 and res["server"].hits["/img/7.jpg"] == 1
    for caption in ["redirect to another loopback address", "redirect to it as a decimal IP",
                    "another loopback address, listed"] + (["redirect to ::1"] if res["v6"] else []):
        assert _status(rows, caption).startswith("<urlopen error blocked address: "), (caption, _status(rows, caption))
    for caption in ["redirect to ftp", "redirect to file"]:
        assert "unsupported url scheme" in _status(rows, caption), (caption, _status(rows, caption))
    # nothing reached the servers that the policy refuses, and no credentials reached the ftp listener
    assert sum(res["inside"].hits.values()) == 0, res["inside"].hits
    assert res["v6"] is None or sum(res["v6"].hits.values()) == 0, res["v6"].hits
    assert res["ftp"].connections == 0 and res["ftp"].received == b""
    f = res["failures"]
    assert f["blocked_address"] == 3 + bool(res["v6"]) and f["bad_url"] == 2, f
    assert res["summary"]["successes"] == 4 and res["summary"]["not_attempted"] == 0


def test_loopback_is_refused_by_default(monkeypatch):
    """Default policy (no ``allowed_networks``), through the fetch img2dataset's workers call: 127.0.0.1 by
    IP, by decimal IP, by ``localhost``, as 0.0.0.0 and as ::1 never reach the server. (Relative-path
    urls still download under this default: test_download.py, through the download's own server.)"""
    with Server() as server, contextlib.ExitStack() as stack:
        v6 = None
        with contextlib.suppress(OSError):
            v6 = stack.enter_context(Server("::1"))
        decimal = int.from_bytes(socket.inet_aton("127.0.0.1"), "big")
        refused = [f"{server.base}/img/10.jpg", f"http://localhost:{server.port}/img/11.jpg",
                   f"http://{decimal}:{server.port}/img/12.jpg", f"http://0.0.0.0:{server.port}/img/13.jpg"]
        refused += [f"{v6.base}/img/14.jpg"] if v6 is not None else []
        monkeypatch.delenv(ALLOWED_NETWORKS_ENV, raising=False)
        monkeypatch.delenv(ALLOWED_ENDPOINTS_ENV, raising=False)
        results = [bounded_download_image((i, url), 5, None, None) for i, url in enumerate(refused)]
        # with the network allowed, the same fetch reaches the server: the refusal is the policy's
        monkeypatch.setenv(ALLOWED_NETWORKS_ENV, "127.0.0.1/32")
        _, body, error = bounded_download_image((0, refused[0]), 5, None, None)
        hits = sum(server.hits.values()) + (sum(v6.hits.values()) if v6 else 0)
    print(f"\ndefault policy: {len(refused)} loopback urls refused, requests that reached a server: {hits - 1}")
    for url, (_, body_, message) in zip(refused, results, strict=True):
        assert body_ is None and failure_reason(message) == "blocked_address", (url, message)
        assert "not a public address" in message and "allowed_networks" in message
    assert error is None and body.read() == _jpeg(10)
    assert hits == 1


@pytest.mark.parametrize("address, reason", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("224.0.0.251", "multicast"), ("100.64.0.1", "not globally routable"),
    ("0.0.0.0", "unspecified"), ("fe80::1", "link-local"), ("fd00::1", "private"), ("ff02::1", "multicast"),
    ("::ffff:169.254.169.254", "link-local (embedded in ::ffff:a9fe:a9fe)"),
    ("2002:a00:1::", "private (embedded in 2002:a00:1::)"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_classes_refused_by_default(address, reason):
    """Non-loopback internal addresses are classified only (a test must not send packets to them)."""
    assert non_public_reason(address) == reason


def test_allowed_networks_must_be_networks(tmp_path):
    urls, _, config = _write_dataset(tmp_path, [("http://127.0.0.1:9/x.jpg", "x")])
    config["datasets"]["d"]["allowed_networks"] = ["10.0.0.0/33"]  # passes the schema's pattern
    with pytest.raises(ValueError, match=r"datasets\.d\.allowed_networks\[0\] = '10.0.0.0/33' is not an IP network"):
        download(config, "d", urls, tmp_path / "shards")
