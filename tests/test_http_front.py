"""The cache node's HTTP/1.1 front (edge/http/), seen on the wire through real sockets.

HTTP client libraries hide what these tests are about (pipelining, who
closes a connection and when, interim 100 responses, malformed framing), so
requests are written as bytes on plain sockets and responses are read back
with a small HTTP/1.1 response reader (:class:`Conn`).

Layout on loopback:

* 127.0.40.x: one module-wide cluster (origin .10, l1-1 .31) with the front's
  default limits; every test uses its own URLs.
* 127.0.41.x: nodes a single test needs with other settings, or that a test
  stops, each in its own topology file whose site points at the shared
  origin: .31 slowloris, .32 SIGTERM drain, .33 max_connections,
  .21/.34 an L2 and L1 with small header limits, .35 access log.

"A refused request never reached the origin" is proven with the origin's
X-Origin-Hits (a HEAD sent straight to the origin afterwards must say 1) and
with the origin's per-path metric, which must not mention the request's
unique token.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import ADMIN_PORT, TRAFFIC_PORT, Cluster, NodeProcess

NET = "40"                                  # the shared cluster
EXTRA = "127.0.41"                          # nodes of their own
SITE_HOST = "www.example.com"
MiB = 2**20


# --------------------------------------------------------------------------- wire helpers

@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_length: int = 0            # also counted when the body was discarded

    def header(self, name: str) -> str | None:
        """The field's value (repeated lines joined with ', '), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def __repr__(self) -> str:
        return f"<{self.version} {self.status} {self.reason} {self.headers} body={self.body_length}B>"


class Conn:
    """One client connection with a read buffer, so pipelined responses can be read one by one."""

    def __init__(self, address: str, timeout: float = 5.0, rcvbuf: int | None = None):
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the advertised window is small from the handshake on.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((host, int(port)))
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_tolerant(self, data: bytes) -> bool:
        """Send, but a server that already answered and hung up is no error: False then."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    # -- reading

    def _recv(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take_until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + len(sep)]
                return out
            start = max(0, len(self.buf) - len(sep) + 1)
            if len(self.buf) > limit:
                raise AssertionError(f"no {sep!r} in the first {limit} bytes: {bytes(self.buf[:200])!r}")
            if not self._recv():
                raise EOFError(f"connection closed before {sep!r}; unread: {bytes(self.buf[:200])!r}")

    def _take(self, n: int, keep: bool = True) -> bytes:
        out = bytearray()
        while n:
            if not self.buf and not self._recv():
                raise EOFError(f"connection closed with {n} body bytes missing")
            part = min(n, len(self.buf))
            if keep:
                out += self.buf[:part]
            del self.buf[:part]
            n -= part
        return bytes(out)

    def discard(self, n: int) -> None:
        """Read and drop `n` bytes (of a body whose head was read with read_head)."""
        self._take(n, keep=False)

    def read_head(self) -> Response:
        """Status line and header fields of the next response (interim 1xx ones included)."""
        block = self._take_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = block.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise AssertionError(f"not a status line: {status_line!r}")
        headers = []
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep, f"not a header field line: {line!r}"
            headers.append((name, value.strip()))
        return Response(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers)

    def read_body(self, response: Response, head: bool = False, keep: bool = True) -> Response:
        if head or 100 <= response.status < 200 or response.status in (204, 304):
            return response
        te = (response.header("Transfer-Encoding") or "").lower()
        length = response.header("Content-Length")
        if "chunked" in te:
            chunks = bytearray()
            while True:
                size_line = self._take_until(b"\r\n").split(b";", 1)[0].strip()
                size = int(size_line, 16)
                if size == 0:
                    while self._take_until(b"\r\n"):        # trailer fields, then the empty line
                        pass
                    break
                chunks += self._take(size, keep)
                response.body_length += size
                assert self._take(2) == b"\r\n", "chunk not followed by CRLF"
            response.body = bytes(chunks)
        elif length is not None:
            response.body_length = int(length)
            response.body = self._take(int(length), keep)
        else:                                               # delimited by the close
            while self._recv():
                pass
            response.body_length = len(self.buf)
            response.body = bytes(self.buf) if keep else b""
            self.buf.clear()
        return response

    def read_response(self, head: bool = False, keep: bool = True) -> Response:
        """The next whole response; `head=True` when it answers a HEAD (no body follows)."""
        return self.read_body(self.read_head(), head=head, keep=keep)

    def poll(self, within: float) -> str:
        """What the server does in the next `within` seconds: "data", "closed" or "none"."""
        if self.buf:
            return "data"
        if self.eof:
            return "closed"
        end = time.monotonic() + within
        try:
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return "none"
                self.sock.settimeout(remaining)
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    return "none"
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.eof = True
                    return "closed"
                self.buf += data
                return "data"
        finally:
            self.sock.settimeout(self.timeout)

    def closed_within(self, within: float) -> bool:
        """True when the server closes (FIN or RST) within `within` seconds, sending nothing more."""
        return self.poll(within) == "closed"


def request(method: str, target: str, *headers: str, version: str = "HTTP/1.1", body: bytes = b"",
            host: str | None = SITE_HOST) -> bytes:
    """A request as bytes; a Content-Length is added for a body unless framing is given."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += headers
    framed = any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def unique(name: str = "obj") -> str:
    return f"/gen/{name}-{uuid.uuid4().hex[:12]}"


