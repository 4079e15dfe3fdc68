"""Fetch ``http(s)://`` objects without becoming an SSRF gadget.

Why not ``urllib``/``requests`` directly: they resolve the host themselves, so a check done beforehand can
be bypassed by DNS rebinding, and they follow redirects on their own. Here every hop is resolved once,
every address is checked against the policy, and the connection goes to the address that was checked
(with the real host name for ``Host`` and TLS SNI/certificate checks). Redirects are followed by hand
(at most ``max_redirects``, re-checked each time, never https → http). Bodies are read in chunks under a
byte cap whatever ``Content-Length`` says, and under a total deadline, so a trickling server cannot hold a
worker. 5xx, 429 and connection resets are retried a bounded number of times with exponential backoff.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urljoin, urlsplit

from sdtune.config import IngestConfig
from sdtune.data.items import Item, Skip, strip_credentials
from sdtune.data.reasons import SkipItem
from sdtune.errors import DatasetError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud metadata services: refused even when an allowlist would let their network through.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 << 10


NAT64_NETWORKS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, where the network would deliver to it: IPv4-mapped
    (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``, RFC 6052/8215),
    6to4 (``2002:AABB:CCDD::``) and Teredo (the client address). Python's ``is_global`` does not look inside."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    value = int(ip)
    if any(ip in net for net in NAT64_NETWORKS) or (value >> 32 == 0 and value > 1):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def public_address(ip: IPAddress) -> bool:
    """The default policy: globally routable unicast only (no private, loopback, link-local, CGNAT, …)."""
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    connect_timeout_s: float = 10.0
    total_timeout_s: float = 120.0
    max_redirects: int = 5
    retries: int = 3
    backoff_s: float = 0.5
    allow_address: Callable[[IPAddress], bool] = public_address
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)


def policy_from_config(cfg: IngestConfig, max_bytes: int) -> FetchPolicy:
    networks = [ipaddress.ip_network(n, strict=False) for n in cfg.fetch_allow_networks]

    def allow(ip: IPAddress) -> bool:
        return public_address(ip) or any(ip in net for net in networks)

    return FetchPolicy(
        max_bytes=max_bytes,
        connect_timeout_s=cfg.fetch_connect_timeout_s,
        total_timeout_s=cfg.fetch_total_timeout_s,
        max_redirects=cfg.fetch_max_redirects,
        retries=cfg.fetch_retries,
        allow_address=allow,
    )


def iter_url(url: str, cfg: IngestConfig) -> Iterator[Item | Skip]:
    """A URL source: a zip (unpacked like a local one) or a single image."""
    from sdtune.data.archive import iter_zip, zip_limits

    label = strip_credentials(url)
    with tempfile.TemporaryFile() as spool:  # on disk: a zip may be far bigger than memory should hold
        try:
            fetch_to(url, policy_from_config(cfg, cfg.max_download_bytes), spool)
        except SkipItem as exc:
            raise DatasetError(f"{label}: {exc.reason}: {exc.detail}") from None
        spool.seek(0)
        head = spool.read(4)
        spool.seek(0)
        if head in (b"PK\x03\x04", b"PK\x05\x06"):
            yield from iter_zip(spool, label, zip_limits(cfg))
            return
        size = spool.seek(0, 2)
        spool.seek(0)
        if size > cfg.max_image_bytes:
            yield Skip(label, "too_large_file", f"{size} bytes is over max_image_bytes={cfg.max_image_bytes}")
            return
        data = spool.read()
    yield Item(label, lambda: data)


def url_reader(url: str, cfg: IngestConfig) -> Callable[[], bytes]:
    """A lazy ``Item.read`` for one image URL (catalogue rows)."""
    policy = policy_from_config(cfg, cfg.max_image_bytes)

    def read() -> bytes:
        return fetch_bytes(url, policy)

    return read


def fetch_bytes(url: str, policy: FetchPolicy) -> bytes:
    buf = io.BytesIO()
    fetch_to(url, policy, buf)
    return buf.getvalue()


def fetch_to(url: str, policy: FetchPolicy, sink: IO[bytes]) -> None:
    """Write the body of ``url`` (after safe redirects) to ``sink``; raise :class:`SkipItem` on any failure."""
    deadline = time.monotonic() + policy.total_timeout_s
    for _ in range(policy.max_redirects + 1):
        status, location = _get_with_retries(url, policy, sink, deadline)
        if status not in REDIRECTS:
            return
        url = redirect_target(url, location, status)
    raise SkipItem("fetch_failed", f"more than {policy.max_redirects} redirects")


def redirect_target(url: str, location: str | None, status: int) -> str:
    """Where a redirect may go: http(s) only, and never from https down to plain http."""
    if not location:
        raise SkipItem("fetch_failed", f"HTTP {status} without a Location header")
    try:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
    except ValueError:
        raise SkipItem("fetch_failed", f"HTTP {status} to an unparsable Location") from None
    if scheme not in ("http", "https"):
        raise SkipItem("fetch_failed", f"redirect to a non-http(s) URL refused: {strip_credentials(target)}")
    if urlsplit(url).scheme == "https" and scheme == "http":
        raise SkipItem("fetch_failed", "redirect from https to http refused")
    return target


def _get_with_retries(
    url: str, policy: FetchPolicy, sink: IO[bytes], deadline: float
) -> tuple[int, str | None]:
    for attempt in range(policy.retries + 1):
        retry_after = None
        try:
            status, location, retry_after = _get_once(url, policy, sink, deadline)
            if 400 <= status < 500 and status != 429:
                raise SkipItem("fetch_failed", f"HTTP {status}")
            if status < 500 and status != 429:
                return status, location
            problem = f"HTTP {status}"
        except (ConnectionResetError, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
            problem = f"connection lost ({type(exc).__name__})"
        if attempt == policy.retries:
            break
        delay = retry_after if retry_after is not None else policy.backoff_s * 2**attempt
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
    raise SkipItem("fetch_failed", f"{problem} after {policy.retries + 1} attempt(s)")


def _get_once(
    url: str, policy: FetchPolicy, sink: IO[bytes], deadline: float
) -> tuple[int, str | None, float | None]:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # "[bad" host, port out of range
        raise SkipItem("fetch_failed", f"not a valid URL: {strip_credentials(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SkipItem("fetch_failed", f"not an http(s) URL: {strip_credentials(url)}")
    ip = _resolve_checked(parts.hostname, port, policy)
    timeout = max(0.01, min(policy.connect_timeout_s, deadline - time.monotonic()))
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPS(parts.hostname, port, ip, timeout, policy.ssl_context)
    else:
        conn = _PinnedHTTP(parts.hostname, port, ip, timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock = None
    try:
        conn.request("GET", path, headers={"User-Agent": "sdtune-ingest", "Accept-Encoding": "identity"})
        sock = conn.sock  # kept: http.client hands the socket to the response and forgets it
        response = conn.getresponse()
        if response.status in REDIRECTS or response.status >= 400:
            return (
                response.status,
                response.getheader("Location"),
                _retry_after(response.getheader("Retry-After")),
            )
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise SkipItem(
                "too_large_file", f"Content-Length {declared} is over the cap of {policy.max_bytes} bytes"
            )
        sink.seek(0)
        sink.truncate()
        received = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SkipItem("fetch_failed", f"over the total time limit of {policy.total_timeout_s:g} s")
            sock.settimeout(min(remaining, policy.connect_timeout_s))
            chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
            if not chunk:
                if declared and declared.isdigit() and received < int(declared):
                    # read1 returns b"" where read would raise: a body cut short is a lost connection.
                    raise http.client.IncompleteRead(b"", int(declared) - received)
                break
            received += len(chunk)
            if received > policy.max_bytes:  # counted, not trusted from Content-Length
                raise SkipItem("too_large_file", f"more than {policy.max_bytes} bytes")
            sink.write(chunk)
        return response.status, None, None
    except TimeoutError:
        raise SkipItem("fetch_failed", "timed out") from None
    except ssl.SSLError as exc:
        raise SkipItem("fetch_failed", f"TLS error: {exc.reason or exc}") from None
    except OSError as exc:
        if isinstance(exc, ConnectionResetError):
            raise
        raise SkipItem("fetch_failed", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    finally:
        conn.close()
        if sock is not None:
            sock.close()


def _resolve_checked(host: str, port: int, policy: FetchPolicy) -> str:
    """Resolve ``host``; refuse it if *any* address fails the policy (a name can mix public and private)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SkipItem("fetch_failed", f"cannot resolve {host}: {exc}") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        ip = embedded_ipv4(ip) or ip  # 64:ff9b::7f00:1 and 2002:7f00:1:: reach 127.0.0.1 too
        if ip in METADATA_ADDRESSES or not policy.allow_address(ip):
            raise SkipItem("blocked_address", f"{host} resolves to {ip}, which is not a public address")
        addresses.append(str(ip))
    if not addresses:
        raise SkipItem("fetch_failed", f"{host} has no address")
    return addresses[0]


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value), 30.0)  # honoured, but a server cannot park us for long
    return None


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address; ``Host`` still names the host."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """Connects to the checked address; SNI and certificate checks use the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=timeout, context=context or ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
