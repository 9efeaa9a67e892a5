"""A bounded fetch for img2dataset: http(s) only, public addresses, a byte cap, one deadline per url.

img2dataset 1.47 fetches each url with ``urllib.request.urlopen(url, timeout=t).read()``, which on a
hostile url list means: any scheme urllib knows (``file://`` copies local files into the shards,
``data:`` injects content, redirects may lead to ``ftp:``), any address (this machine's services,
the private network, the cloud metadata address), the whole body in memory whatever its size (a
10 GB response is read whole), and a timeout that applies to each socket read only (a server that
drips one byte or one header line at a time holds a download thread forever).
:func:`bounded_download_image` keeps img2dataset's signature and return value and fetches through
:func:`amorlip.data.guarded_http.open_url` (schemes and addresses checked on every redirect hop,
one deadline for connect, headers and body) with a byte cap on top; its error messages are the ones
``download.failure_reason`` counts (``bad_url``, ``blocked_address``, ``too_large``, ``timeout``).

How it reaches img2dataset's workers: they are *spawned* processes that unpickle img2dataset's
``Downloader``. :func:`patched` swaps in :class:`BoundedDownloader`, a subclass that lives here, so
every worker imports this module while unpickling it, and importing this module installs the
bounded function into ``img2dataset.downloader``. The byte cap travels in ``AMORLIP_MAX_IMAGE_BYTES``
and the address policy in the variables named in :mod:`amorlip.data.guarded_http` (workers inherit
the environment).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Iterator

from img2dataset import downloader as _i2d_downloader

from amorlip.data.guarded_http import open_url

MAX_BYTES_ENV = "AMORLIP_MAX_IMAGE_BYTES"
_CHUNK = 1 << 16
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def bounded_download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image`` through :func:`~amorlip.data.guarded_http.open_url`, with a byte cap.

    Returns ``(key, BytesIO | None, error message | None)`` like the original.
    """
    key, url = row
    max_bytes = int(os.environ.get(MAX_BYTES_ENV, "0")) or None
    user_agent = _USER_AGENT
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        with open_url(str(url), timeout, headers={"User-Agent": user_agent}) as r:
            if disallowed_header_directives and _i2d_downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length", "")
            if max_bytes and length.isdigit() and int(length) > max_bytes:
                return key, None, f"response too large: Content-Length {length} > max_image_bytes {max_bytes}"
            body = io.BytesIO()
            # read1 returns what has arrived (never waits for a full chunk); each read waits at most
            # the time left before the deadline
            while chunk := r.read1(_CHUNK):
                body.write(chunk)
                if max_bytes and body.tell() > max_bytes:
                    return key, None, f"response too large: more than max_image_bytes {max_bytes} bytes"
            body.seek(0)
            return key, body, None
    except Exception as err:  # noqa: BLE001 -- img2dataset's contract: the error becomes the row's status
        return key, None, str(err) or type(err).__name__


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