def fetch(address: str, target: str, *headers: str, method: str = "GET", timeout: float = 5.0) -> Response:
    """One request on a fresh connection."""
    with Conn(address, timeout) as conn:
        conn.send(request(method, target, *headers, "Connection: close"))
        return conn.read_response(head=method == "HEAD")


def wait_until(predicate: Callable[[], object], deadline: float, what: str) -> object:
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        time.sleep(0.02)


def healthz(node: NodeProcess) -> tuple[int, dict]:
    """(status, JSON body) of the admin /healthz; (0, {}) when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{node.admin}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- nodes

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # memory_object_max: anything over 1 MiB lives on the disk tier only (test_slow_reader...).
    c = Cluster.create(tmp_path_factory.mktemp("http-front"), NET, l1=1,
                       extra_node='memory_object_max = "1MiB"',
                       extra_site='allowed_methods = ["GET", "HEAD", "POST", "PUT", "PROPFIND", "M-SEARCH"]')
    try:
        c.start("origin", "l1-1")
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def l1(cluster) -> str:
    return cluster.node("l1-1").traffic


@pytest.fixture
def start_nodes(tmp_path, cluster):
    """Start nodes of their own on 127.0.41.x, behind the shared origin; stopped by PID afterwards.

    ``start_nodes((name, role, last_octet, "toml lines"), ...)`` writes one
    topology with those nodes and starts them in order (L2s first).
    """
    started: list[NodeProcess] = []
    origin = cluster.node("origin").traffic
    count = 0

    def start(*specs: tuple[str, str, int, str]) -> list[NodeProcess]:
        nonlocal count
        count += 1
        folder = tmp_path / f"topology-{count}"
        folder.mkdir()
        lines = [f'state_dir = "{folder / "state"}"', "[sites.example]",
                 f'hosts = ["{SITE_HOST}"]', f'origin = "http://{origin}"']
        for name, role, octet, extra in specs:
            lines += [f"[nodes.{name}]", f'role = "{role}"', f'listen = "{EXTRA}.{octet}:{TRAFFIC_PORT}"',
                      f'admin = "{EXTRA}.{octet}:{ADMIN_PORT}"', 'memory_size = "16MiB"', 'disk_size = "256MiB"']
            if role == "l1":
                lines += ['parents = "all"', "parent_probe_interval = 0.1", "parent_timeout = 5.0"]
            lines.append(extra)
        config = folder / "topology.toml"
        config.write_text("\n".join(lines) + "\n")
        nodes = []
        for name, _, octet, _ in specs:
            node = NodeProcess(name, config, f"{EXTRA}.{octet}:{ADMIN_PORT}", f"{EXTRA}.{octet}:{TRAFFIC_PORT}")
            started.append(node)
            nodes.append(node.start())
        return nodes

    yield start
    for node in reversed(started):
        node.stop()


def origin_hits_before(cluster: Cluster, target: str) -> int:
    """How many times the origin has seen `target` (path?query); asks the origin directly, once per target."""
    r = fetch(cluster.node("origin").traffic, target, method="HEAD")
    return int(r.header("X-Origin-Hits")) - 1


def assert_origin_never_saw(cluster: Cluster, token: str, *targets: str) -> None:
    metrics = cluster.node("origin").metrics()
    other = re.search(r'^origin_path_requests_total\{path="other"\} (\S+)$', metrics, re.M)
    assert other is None or float(other.group(1)) == 0, "origin path labels overflowed: the check is blind"
    assert token not in metrics, f"the origin answered a request for a path with {token!r}"
    for target in targets:
        assert origin_hits_before(cluster, target) == 0, f"{target} reached the origin"


def assert_no_traceback(node: NodeProcess) -> None:
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000):][:6000]


# --------------------------------------------------------------------------- 1. pipelining

def test_pipelined_requests_answered_in_order(l1):
    cached = unique("pipe-hit") + "?size=2222&cc=max-age=60"
    first = fetch(l1, cached)
    assert (first.status, first.header("X-Cache")) == (200, "MISS")
    slow = unique("pipe-slow") + "?size=1111&delay=300&cc=max-age=60"
    with Conn(l1) as conn:
        # One write: a slow miss first, then two requests the node could answer at once.
        conn.send(request("GET", slow) + request("HEAD", cached) + request("GET", cached))
        r1 = conn.read_response()
        r2 = conn.read_response(head=True)
        r3 = conn.read_response()       # would misparse if the HEAD answer had carried a body
        assert conn.poll(0.2) == "none", "unexpected bytes after the third response"
    assert (r1.status, r1.header("X-Cache"), len(r1.body)) == (200, "MISS", 1111)
    assert (r2.status, r2.header("X-Cache"), r2.header("Content-Length")) == (200, "HIT", "2222")
    assert (r3.status, r3.header("X-Cache"), len(r3.body)) == (200, "HIT", 2222)
    assert r3.body == first.body


# --------------------------------------------------------------------------- 2. connection persistence

@pytest.mark.parametrize("version, connection, persists", [
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.1", "close", False),
], ids=["http10-default-close", "http10-keep-alive", "http11-connection-close"])
def test_connection_persistence(l1, version, connection, persists):
    headers = [f"Connection: {connection}"] if connection else []
    with Conn(l1) as conn:
        conn.send(request("GET", unique("persist") + "?size=700&cc=no-store", *headers, version=version))
        r = conn.read_response()
        assert (r.status, len(r.body)) == (200, 700)
        if not persists:
            assert conn.closed_within(2.0), "the server kept the connection open"
            return
        assert "keep-alive" in (r.header("Connection") or "").lower(), r
        assert r.header("Content-Length") == "700", "a persistent HTTP/1.0 response needs a Content-Length"
        conn.send(request("GET", unique("persist") + "?size=800&cc=no-store", *headers, version=version))
        r2 = conn.read_response()
        assert (r2.status, len(r2.body)) == (200, 800)


# --------------------------------------------------------------------------- 3. slowloris

def test_slowloris_head_gets_408_and_others_are_served(start_nodes):
    (node,) = start_nodes(("edge-slowloris", "l1", 31, "client_header_timeout = 1"))
    head = request("GET", unique("slowloris"), "X-Pad: " + "a" * 200)
    start = time.monotonic()
    trickle = Conn(node.traffic)
    silent = Conn(node.traffic)         # says nothing at all: the clock runs from the connection's start
    outcome, sent, served_meanwhile = "none", 0, None
    try:
        while time.monotonic() - start < 4.0:
            if not trickle.send_tolerant(head[sent:sent + 1]):
                outcome = "closed"
                break
            sent += 1
            outcome = trickle.poll(0.2)         # one byte every 0.2 s
            if outcome != "none":
                break
            if served_meanwhile is None and time.monotonic() - start > 0.4:
                t0 = time.monotonic()
                r = fetch(node.traffic, unique("while-trickling") + "?cc=no-store", timeout=1.0)
                served_meanwhile = (r.status, time.monotonic() - t0)
        elapsed = time.monotonic() - start
        assert outcome != "none", f"a head trickled for {elapsed:.1f}s ({sent} bytes) and is still being read"
        assert elapsed < 3.0, f"the trickling connection was ended only after {elapsed:.1f}s"
        if outcome == "data":
            r = trickle.read_response()
            assert r.status == 408, r
            assert trickle.closed_within(1.0), "not closed after the 408"
        assert served_meanwhile is not None and served_meanwhile[0] == 200, served_meanwhile
        assert served_meanwhile[1] < 1.0
        # The silent connection is ended too (with or without a 408).
        state = silent.poll(max(0.0, start + 3.0 - time.monotonic()))
        if state == "data":
            assert silent.read_response().status == 408
            state = "closed" if silent.closed_within(1.0) else "open"
        assert state == "closed", "a connection that never sent a byte was kept past client_header_timeout"
    finally:
        trickle.close()
        silent.close()
    assert_no_traceback(node)


def test_stalled_request_body_and_unread_response_are_cut_off(start_nodes, cluster):
    """client_body_timeout and send_timeout: a stalled upload gets 408 (nginx), a client that never reads
    is dropped."""
    (node,) = start_nodes(("edge-stall", "l1", 36, "client_body_timeout = 0.5\nsend_timeout = 1"))
    with Conn(node.traffic, timeout=5) as upload:
        upload.send(request("POST", unique("stalled-body") + "?cc=no-store", "Content-Length: 1000") + b"x" * 10)
        start = time.monotonic()
        r = upload.read_response()
        assert r.status == 408 and time.monotonic() - start < 3.0, r
        assert upload.closed_within(1.0), "a connection with an unfinished body was kept"
    big = unique("unread") + "?size=67108864&cc=max-age=600"       # 64 MiB, on disk
    assert fetch(node.traffic, big, timeout=30).status == 200
    with Conn(node.traffic, timeout=5, rcvbuf=64 * 1024) as reader:
        reader.send(request("GET", big))
        assert reader.read_head().status == 200
        start = time.monotonic()
        time.sleep(2.5)                 # read nothing: the node gives up after send_timeout
        total, closed = 0, False
        reader.sock.settimeout(2.0)
        while total < 64 * MiB:
            try:
                chunk = reader.sock.recv(1 << 20)
            except (TimeoutError, ConnectionResetError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            total += len(chunk)
        assert closed and total < 32 * MiB, f"read {total} bytes after stalling; closed={closed}"
    assert_no_traceback(node)


# --------------------------------------------------------------------------- 4. limits

def _many_headers(count: int, size: int) -> list[str]:
    return [f"X-Field-{i:03d}: " + "v" * size for i in range(count)]


@pytest.mark.parametrize("case, status", [
    ("target-over-8KiB", 414),
    ("101-header-lines", 431),
    ("100-headers-of-8KB", 431),     # 800 KB (and, with Host, 101 lines)
    ("99-headers-of-8KB", 431),      # with Host 100 lines: within max_headers, ~800 KB over max_header_bytes
    ("5-headers-of-8KB", 431),       # ~40 KB: just over the 32 KiB default
])
def test_request_over_limits_refused(cluster, l1, case, status):
    token = uuid.uuid4().hex[:12]
    target = f"/gen/limit-{token}"
    if case == "target-over-8KiB":
        data = request("GET", target + "?pad=" + "p" * (9 * 1024))
    elif case == "101-header-lines":
        data = request("GET", target, *_many_headers(100, 10))       # plus Host: 101
    elif case == "100-headers-of-8KB":
        data = request("GET", target, *_many_headers(100, 8000))
    elif case == "99-headers-of-8KB":
        data = request("GET", target, *_many_headers(99, 8000))
    else:
        data = request("GET", target, *_many_headers(5, 8000))
    with Conn(l1) as conn:
        conn.send_tolerant(data)            # the server may answer and close before reading it all
        r = conn.read_response()
        assert r.status == status, r
        assert conn.closed_within(2.0), "connection not closed after refusing the request"
    assert_origin_never_saw(cluster, token, target)
    assert_no_traceback(cluster.node("l1-1"))


def test_requests_within_limits_served(l1):
    """The limits' other side: an 8000-byte target and 100 header lines (Host included) pass."""
    r = fetch(l1, unique("long") + "?cc=no-store&pad=" + "p" * (8000 - 40))
    assert r.status == 200, r
    with Conn(l1) as conn:
        conn.send(request("GET", unique("hundred") + "?cc=no-store", *_many_headers(98, 10), "Connection: close"))
        assert conn.read_response().status == 200       # Host + 98 + Connection = 100 lines


