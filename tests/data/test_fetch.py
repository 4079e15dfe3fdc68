"""URL sources against a local server on 127.0.0.1: SSRF policy, redirects, caps, deadlines, retries."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig
from sdtune.data.fetch import FetchPolicy, fetch_bytes, redirect_target
from sdtune.data.ingest import ingest
from sdtune.data.reasons import SkipItem
from sdtune.errors import DatasetError

PNG = encode(pattern(seed=3), "PNG")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies, so a server can send without Content-Length
    flaky_calls = 0
    zip_bytes = b""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        route = url.path
        if route == "/img.png":
            self._send(200, PNG, [("Content-Length", str(len(PNG)))])
        elif route == "/data.zip":
            self._send(200, Handler.zip_bytes, [("Content-Length", str(len(Handler.zip_bytes)))])
        elif route == "/redirect":
            self._send(302, headers=[("Location", query["to"][0])])
        elif route.startswith("/chain/"):
            n = int(route.rsplit("/", 1)[1])
            self._send(302, headers=[("Location", f"/chain/{n - 1}" if n else "/img.png")])
        elif route == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif route == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        elif route == "/huge-length":
            self._send(200, b"tiny", [("Content-Length", str(10**12))])
        elif route == "/short-body":  # claims more than it sends
            self._send(200, PNG[:50], [("Content-Length", str(len(PNG)))])
        elif route == "/flaky":
            Handler.flaky_calls += 1
            if Handler.flaky_calls <= 2:
                self._send(503, headers=[("Retry-After", "0")])
            else:
                self._send(200, PNG, [("Content-Length", str(len(PNG)))])
        elif route == "/always-503":
            self._send(503)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    from data_helpers import make_zip_bytes

    Handler.zip_bytes = make_zip_bytes({f"p/{i}.png": encode(pattern(seed=i), "PNG") for i in range(5)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def loopback_ok(**kwargs) -> FetchPolicy:
    """The test's injected policy: loopback allowed (the default refuses it, see below)."""
    defaults = {"max_bytes": 1 << 20, "total_timeout_s": 2.0, "backoff_s": 0.01, "retries": 2}
    return FetchPolicy(allow_address=lambda ip: ip.is_loopback, **{**defaults, **kwargs})


def reason_of(url: str, policy: FetchPolicy) -> str:
    with pytest.raises(SkipItem) as info:
        fetch_bytes(url, policy)
    return info.value.reason


def test_fetches_an_image_and_follows_redirects(server):
    assert fetch_bytes(f"{server}/img.png", loopback_ok()) == PNG
    assert fetch_bytes(f"{server}/chain/4", loopback_ok()) == PNG  # 5 redirects: the limit
    assert reason_of(f"{server}/chain/5", loopback_ok()) == "fetch_failed"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "10.1.2.3",
        "192.168.0.10",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
    ],
)
def test_default_policy_refuses_non_public_addresses_before_connecting(host):
    assert reason_of(f"http://{host}:9/x.png", FetchPolicy(max_bytes=100)) == "blocked_address"


def test_redirects_are_rechecked(server):
    assert reason_of(f"{server}/redirect?to=http://10.0.0.1/secret", loopback_ok()) == "blocked_address"
    everything = FetchPolicy(max_bytes=100, allow_address=lambda ip: True)
    # Metadata endpoints stay refused even under an allow-everything policy.
    assert (
        reason_of(f"{server}/redirect?to=http://169.254.169.254/latest/meta-data", everything)
        == "blocked_address"
    )
    assert reason_of(f"{server}/redirect?to=file:///etc/passwd", loopback_ok()) == "fetch_failed"


def test_no_https_to_http_downgrade():
    with pytest.raises(SkipItem, match="https to http"):
        redirect_target("https://example.com/a", "http://example.com/b", 302)
    assert redirect_target("http://example.com/a", "/b", 301) == "http://example.com/b"


def test_byte_cap_whatever_content_length_says(server):
    assert reason_of(f"{server}/big-no-length", loopback_ok(max_bytes=100_000)) == "too_large_file"
    assert reason_of(f"{server}/huge-length", loopback_ok()) == "too_large_file"
    assert reason_of(f"{server}/short-body", loopback_ok()) == "fetch_failed"


def test_trickling_server_hits_the_total_deadline(server):
    started = time.monotonic()
    assert reason_of(f"{server}/trickle", loopback_ok(total_timeout_s=0.5)) == "fetch_failed"
    assert time.monotonic() - started < 2.0


def test_bounded_retries_on_5xx(server):
    Handler.flaky_calls = 0
    assert fetch_bytes(f"{server}/flaky", loopback_ok()) == PNG
    with pytest.raises(SkipItem, match=r"HTTP 503 after 3 attempt"):
        fetch_bytes(f"{server}/always-503", loopback_ok())
    assert reason_of(f"{server}/missing", loopback_ok()) == "fetch_failed"


def test_ingest_url_sources(server, tmp_path):
    with pytest.raises(DatasetError, match="blocked_address"):
        ingest([f"{server}/data.zip"], tmp_path / "refused", IngestConfig(min_images=1, min_side=16))
    cfg = IngestConfig(min_images=1, min_side=16, fetch_allow_networks=["127.0.0.1/32"])
    result = ingest([f"{server}/data.zip", f"{server}/img.png"], tmp_path / "out", cfg)
    assert len(result.records) == 6 - 1  # the lone image duplicates zip member 3
    assert result.records[0].source == f"{server}/data.zip!p/0.png"
