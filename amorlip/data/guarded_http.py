"""urllib with an address policy on every hop and one deadline for the whole response.

Why: a url list is input nobody here wrote. With plain ``urllib.request.urlopen`` a listed url (or
any redirect it answers with) can reach this machine's own services, the cluster's private network
or the cloud metadata address (169.254.169.254), and redirects may switch to ``ftp:``, where urllib
logs in. And ``timeout`` there applies to each socket operation only: a server that sends one
header line every 1.5 s, or ``100 Continue`` forever, holds a download thread indefinitely.

:func:`open_url` is ``urlopen`` with three differences:

- only http and https are opened, for the listed url and for every redirect target (the opener has
  no ftp/file/data handler at all, and a redirect to another scheme is refused: ``bad_url``);
- each connection is made to an address that passed :class:`AddressPolicy` *after* name resolution
  (the address checked is the address connected to, so a name that resolves to a private address,
  ``localhost`` included, is refused too): loopback, private (RFC 1918, unique-local), link-local,
  multicast, shared, reserved and unspecified addresses are refused unless an allowed network or the
  pipeline's own loopback endpoint covers them;
- one deadline (``timeout`` seconds from the call) bounds the connect, the status line, every
  header, ``100 Continue`` interim responses, each redirect hop and the body: every socket read
  waits at most the time left.

The policy travels to img2dataset's spawned workers in the environment (``ALLOWED_NETWORKS_ENV``,
``ALLOWED_ENDPOINTS_ENV``). With an http(s) proxy configured in the environment the connection goes
to the proxy (which the user chose); the target's own name is then resolved and checked here, but
the proxy resolves it again when it connects.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

ALLOWED_SCHEMES = ("http", "https")
ALLOWED_NETWORKS_ENV = "AMORLIP_ALLOWED_NETWORKS"  # comma-separated CIDR networks
ALLOWED_ENDPOINTS_ENV = "AMORLIP_ALLOWED_ENDPOINTS"  # comma-separated ip:port (the loopback file server)
BLOCKED = "blocked address"  # start of every refusal message; download.failure_reason counts it
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddressError(OSError):
    """A connection the address policy refused (urllib reports it as ``<urlopen error blocked address ...>``)."""


class DeadlineError(TimeoutError):
    """The whole response did not arrive within the deadline (counted as ``timeout``)."""


def non_public_reason(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public internet address (``'loopback'``, ``'private'``, ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if ip.version == 6:
        # IPv4 addresses carried inside IPv6 ones reach the IPv4 host they embed
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        for inner in embedded:
            if inner is not None and (reason := non_public_reason(inner)):
                return f"{reason} (embedded in {ip})"
    checks = [("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("private", ip.is_private), ("reserved", ip.is_reserved),
              ("not globally routable", not ip.is_global)]
    return next((name for name, hit in checks if hit), None)


def parse_networks(values: Iterable[str], key: str = "allowed_networks") -> tuple:
    """CIDR strings -> ip_network objects; a bad entry raises ``ValueError`` naming ``key[i]``."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError as err:
            raise ValueError(f"{key}[{i}] = {value!r} is not an IP network ({err}); "
                             "write e.g. 10.0.0.0/8, 192.168.1.20/32 or fd00::/8") from None
    return tuple(out)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a download may connect to: public ones, plus ``networks`` and exact ``endpoints``."""

    networks: tuple = ()
    endpoints: frozenset = frozenset()  # {(ip, port)}

    @classmethod
    def from_env(cls) -> AddressPolicy:
        return _policy_from(os.environ.get(ALLOWED_NETWORKS_ENV, ""), os.environ.get(ALLOWED_ENDPOINTS_ENV, ""))

    def refusal(self, ip: str, port: int) -> str | None:
        """None when ``ip:port`` may be connected to, else the reason it may not."""
        ip = ip.split("%", 1)[0]
        if (ip, int(port)) in self.endpoints:
            return None
        addr = ipaddress.ip_address(ip)
        if any(addr.version == net.version and addr in net for net in self.networks):
            return None
        return non_public_reason(addr)


@functools.lru_cache(maxsize=8)
def _policy_from(networks: str, endpoints: str) -> AddressPolicy:
    nets = parse_networks([n for n in networks.split(",") if n.strip()], ALLOWED_NETWORKS_ENV)
    eps = set()
    for item in filter(None, (e.strip() for e in endpoints.split(","))):
        host, _, port = item.rpartition(":")
        eps.add((host.strip("[]"), int(port)))
    return AddressPolicy(nets, frozenset(eps))


class _Guard:
    """One fetch: its deadline and its policy, shared by every hop of a redirect chain."""

    def __init__(self, timeout: float, policy: AddressPolicy):
        self.timeout = float(timeout)
        self.deadline = time.monotonic() + self.timeout
        self.policy = policy

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineError(f"timed out: the response was not complete within the {self.timeout:g} s deadline")
        return left

    def check_name(self, host: str, port: int) -> None:
        """Refuse ``host`` when any of its addresses is refused (used for the target behind a proxy)."""
        for *_, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            if reason := self.policy.refusal(sockaddr[0], sockaddr[1]):
                raise BlockedAddressError(self._message(host, [f"{sockaddr[0]} ({reason})"]))

    def connect(self, address, timeout=None, source_address=None, *, check: bool = True) -> socket.socket:
        """``socket.create_connection`` that connects only to addresses the policy allows, within the deadline."""
        host, port = address
        refused, last_error = [], None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            reason = self.policy.refusal(sockaddr[0], sockaddr[1]) if check else None
            if reason:
                refused.append(f"{sockaddr[0]} ({reason})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.remaining())
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the very address that was checked: no second resolution
                return sock
            except OSError as err:
                sock.close()
                last_error = err
        if last_error is not None:
            raise last_error
        raise BlockedAddressError(self._message(host, refused))

    @staticmethod
    def _message(host: str, refused: list[str]) -> str:
        literal = len(refused) == 1 and refused[0].startswith(f"{host} ")  # an IP literal, not a name
        where = refused[0] if literal else f"{host} = {', '.join(refused)}"
        return (f"{BLOCKED}: {where} is not a public address; "
                "allow its network with datasets.<name>.allowed_networks")


class _DeadlineReader(io.RawIOBase):
    """The socket's raw reader, each read waiting at most the time left before the deadline."""

    def __init__(self, sock: socket.socket, guard: _Guard):
        super().__init__()
        self._sock, self._raw, self._guard = sock, sock.makefile("rb", buffering=0), guard

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(self._guard.remaining())
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:
            self._guard.remaining()  # raises DeadlineError when the deadline is what expired
            raise

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # releases the socket's makefile reference, as http.client expects
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """Status line, headers, interim ``100 Continue`` responses and body all read under the deadline."""

    def __init__(self, sock, *args, guard: _Guard, **kwargs):
        super().__init__(sock, *args, **kwargs)
        plain = self.fp
        self.fp = io.BufferedReader(_DeadlineReader(sock, guard))
        plain.close()