# --------------------------------------------------------------------------- 5. smuggling and malformed requests

def _smuggled(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: www.example.com\r\n\r\n"


H = b"Host: www.example.com\r\n"
SMUGGLING: dict[str, Callable[[bytes, bytes], bytes]] = {
    "content-length-and-transfer-encoding": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + _smuggled(s)),
    "two-content-lengths": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello" + _smuggled(s)),
    "te-gzip": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello" + _smuggled(s)),
    "te-chunked-gzip": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + _smuggled(s)),
    "te-gzip-chunked": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + _smuggled(s)),
    "bare-lf": lambda p, s: b"GET " + p + b" HTTP/1.1\nHost: www.example.com\n\n",
    "invalid-chunk-size": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n" + _smuggled(s)),
    "oversized-chunk-size": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n" + _smuggled(s)),
    "content-length-plus": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello" + _smuggled(s)),
    "content-length-30-digits": lambda p, s: (
        b"POST " + p + b" HTTP/1.1\r\n" + H + b"Content-Length: " + b"1" * 30 + b"\r\n\r\nhello"),
    "version-2.0": lambda p, s: b"GET " + p + b" HTTP/2.0\r\n" + H + b"\r\n",
    "version-0.9": lambda p, s: b"GET " + p + b" HTTP/0.9\r\n" + H + b"\r\n",
    "version-1.2": lambda p, s: b"GET " + p + b" HTTP/1.2\r\n" + H + b"\r\n",
    "0xff-in-path": lambda p, s: b"GET " + p + b"\xff HTTP/1.1\r\n" + H + b"\r\n",
    "0xff-in-expect": lambda p, s: b"GET " + p + b" HTTP/1.1\r\n" + H + b"Expect: 100-\xffcontinue\r\n\r\n",
}


