"""A loopback HTTP server whose every url says what it answers: the failure mix of a real crawl, on demand.

The fan-out and retry tests and ``benchmarks/download_scale.py`` download through the real
img2dataset from it, so the ground truth of every url (what the server was told to do) is known and
the download's accounting can be compared with it url by url. The path's first segment is the kind:

- ``/img/N.jpg``: a JPEG (one of a few fixed ones, chosen by N) -> success
- ``/redirect/N.jpg``: 302 to ``/img/N.jpg`` -> success
- ``/404/N.jpg``: 404 -> ``http_404``
- ``/html/N.jpg``: 200 with an HTML page -> ``decode_error``
- ``/slow/N.jpg``: answers after ``slow_s`` seconds (above the download's timeout) -> ``timeout``
- ``/flaky/N.jpg``: 503 until :meth:`ScriptedServer.recover`, then the JPEG -> ``http_503``, then success
- ``/flakyslow/N.jpg``: as ``/slow/`` until recovered, then the JPEG -> ``timeout``, then success

Binds 127.0.0.1 only, on a free port; a download must allow it (``allowed_networks: [127.0.0.1/32]``).
"""

from __future__ import annotations

import http.server
import io
import threading
import time

from amorlip.data.loopback import LOOPBACK_HOST

KINDS = ("img", "redirect", "404", "html", "slow", "flaky", "flakyslow")
# the short failure reason (amorlip.data.download.failure_reason) each kind ends in, None = success
OUTCOME = {"img": None, "redirect": None, "404": "http_404", "html": "decode_error", "slow": "timeout",
           "flaky": "http_503", "flakyslow": "timeout"}
_HTML = b"<html><body>This page is not an image</body></html>"


def _jpegs(n: int = 8) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        parts = self.path.strip("/").split("/")
        kind, name = (parts + [""])[:2] if len(parts) == 2 else ("", "")
        number = name.split(".")[0]
        if kind not in KINDS or not number.isdigit():
            return self._send(404, b"not found", "text/plain")
        recovered = self.server.recovered.is_set()
        if kind == "404":
            return self._send(404, b"not found", "text/plain")
        if kind == "html":
            return self._send(200, _HTML, "text/html")
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/img/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if kind == "flaky" and not recovered:
            return self._send(503, b"busy", "text/plain")
        if kind == "slow" or (kind == "flakyslow" and not recovered):
            time.sleep(self.server.slow_s)
        return self._send(200, self.server.jpegs[int(number) % len(self.server.jpegs)], "image/jpeg")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to do
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
    slow_s: float
    jpegs: list[bytes]
    recovered: threading.Event


class ScriptedServer:
    """Context manager: the scripted server on 127.0.0.1 (free port); ``url(kind, n)`` names a url."""

    def __init__(self, slow_s: float = 3.0) -> None:
        self.slow_s = slow_s
        self._server: _Server | None = None

    def url(self, kind: str, n: int) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown url kind {kind!r} (kinds: {', '.join(KINDS)})")
        return f"http://{LOOPBACK_HOST}:{self._server.server_address[1]}/{kind}/{n}.jpg"

    def recover(self) -> None:
        """From now on ``flaky`` and ``flakyslow`` urls answer with their image."""
        self._server.recovered.set()

    def __enter__(self) -> ScriptedServer:
        self._server = _Server((LOOPBACK_HOST, 0), _Handler)
        self._server.slow_s, self._server.jpegs, self._server.recovered = self.slow_s, _jpegs(), threading.Event()
        threading.Thread(target=self._server.serve_forever, name="scripted-http", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server = None