def _guarded(cls):
    class Guarded(cls):
        def __init__(self, *args, guard: _Guard, check: bool, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = functools.partial(guard.connect, check=check)
            self.response_class = functools.partial(_DeadlineResponse, guard=guard)

    Guarded.__name__ = f"Guarded{cls.__name__}"
    return Guarded


_GuardedHTTPConnection = _guarded(http.client.HTTPConnection)
_GuardedHTTPSConnection = _guarded(http.client.HTTPSConnection)


def _check_before_proxy(req: urllib.request.Request, guard: _Guard) -> bool:
    """Whether the connection itself must be checked: not when it goes to the user's proxy."""
    if not req.has_proxy():
        return True
    target = urllib.parse.urlsplit(req.full_url)
    guard.check_name(target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    return False


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self._guard = guard

    def http_open(self, req):
        check = _check_before_proxy(req, self._guard)
        return self.do_open(functools.partial(_GuardedHTTPConnection, guard=self._guard, check=check), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self._guard = guard

    def https_open(self, req):
        check = _check_before_proxy(req, self._guard)
        return self.do_open(functools.partial(_GuardedHTTPSConnection, guard=self._guard, check=check), req,
                            context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only; every hop then goes through the same checked handlers."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location)
            scheme = urllib.parse.urlsplit(target).scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                fp.close()
                raise urllib.error.URLError(f"unsupported url scheme '{scheme}' in a redirect to {target[:200]!r} "
                                            "(only http and https are fetched)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def open_url(url: str, timeout: float, headers: dict[str, str] | None = None,
             policy: AddressPolicy | None = None) -> http.client.HTTPResponse:
    """``urlopen(url)`` under ``policy`` (default: from the environment) and a ``timeout``-second deadline.

    Raises ``urllib.error.URLError`` (``bad_url`` for a scheme, ``blocked address`` for the policy),
    ``urllib.error.HTTPError``, or ``DeadlineError`` / ``TimeoutError`` (``timed out``).
    """
    scheme = urllib.parse.urlsplit(str(url)).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise urllib.error.URLError(f"unsupported url scheme '{scheme}' (only http and https are fetched)")
    guard = _Guard(timeout, policy if policy is not None else AddressPolicy.from_env())
    opener = urllib.request.OpenerDirector()  # no ftp, file or data handler: nothing else can be opened
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTPHandler(guard),
                    _HTTPSHandler(guard), urllib.request.HTTPDefaultErrorHandler(), _RedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout)