@pytest.mark.parametrize("after_get", [False, True], ids=["fresh-connection", "after-a-get"])
@pytest.mark.parametrize("case", list(SMUGGLING))
def test_ambiguous_or_malformed_request_gets_400_and_close(cluster, l1, case, after_get):
    token = uuid.uuid4().hex[:12]
    path, smuggled = f"/gen/smug-{token}", f"/gen/smuggled-{token}"
    with Conn(l1) as conn:
        if after_get:
            conn.send(request("GET", unique("before-smuggling") + "?cc=no-store"))
            assert conn.read_response().status == 200
        conn.send_tolerant(SMUGGLING[case](path.encode(), smuggled.encode()))
        r = conn.read_response()
        assert r.status == 400, r
        assert conn.closed_within(2.0), "connection not closed after the 400"
    assert_origin_never_saw(cluster, token, path, smuggled)
    assert_no_traceback(cluster.node("l1-1"))


# --------------------------------------------------------------------------- 6. methods

def test_unknown_method_gets_405_and_close(cluster, l1):
    """A method no site can allow is the request's fault: 405 with Allow (RFC 9110 15.5.6), never a 5xx."""
    token = uuid.uuid4().hex[:12]
    target = f"/gen/method-{token}"
    with Conn(l1) as conn:
        conn.send(request("FOO", target))
        r = conn.read_response()
        assert (r.status, r.header("Allow")) == (405, "GET, HEAD"), r
        assert conn.closed_within(2.0)
    assert_origin_never_saw(cluster, token, target)


