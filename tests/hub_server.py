"""A loopback server speaking the few Hugging Face Hub endpoints ``snapshot_download`` calls.

Serves ``<site>/<owner>/<repo>/...`` as dataset repos at one fixed revision: repo info
(``/api/datasets/<repo>/revision/<rev>``), the file tree (``/api/datasets/<repo>/tree/<rev>``) and
the files (``/datasets/<repo>/resolve/<rev>/<path>``: HEAD and GET, with HTTP Range), each with
the headers huggingface_hub reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``). Records every
request and its ``Authorization`` header, so a test can see what was fetched and with which token.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


def _oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id, as the hub's oid


class _HubHandler(http.server.BaseHTTPRequestHandler):
    site: Path
    requests: list

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _missing(self, code="RepoNotFound"):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        type(self).requests.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = self.site / parts[2] / parts[3]
            if not repo.is_dir():
                return self._missing()
            files = sorted(p for p in repo.rglob("*") if p.is_file())
            if parts[4] == "revision":
                return self._json({"id": f"{parts[2]}/{parts[3]}", "sha": SHA,
                                   "siblings": [{"rfilename": str(p.relative_to(repo))} for p in files]})
            entries = [{"type": "directory", "path": str(d.relative_to(repo)), "oid": SHA, "size": 0}
                       for d in sorted(repo.rglob("*")) if d.is_dir()]
            entries += [{"type": "file", "path": str(p.relative_to(repo)), "size": p.stat().st_size, "oid": _oid(p)}
                        for p in files]
            return self._json(entries)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo = self.site / parts[1] / parts[2]
            file = repo / "/".join(parts[5:])
            if not repo.is_dir():
                return self._missing()
            if not file.is_file():
                return self._missing("EntryNotFound")
            data = file.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", SHA)
            self.send_header("ETag", f'"{_oid(file)}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data[start:])
            return None
        return self._missing()


class HubServer:
    """Context manager: the hub for ``site`` on 127.0.0.1; ``endpoint`` is its HF_ENDPOINT."""

    def __init__(self, site: Path):
        self.handler = type("H", (_HubHandler,), {"site": Path(site), "requests": []})
        self._server = None

    @property
    def requests(self) -> list:
        return self.handler.requests

    def __enter__(self) -> HubServer:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
