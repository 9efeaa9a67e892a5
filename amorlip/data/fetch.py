"""A bounded fetch for img2dataset: http(s) only, a byte cap, and a deadline for the whole response.

img2dataset 1.47 fetches each url with ``urllib.request.urlopen(url, timeout=t).read()``, which on a
hostile url list means: any scheme urllib knows (``file://`` copies local files into the shards,
``data:`` injects content), the whole body in memory whatever its size (a 10 GB response is read
whole), and a timeout that applies to each socket read only (a server that drips one byte per
second holds a download thread forever). :func:`bounded_download_image` keeps img2dataset's
signature and return value and adds the three bounds; its error messages are the ones
``download.failure_reason`` counts (``bad_url``, ``too_large``, ``timeout``).

How it reaches img2dataset's workers: they are *spawned* processes that unpickle img2dataset's
``Downloader``. :func:`patched` swaps in :class:`BoundedDownloader`, a subclass that lives here, so
every worker imports this module while unpickling it, and importing this module installs the
bounded function into ``img2dataset.downloader``. The byte cap travels in ``AMORLIP_MAX_IMAGE_BYTES``
(workers inherit the environment).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

from img2dataset import downloader as _i2d_downloader

MAX_BYTES_ENV = "AMORLIP_MAX_IMAGE_BYTES"
ALLOWED_SCHEMES = ("http", "https")
_CHUNK = 1 << 16
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def bounded_download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image`` with a scheme allowlist, a byte cap and a whole-response deadline.

    Returns ``(key, BytesIO | None, error message | None)`` like the original.
    """
    key, url = row
    scheme = urllib.parse.urlsplit(str(url)).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return key, None, f"unsupported url scheme '{scheme}' (only http and https are fetched)"
    max_bytes = int(os.environ.get(MAX_BYTES_ENV, "0")) or None
    user_agent = _USER_AGENT
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if disallowed_header_directives and _i2d_downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length", "")
            if max_bytes and length.isdigit() and int(length) > max_bytes:
                return key, None, f"response too large: Content-Length {length} > max_image_bytes {max_bytes}"
            body = io.BytesIO()
            while chunk := r.read1(_CHUNK):  # returns what has arrived; never waits for a full chunk
                body.write(chunk)
                if max_bytes and body.tell() > max_bytes:
                    return key, None, f"response too large: more than max_image_bytes {max_bytes} bytes"
                if time.monotonic() > deadline:
                    return key, None, f"download timed out: body incomplete after {timeout} s"
            body.seek(0)
            return key, body, None
    except Exception as err:  # noqa: BLE001 -- img2dataset's contract: the error becomes the row's status
        return key, None, str(err)


class BoundedDownloader(_i2d_downloader.Downloader):
    """img2dataset's Downloader, defined here so that unpickling it in a worker imports this module."""


def install() -> None:
    _i2d_downloader.download_image = bounded_download_image


@contextlib.contextmanager
def patched(max_bytes: int) -> Iterator[None]:
    """For the duration: img2dataset builds a :class:`BoundedDownloader`, workers fetch with the bounds."""
    # `img2dataset.main` the attribute is the package's `main` function; the module is in sys.modules
    i2d_main = importlib.import_module("img2dataset.main")
    old_env, old_cls = os.environ.get(MAX_BYTES_ENV), i2d_main.Downloader
    os.environ[MAX_BYTES_ENV] = str(int(max_bytes))
    i2d_main.Downloader = BoundedDownloader
    try:
        yield
    finally:
        i2d_main.Downloader = old_cls
        if old_env is None:
            os.environ.pop(MAX_BYTES_ENV, None)
        else:
            os.environ[MAX_BYTES_ENV] = old_env


install()  # in the parent and, through BoundedDownloader's unpickling, in every spawned worker