@pytest.mark.parametrize("method, status", [("PROPFIND", 207), ("M-SEARCH", 200)])
def test_known_extension_method_forwarded(l1, method, status):
    with Conn(l1) as conn:
        conn.send(request(method, unique("ext") + f"?status={status}&size=300"))
        r = conn.read_response()
    assert (r.status, r.header("X-Origin-Method"), len(r.body)) == (status, method, 300)


# --------------------------------------------------------------------------- 7. request bodies

def test_chunked_upload_reaches_origin_whole(l1):
    pieces = [b"a" * 40000, b"b" * 35000, b"c" * 25000]
    with Conn(l1) as conn:
        conn.send(request("POST", unique("upload") + "?cc=no-store", "Transfer-Encoding: chunked"))
        for piece in pieces:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        r = conn.read_response()
    assert (r.status, r.header("X-Origin-Method"), r.header("X-Origin-Body-Length")) == (200, "POST", "100000")


def test_expect_100_continue_before_the_body(l1):
    body = b"x" * 5000
    with Conn(l1) as conn:
        conn.send(request("PUT", unique("expect") + "?cc=no-store", "Expect: 100-continue",
                          f"Content-Length: {len(body)}"))
        interim = conn.read_response()
        assert (interim.version, interim.status) == ("HTTP/1.1", 100), interim
        conn.send(body)
        r = conn.read_response()
    assert (r.status, r.header("X-Origin-Method"), r.header("X-Origin-Body-Length")) == (200, "PUT", "5000")


# --------------------------------------------------------------------------- 8. SIGTERM drain

def test_sigterm_drains_in_flight_requests(start_nodes):
    (node,) = start_nodes(("edge-drain", "l1", 32, ""))
    traffic_host, traffic_port = node.traffic.rsplit(":", 1)
    idle = Conn(node.traffic)
    idle.send(request("GET", unique("idle") + "?cc=no-store"))
    assert idle.read_response().status == 200
    slow = Conn(node.traffic, timeout=10)
    slow.send(request("GET", unique("drain-slow") + "?delay=1500&cc=no-store&size=50000"))
    late: Conn | None = None
    try:
        wait_until(lambda: healthz(node)[1].get("inflight", 0) >= 1, 2.0, "the slow request in flight")
        signalled = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)

        wait_until(lambda: healthz(node)[0] == 503, 1.0, "/healthz answering 503 after SIGTERM")
        code, state = healthz(node)
        assert (code, state.get("status")) == (503, "draining"), state

        assert idle.closed_within(max(0.0, signalled + 1.0 - time.monotonic())), \
            "the idle keep-alive connection was not closed within 1 s of SIGTERM"

        try:
            late = Conn(node.traffic, timeout=2)
        except ConnectionRefusedError:
            pass                    # not listening any more: what we want
        else:
            late.send_tolerant(request("GET", unique("after-sigterm")))

        assert node.proc.poll() is None, "exited before its in-flight request finished"
        r = slow.read_response()
        assert (r.status, len(r.body)) == (200, 50000), r
        slow.close()
        code = node.proc.wait(timeout=max(1.0, signalled + 30 - time.monotonic()))   # drain_timeout default
        assert code == 0, node.log.read_text()[-3000:]
        if late is not None:
            # Accepted by the kernel before the listener went away: it must get no answer.
            assert late.closed_within(2.0) and not late.buf, \
                f"a connection made after SIGTERM was answered: {bytes(late.buf[:200])!r}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((traffic_host, int(traffic_port)), timeout=1).close()
    finally:
        idle.close()
        slow.close()
        if late is not None:
            late.close()
    assert_no_traceback(node)


