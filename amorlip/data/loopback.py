"""Serve a local folder on 127.0.0.1 so img2dataset downloads local files exactly like remote urls.

The demo corpus (and any url list of relative paths) goes through the same img2dataset code path as
CC3M: same decoding, resizing, failure accounting and shard layout. The server binds the loopback
interface only (nothing outside the machine can reach it), takes a free port, refuses paths that
resolve outside its root (``..``, symlinks) and directory listings, and may refuse files larger than
``max_bytes`` (HTTP 413), which bounds what a download worker holds in memory per url.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
import urllib.parse
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"


class _RootedFileHandler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of regular files under ``directory``; everything else is a 404."""

    max_bytes: int | None = None

    def send_head(self):
        path = Path(self.translate_path(self.path))
        root = Path(self.directory).resolve()
        try:
            resolved = path.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            self.send_error(404, "File not found")
            return None
        # translate_path already drops '..' components; a symlink may still point outside the root
        if not resolved.is_relative_to(root) or not resolved.is_file():
            self.send_error(404, "File not found")
            return None
        if self.max_bytes is not None and resolved.stat().st_size > self.max_bytes:
            self.send_error(413, "File larger than max_bytes")
            return None
        return super().send_head()

    def list_directory(self, path):  # pragma: no cover - send_head never reaches it
        self.send_error(404, "File not found")
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("loopback %s: " + format, self.address_string(), *args)


class _Server(http.server.ThreadingHTTPServer):
    # img2dataset opens up to processes x threads connections at once; the stdlib backlog of 5 would
    # drop SYNs in a burst and stall those urls for a TCP retransmit
    request_queue_size = 128
    daemon_threads = True


class LoopbackFileServer:
    """Context manager: a threaded HTTP server for ``root`` on 127.0.0.1 (free port).

    >>> with LoopbackFileServer("resources/emoji-demo") as server:
    ...     server.url_for("images/0001.png")   # 'http://127.0.0.1:PORT/images/0001.png'
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"loopback server root is not a folder: {self.root}")
        self.max_bytes = max_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return LOOPBACK_HOST

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("loopback server is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.port}"

    def url_for(self, relative_path: str) -> str:
        """The url of a file given by its path relative to the root (posix separators)."""
        return f"{self.base_url}/{urllib.parse.quote(relative_path.lstrip('/'))}"

    def start(self) -> LoopbackFileServer:
        handler = type("_Handler", (_RootedFileHandler,), {"max_bytes": self.max_bytes})
        self._server = _Server((LOOPBACK_HOST, 0), partial(handler, directory=str(self.root)))
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-http", daemon=True)
        self._thread.start()
        log.info("loopback server: %s serving %s", self.base_url, self.root)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("loopback server stopped (%s)", self.root)
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackFileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