def test_a_drain_that_starts_while_a_reply_streams_closes_that_connection_after_it(start_nodes):
    """The reply was begun keep-alive; once it is out, the draining node closes the connection
    and exits, rather than holding an idle connection for the whole drain_timeout."""
    (node,) = start_nodes(("edge-drain-stream", "l1", 37, ""))
    size = 32 * MiB
    target = unique("drain-stream") + f"?size={size}&cc=max-age=600"
    assert fetch(node.traffic, target, timeout=30).status == 200          # now a disk hit
    with Conn(node.traffic, timeout=10, rcvbuf=64 * 1024) as reader:
        reader.send(request("GET", target))
        head = reader.read_head()
        assert head.status == 200 and head.header("Connection") != "close"
        time.sleep(0.3)                     # the node is now waiting for this slow reader
        signalled = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        reader.discard(size)
        assert reader.closed_within(2.0), "the connection was kept after its reply while draining"
    assert node.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 5.0, "the node waited for an idle connection to drain"
    assert_no_traceback(node)


# --------------------------------------------------------------------------- 9. backpressure

def test_slow_reader_of_large_disk_hit_is_not_buffered(cluster, l1):
    size = 128 * MiB
    target = unique("big") + f"?size={size}&cc=max-age=600"
    with Conn(l1, timeout=30) as conn:
        conn.send(request("GET", target))
        r = conn.read_response(keep=False)
    assert (r.status, r.header("X-Cache"), r.body_length) == (200, "MISS", size)
    wait_until(lambda: fetch(l1, target, method="HEAD").header("X-Cache") == "HIT", 10.0, "the object stored")

    pid = cluster.node("l1-1").pid
    before = vm_rss(pid)
    with Conn(l1, timeout=10, rcvbuf=64 * 1024) as slow:
        slow.send(request("GET", target))
        head = slow.read_head()
        assert (head.status, head.header("X-Cache"), head.header("Content-Length")) == (200, "HIT", str(size))
        slow.discard(MiB)
        # Now read nothing for 1.5 s, sampling the node's resident set meanwhile.
        peak, end = before, time.monotonic() + 1.5
        while time.monotonic() < end:
            peak = max(peak, vm_rss(pid))
            time.sleep(0.05)
    growth = peak - before
    assert growth < 32 * MiB, f"RSS grew by {growth / MiB:.1f} MiB while a client did not read"


def test_pipelining_client_that_does_not_read_is_not_read_either(cluster, l1):
    """A client pipelining hits without reading the answers: the node stops reading its requests.

    Otherwise every request it sends adds a response to the node's write
    buffer, without bound (responses here are ten times their requests).
    """
    target = unique("pipelined") + "?size=2000&cc=max-age=600"
    assert fetch(l1, target).status == 200
    assert fetch(l1, target, method="HEAD").header("X-Cache") == "HIT"
    pid = cluster.node("l1-1").pid
    before = vm_rss(pid)
    burst = request("GET", target) * 1000
    sent, peak = 0, before
    host, port = l1.split(":")
    with socket.create_connection((host, int(port))) as greedy:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        greedy.settimeout(0.2)
        end = time.monotonic() + 3.0
        while time.monotonic() < end and sent < 40 * MiB:
            try:
                sent += greedy.send(burst)
            except TimeoutError:
                pass                    # the node stopped reading: our send buffer is full
            peak = max(peak, vm_rss(pid))
    growth = peak - before
    assert sent < 40 * MiB, "the node kept reading requests from a client that read nothing"
    assert growth < 32 * MiB, f"RSS grew by {growth / MiB:.1f} MiB while a client did not read"


# --------------------------------------------------------------------------- 10. max_connections

def test_max_connections_leaves_extra_clients_in_the_backlog(start_nodes):
    (node,) = start_nodes(("edge-maxconn", "l1", 33, "max_connections = 2"))
    a, b = Conn(node.traffic), Conn(node.traffic)
    third: Conn | None = None
    try:
        for conn in (a, b):
            conn.send(request("GET", unique("maxconn") + "?cc=no-store"))
            assert conn.read_response().status == 200
        third = Conn(node.traffic)          # completes in the kernel's backlog
        third.send(request("GET", unique("maxconn-third") + "?cc=no-store&size=333"))
        assert third.poll(1.0) == "none", f"the third connection was served or closed: {bytes(third.buf[:200])!r}"
        b.send(request("GET", unique("maxconn") + "?cc=no-store"))
        assert b.read_response().status == 200
        a.close()
        waited = time.monotonic()
        r = third.read_response()
        assert (r.status, len(r.body)) == (200, 333)
        assert time.monotonic() - waited < 3.0
        b.send(request("GET", unique("maxconn") + "?cc=no-store"))
        assert b.read_response().status == 200
    finally:
        a.close()
        b.close()
        if third is not None:
            third.close()


# --------------------------------------------------------------------------- 11. header growth

def _header_lines_totalling(total: int) -> list[str]:
    """Header field lines (Host first) whose bytes, CRLFs included, add up to `total`."""
    lines, used = [f"Host: {SITE_HOST}"], len(f"Host: {SITE_HOST}\r\n")
    i = 0
    while total - used > 0:
        remaining = total - used
        prefix = f"X-Fill-{i:02d}: "
        size = min(200, remaining)
        if remaining - size < len(prefix) + 3 and remaining != size:
            size = remaining - (len(prefix) + 3)        # leave room for one more line
        value_len = size - len(prefix) - 2
        assert value_len >= 1
        lines.append(prefix + "f" * value_len)
        used += size
        i += 1
    assert used == total
    return lines


def test_header_growth_along_the_chain_never_fails_at_the_parent(start_nodes):
    l2, l1 = start_nodes(("l2-a", "l2", 21, 'max_header_bytes = "4KiB"'),
                         ("l1-1", "l1", 34, 'max_header_bytes = "4KiB"'))
    warm = wait_until(lambda: "l2-a" in (fetch(l1.traffic, unique("warm") + "?cc=no-store").header("Via") or ""),
                      5.0, "the L1 using its L2")
    assert warm
    for margin in (100, 30):
        lines = _header_lines_totalling(4096 - margin)
        with Conn(l1.traffic) as conn:
            target = unique("grow") + "?cc=max-age=60"
            head = f"GET {target} HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n"
            conn.send(head.encode())
            r = conn.read_response()
        via = r.header("Via") or ""
        assert r.status in (200, 431), (margin, r)
        if r.status == 200:
            assert via == "1.1 l2-a, 1.1 l1-1", (margin, r)
        else:
            # Refused by the L1 itself, not an L2 refusal passed down.
            assert via == "1.1 l1-1", (margin, r)
            assert "fwd-status" not in (r.header("Cache-Status") or ""), (margin, r)
    assert_no_traceback(l2)
    assert_no_traceback(l1)


# --------------------------------------------------------------------------- 12. access log

JSON_KEYS = {"time", "remote", "host", "method", "target", "protocol", "status", "bytes", "referer",
             "user_agent", "cache_status", "upstream", "duration"}
USER_AGENT, REFERER = "front-test/1.0", "http://referrer.example/page"


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_access_log(start_nodes, tmp_path, fmt):
    log_file = tmp_path / f"access-{fmt}.log"
    extra = f'access_log = "{log_file}"' + ("\naccess_log_format = \"json\"" if fmt == "json" else "")
    (node,) = start_nodes(("edge-log", "l1", 35, extra))
    target = unique("logged") + "?size=4321&cc=max-age=60"
    with Conn(node.traffic) as conn:
        for expected in ("MISS", "HIT"):
            conn.send(request("GET", target, f"User-Agent: {USER_AGENT}", f"Referer: {REFERER}"))
            r = conn.read_response()
            assert (r.status, r.header("X-Cache"), len(r.body)) == (200, expected, 4321)

    def two_lines() -> list[str] | None:
        text = log_file.read_text() if log_file.exists() else ""
        lines = text.splitlines()
        return lines if len(lines) >= 2 and text.endswith("\n") else None

    lines = wait_until(two_lines, 2.5, f"two lines in {log_file}")
    assert len(lines) == 2, lines
    for line, expected in zip(lines, ("MISS", "HIT")):
        if fmt == "json":
            entry = json.loads(line)
            assert JSON_KEYS <= entry.keys(), sorted(JSON_KEYS - entry.keys())
            assert (entry["host"], entry["method"], entry["target"], entry["protocol"]) == (
                SITE_HOST, "GET", target, "HTTP/1.1"), entry
            assert (int(entry["status"]), int(entry["bytes"]), entry["cache_status"]) == (200, 4321, expected), entry
            assert (entry["referer"], entry["user_agent"]) == (REFERER, USER_AGENT), entry
            assert str(entry["remote"]).startswith("127.0.0.1"), entry
            assert isinstance(entry["duration"], (int, float)) and entry["duration"] >= 0, entry
            assert entry["time"], entry
        else:
            # nginx "combined" (body bytes), plus the Host, the cache status and a duration.
            combined = re.search(r'\[[^\]]+\] "GET ' + re.escape(target) + r' HTTP/1\.1" 200 4321 "'
                                 + re.escape(REFERER) + r'" "' + re.escape(USER_AGENT) + '"', line)
            assert combined, line
            assert SITE_HOST in line, line
            rest = line[:combined.start()].replace("127.0.0.1", "") + line[combined.end():]
            assert re.search(rf"(?<![A-Z]){expected}(?![A-Z])", rest), line
            assert re.search(r"(?<![\d.])\d+\.\d+(?![\d.])|\b\d+(\.\d+)?m?s\b", rest), f"no duration: {line}"
    assert_no_traceback(node)


# --------------------------------------------------------------------------- fuzzing

FUZZ_BASES = [
    b"GET /gen/fuzz-a?size=300&cc=max-age=60 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
    b"HEAD /gen/fuzz-b?cc=max-age=60 HTTP/1.1\r\nHost: www.example.com\r\nRange: bytes=0-9\r\n"
    b"If-None-Match: \"x\"\r\nConnection: close\r\n\r\n",
    b"POST /gen/fuzz-c?cc=no-store HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"PUT /gen/fuzz-d HTTP/1.0\r\nHost: www.example.com\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nabcd",
    b"GET /gen/fuzz-e HTTP/1.1\r\nHost: www.example.com\r\n\r\nGET /gen/fuzz-f HTTP/1.1\r\nHost: www.example.com\r\n"
    b"Connection: close\r\n\r\n",
]
FUZZ_BYTES = b"\x00\r\n \t:;,\"\\\x7f\xff\x80%/?#0123456789abcdefABCDEF-+"


def _mutate(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out))
        what = rng.choice(("replace", "insert", "delete", "repeat"))
        if what == "replace":
            out[where] = rng.choice(FUZZ_BYTES)
        elif what == "insert":
            out[where:where] = bytes([rng.choice(FUZZ_BYTES)]) * rng.choice((1, 1, 2, 300))
        elif what == "delete" and len(out) > 1:
            del out[where]
        else:
            end = min(len(out), where + rng.randint(1, 40))
            out[where:where] = out[where:end]
    return bytes(out)


async def _send_and_read(address: str, data: bytes) -> bytes:
    import asyncio
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        answer = bytearray()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.4)
            except asyncio.TimeoutError:
                break           # a request still incomplete, or a kept-alive connection
            if not chunk:
                break
            answer += chunk
        return bytes(answer)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_fuzzed_requests_never_get_a_5xx_or_a_traceback(cluster, l1):
    """Seeded mutations of valid requests (issue 10 item 7): every answer is well-formed HTTP or a
    closed connection, none is a 5xx (the origin is up: any 5xx would be the node's own about the
    request), the node keeps serving and logs no traceback."""
    import asyncio
    import random
    rng = random.Random(20261201)
    cases = [_mutate(rng, rng.choice(FUZZ_BASES)) for _ in range(3000)]

    async def run_all() -> list[bytes]:
        answers: list[bytes] = []
        for start in range(0, len(cases), 250):
            answers += await asyncio.gather(*(_send_and_read(l1, case) for case in cases[start:start + 250]))
        return answers

    answers = asyncio.run(run_all())
    statuses = []
    for case, answer in zip(cases, answers):
        parsed = _responses(answer)
        assert parsed is not None, f"not well-formed HTTP: {answer[:300]!r} for {case[:300]!r}"
        statuses += parsed
    assert len(statuses) > len(cases) // 2, "most requests got no answer at all"
    server_errors = [(case, answer[:200]) for case, answer in zip(cases, answers)
                     if any(status >= 500 for status in _responses(answer))]
    assert not server_errors, server_errors[:3]
    assert fetch(l1, unique("after-fuzz") + "?cc=no-store").status == 200
    assert_no_traceback(cluster.node("l1-1"))


def _responses(data: bytes) -> list[int] | None:
    """The statuses of the HTTP/1.x responses `data` consists of; None if it is anything else.

    The last body may be cut short (the reader stops after 0.4 s of quiet)."""
    statuses, view = [], data
    while view:
        head_end = view.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        lines = view[:head_end].split(b"\r\n")
        status = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) [ -~]*", lines[0])
        if not status or not all(re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: [ -~\t]*", line) for line in lines[1:]):
            return None
        code = int(status.group(1))
        statuses.append(code)
        fields = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in lines[1:]}
        view = view[head_end + 4:]
        if 100 <= code < 200 or code in (204, 304):
            continue
        if b"content-length" in fields:
            view = view[int(fields[b"content-length"]):]
        else:
            break                   # chunked or close-delimited: the rest is this body
    return statuses
