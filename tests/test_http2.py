"""HTTP/2 on a cache node: ALPN h2 on the HTTPS listener and h2c prior knowledge on the plain one.

Real processes on 127.0.102.x: origin .10, l1-1 .31 (listen 8080 with h2c, listen_tls 8443,
http2_max_concurrent_streams 64).  Clients: curl --http2, and a small blocking client on the
h2 library (below), which can also misbehave (rapid reset, CONTINUATION flood).
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest
import trustme
from h2.errors import ErrorCodes

from edge.http.h2 import _parse_head
from tests.cluster import Cluster, topology_text

L1 = "127.0.102.31"
TLS_PORT = 8443
WWW = "www.example.com"


# --------------------------------------------------------------------------- pure rules

@pytest.mark.parametrize("head, status, fields", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nAge: 1\r\n", 200,
     [(b":status", b"200"), (b"content-length", b"3"), (b"age", b"1")]),
    # Connection-specific fields never go out on HTTP/2 (RFC 9113 8.2.2).
    (b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nX-A: b: c\r\n", 404,
     [(b":status", b"404"), (b"x-a", b"b: c")]),
    (b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\r\n", 206,
     [(b":status", b"206")]),
])
def test_parse_head(head, status, fields):
    assert _parse_head(head) == (status, fields)


def alpn_chosen(server: ssl.SSLContext, ca: trustme.CA, offered: list[str]) -> str | None:
    """A handshake in memory (no sockets): the protocol the server context picks."""
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(offered)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=WWW)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return s.selected_alpn_protocol()


@pytest.mark.parametrize("http2, offered, chosen", [
    ("", ["h2", "http/1.1"], "h2"),
    ("http2 = false", ["h2", "http/1.1"], "http/1.1"),
    ("http2 = false", ["h2"], None),
    ("", ["http/1.1"], "http/1.1"),
])
def test_alpn_follows_the_http2_key(tmp_path: Path, http2: str, offered: list[str], chosen: str | None):
    from edge import config
    from edge.http import tls
    ca = trustme.CA()
    leaf = ca.issue_cert(WWW)
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    (tmp_path / "c.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    text = (f'[sites.s]\nhosts = ["{WWW}"]\norigin = "http://127.0.102.10:8080"\n'
            'tls_cert = "c.pem"\ntls_key = "k.pem"\n'
            f'[nodes.e]\nrole = "l1"\nlisten = "127.0.102.1:8080"\nadmin = "127.0.102.1:8091"\n'
            f'listen_tls = "127.0.102.1:8443"\n{http2}\n')
    topology = config.parse(text, "t.toml", tmp_path)
    assert alpn_chosen(tls.load(topology, topology.nodes[0]).server, ca, offered) == chosen


def test_h2c_is_for_cache_nodes_only():
    from edge import config
    text = ('[sites.s]\nhosts = ["www.example.com"]\norigin = "http://127.0.102.10:8080"\n'
            '[nodes.o]\nrole = "origin"\nlisten = "127.0.102.10:8080"\nadmin = "127.0.102.10:8091"\nh2c = true\n')
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "t.toml", Path("/tmp"))
    assert caught.value.key == "nodes.o.h2c", caught.value


# --------------------------------------------------------------------------- a client

class H2Client:
    """A blocking HTTP/2 client over TLS (ALPN h2) or cleartext (prior knowledge)."""

    def __init__(self, ca: Path | None, port: int = TLS_PORT, host: str = WWW, timeout: float = 10.0,
                 validate: bool = True):
        sock = socket.create_connection((L1, port), timeout=timeout)
        if ca is not None:
            context = ssl.create_default_context(cafile=str(ca))
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname=host)
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.host = host
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate,
            normalize_outbound_headers=validate))
        self.conn.initiate_connection()
        self.responses: dict[int, dict] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", fields: tuple = (), body: bytes | None = None,
                authority: str | None = None) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "https"), (":authority", authority or self.host),
                   (":path", path), *fields]
        self.conn.send_headers(stream_id, headers, end_stream=body is None)
        self.responses[stream_id] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
        self.flush()
        if body is not None:
            self.send_body(stream_id, body)
        return stream_id

    def send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.read_once()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self.flush()
        self.conn.end_stream(stream_id)
        self.flush()

    def read_once(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.responses[event.stream_id]["headers"] = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                self.responses[event.stream_id]["body"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.responses[event.stream_id]["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                if event.stream_id in self.responses:
                    self.responses[event.stream_id]["reset"] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        self.flush()
        return True

    def wait(self, *stream_ids: int) -> list[dict]:
        while not all(self.responses[s]["ended"] or self.responses[s]["reset"] is not None for s in stream_ids):
            if not self.read_once():
                raise ConnectionError("server closed the connection")
        return [self.responses[s] for s in stream_ids]

    def get(self, path: str, **kwargs) -> dict:
        return self.wait(self.request(path, **kwargs))[0]

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the node

@pytest.fixture(scope="module")
def cdn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h2")
    ca = trustme.CA()
    leaf = ca.issue_cert(WWW, "static.example.com")
    leaf.private_key_pem.write_to_path(str(tmp / "www.key"))
    (tmp / "www.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cluster = Cluster(tmp / "topology.toml", "102")
    cluster.config.write_text(topology_text(
        "102", cache_dir=tmp / "state",
        extra_site=f'tls_cert = "{tmp / "www.pem"}"\ntls_key = "{tmp / "www.key"}"',
        extra_node=f'listen_tls = "{L1}:{TLS_PORT}"\nh2c = true\nhttp2_max_concurrent_streams = 64'))
    try:
        cluster.start("origin", "l1-1")
        yield cluster, tmp / "ca.pem"
    finally:
        cluster.stop_all()


def curl(ca: Path, url: str, *args: str) -> tuple[str, int, dict[str, str], bytes]:
    result = subprocess.run(["curl", "-sS", "--http2", "-D", "-", "-o", "-", "-w", "\n%{http_version}",
                             "--cacert", str(ca), "--resolve", f"{WWW}:{TLS_PORT}:{L1}",
                             "--resolve", f"{WWW}:8080:{L1}", *args, url], capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    out, _, version = result.stdout.rpartition(b"\n")
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return version.decode(), int(lines[0].split()[1]), fields, body


def normalised(cache_status: str) -> str:
    return re.sub(r"ttl=-?\d+", "ttl=N", cache_status)


def test_alpn_negotiates_h2_and_http1_still_works(cdn):
    _, ca = cdn
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(offered)
        with socket.create_connection((L1, TLS_PORT), timeout=5) as sock, \
                context.wrap_socket(sock, server_hostname=WWW) as tls:
            assert tls.selected_alpn_protocol() == chosen
    path = f"/gen/alpn-{uuid.uuid4().hex[:8]}?size=10&cc=max-age=60"
    assert curl(ca, f"https://{WWW}:{TLS_PORT}{path}", "--http1.1")[:2] == ("1.1", 200)


def test_curl_http2_gets_the_same_cache_behaviour_as_http1(cdn):
    _, ca = cdn
    token = uuid.uuid4().hex[:12]
    seen = {}
    for option in ("--http1.1", "--http2"):
        url = f"https://{WWW}:{TLS_PORT}/gen/same-{option[2:]}-{token}?size=3000&cc=max-age=60"
        first, second = curl(ca, url, option), curl(ca, url, option)
        assert first[0] == second[0] == ("2" if option == "--http2" else "1.1")
        assert first[1] == second[1] == 200
        assert first[2]["x-cache"] == "MISS" and second[2]["x-cache"] == "HIT", (first[2], second[2])
        assert int(second[2]["age"]) >= 0 and len(second[3]) == 3000 and first[3] == second[3]
        assert second[2]["content-length"] == "3000"
        assert "connection" not in second[2] and "keep-alive" not in second[2]
        seen[option] = [normalised(r[2]["cache-status"]) for r in (first, second)]
    assert seen["--http1.1"] == seen["--http2"], seen


def test_ranges_conditionals_and_head_over_h2(cdn):
    _, ca = cdn
    url = f"https://{WWW}:{TLS_PORT}/gen/range-{uuid.uuid4().hex[:8]}?size=5000&cc=max-age=60&etag=v1"
    _, status, fields, whole = curl(ca, url)
    assert status == 200
    _, status, fields, part = curl(ca, url, "-r", "100-199")
    assert (status, part, fields["content-range"]) == (206, whole[100:200], "bytes 100-199/5000")
    _, status, _, body = curl(ca, url, "-H", f"If-None-Match: {fields['etag']}")
    assert (status, body) == (304, b"")
    client = H2Client(ca)
    try:
        response = client.get(url.split(str(TLS_PORT), 1)[1], method="HEAD")
    finally:
        client.close()
    assert (response["headers"][":status"], response["body"], response["headers"]["content-length"]) \
        == ("200", b"", "5000")


def test_h2c_prior_knowledge_on_the_plain_listener(cdn):
    _, ca = cdn
    url = f"http://{WWW}:8080/gen/h2c-{uuid.uuid4().hex[:8]}?size=700&cc=max-age=60"
    first = curl(ca, url, "--http2-prior-knowledge")
    second = curl(ca, url, "--http2-prior-knowledge")
    assert (first[0], first[1], first[2]["x-cache"]) == ("2", 200, "MISS")
    assert (second[0], second[1], second[2]["x-cache"]) == ("2", 200, "HIT")
    # Plain HTTP/1.1 on the same listener is untouched.
    assert curl(ca, url, "--http1.1")[:2] == ("1.1", 200)


def test_large_streamed_object_respects_flow_control(cdn):
    """Bigger than the client's window and the node's stream threshold: streamed through, then a hit."""
    _, ca = cdn
    path = f"/gen/big-{uuid.uuid4().hex[:8]}?size={3 * 2**20 + 17}&cc=max-age=60"
    client = H2Client(ca)
    try:
        first = client.get(path)
        second = client.get(path)
    finally:
        client.close()
    _, status, _, reference = curl(ca, f"https://{WWW}:{TLS_PORT}{path}", "--http1.1")
    assert first["headers"][":status"] == second["headers"][":status"] == "200"
    assert len(first["body"]) == len(reference) == 3 * 2**20 + 17
    assert hashlib.sha256(first["body"]).digest() == hashlib.sha256(second["body"]).digest() \
        == hashlib.sha256(reference).digest()
    assert second["headers"]["x-cache"] == "HIT"


def test_a_request_body_larger_than_the_window_is_read(cdn):
    _, ca = cdn
    client = H2Client(ca)
    try:
        response = client.get(f"/gen/post-{uuid.uuid4().hex[:8]}?size=10", method="POST",
                              body=b"x" * (300 * 1024), fields=(("content-type", "application/octet-stream"),))
    finally:
        client.close()
    assert response["headers"][":status"] == "200", response


def test_100_concurrent_streams_for_one_cold_url_reach_the_origin_once(cdn):
    _, ca = cdn
    path = f"/gen/collapse-{uuid.uuid4().hex[:8]}?size=2000&cc=max-age=60&delay=500"
    clients = [H2Client(ca), H2Client(ca)]       # 64 streams at most per connection here
    try:
        ids = [(c, c.request(path)) for c in clients for _ in range(50)]
        responses = [c.wait(s)[0] for c, s in ids]
    finally:
        for c in clients:
            c.close()
    assert all(r["headers"][":status"] == "200" and len(r["body"]) == 2000 for r in responses)
    assert {r["headers"]["x-origin-hits"] for r in responses} == {"1"}
    assert sum(r["headers"]["x-cache"] == "MISS" for r in responses) == 1


@pytest.mark.parametrize("fields, pseudo", [
    ((("host", "other.example.com"),), ()),          # two views of one request: how smuggling starts
    ((("X-Upper", "1"),), ()),                        # RFC 9113 8.2.1: names are lower case
    ((("connection", "keep-alive"),), ()),            # connection-specific
    ((("te", "gzip"),), ()),
    ((("x-a", " padded"),), ()),
    ((("x-a", "a\x00b"),), ()),
    ((), ((":protocol", "websocket"),)),              # unknown pseudo-header
    ((), ((":path", "/again"),)),                     # repeated
])
def test_a_malformed_request_gets_400_on_its_stream_and_the_connection_goes_on(cdn, fields, pseudo):
    _, ca = cdn
    client = H2Client(ca, validate=False)
    try:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"), (":authority", WWW),
                                             (":path", "/gen/x?size=1"), *pseudo, *fields], end_stream=True)
        client.responses[stream_id] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
        client.flush()
        (response,) = client.wait(stream_id)
        assert response["headers"][":status"] == "400", response
        assert client.get("/gen/x?size=1")["headers"][":status"] == "200"
    finally:
        client.close()


def refused(cluster: Cluster, reason: str) -> float:
    match = re.search(rf'edge_refused_requests_total{{reason="{reason}"}} ([0-9.e+]+)',
                      cluster.node("l1-1").metrics())
    return float(match.group(1)) if match else 0.0


def test_rapid_reset_flood_closes_that_connection_while_others_are_served(cdn):
    cluster, ca = cdn
    before = refused(cluster, "h2_rapid_reset")
    attacker = H2Client(ca)
    path = f"/gen/rr-{uuid.uuid4().hex[:8]}?size=100&delay=2000"       # slow misses: the work that piles up
    done = threading.Event()
    bystander: list[dict] = []

    def serve_a_bystander():
        other = H2Client(ca)
        try:
            while not done.is_set() or len(bystander) < 20:
                bystander.append(other.get("/gen/bystander?size=10&cc=max-age=60"))
        except Exception as exc:
            bystander.append({"headers": {":status": repr(exc)}})
        finally:
            other.close()

    thread = threading.Thread(target=serve_a_bystander)
    thread.start()
    closed = False
    try:
        for i in range(1000):
            try:
                stream_id = attacker.conn.get_next_available_stream_id()
                attacker.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"),
                                                       (":authority", WWW), (":path", f"{path}&i={i}")],
                                           end_stream=True)
                attacker.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                attacker.flush()
            except (OSError, h2.exceptions.ProtocolError):
                closed = True
                break
        if not closed:
            attacker.sock.settimeout(5)
            try:
                while attacker.read_once() and attacker.terminated is None:
                    pass
            except (OSError, h2.exceptions.ProtocolError):
                pass
            closed = True
    finally:
        done.set()
        thread.join(30)
        attacker.close()
    assert closed
    assert attacker.terminated is None or attacker.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert refused(cluster, "h2_rapid_reset") == before + 1
    assert bystander and all(r["headers"][":status"] == "200" for r in bystander)


def test_continuation_flood_is_cut_off(cdn):
    cluster, ca = cdn
    before = refused(cluster, "h2_protocol_error")
    client = H2Client(ca)
    try:
        stream_id = 1
        encoder = client.conn.encoder
        block = encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", WWW.encode()),
                                (b":path", b"/")])
        headers = hyperframe.frame.HeadersFrame(stream_id)
        headers.data = block
        sent = headers.serialize()
        filler = hyperframe.frame.ContinuationFrame(stream_id)
        filler.data = b"\x40\x01a\x01b" * 3000          # literal fields, never END_HEADERS
        piece = filler.serialize()
        client.sock.sendall(sent)
        cut_off = False
        for _ in range(2000):                             # 30 MiB if nobody stopped it
            try:
                client.sock.sendall(piece)
            except OSError:
                cut_off = True
                break
        if not cut_off:
            client.sock.settimeout(5)
            try:
                while client.sock.recv(65536):
                    pass
                cut_off = True
            except OSError:
                cut_off = True
    finally:
        client.close()
    assert cut_off
    assert refused(cluster, "h2_protocol_error") == before + 1
    # The node is fine.
    assert curl(ca, f"https://{WWW}:{TLS_PORT}/gen/after-flood?size=5")[1] == 200


def test_streams_beyond_the_limit_are_refused_not_queued(cdn):
    """64 slow streams in progress; the client resets them all and opens more: those are refused,
    as the reset ones still hold their places until their work ends."""
    _, ca = cdn
    client = H2Client(ca)
    try:
        slow = [client.request(f"/gen/held-{uuid.uuid4().hex[:8]}?size=10&delay=1500") for _ in range(64)]
        for stream_id in slow:
            client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.flush()
        time.sleep(0.2)
        extra = client.request(f"/gen/extra-{uuid.uuid4().hex[:8]}?size=10")
        (response,) = client.wait(extra)
        assert response["reset"] == ErrorCodes.REFUSED_STREAM, response
        time.sleep(1.8)                 # the held work ends: room again
        assert client.get(f"/gen/later-{uuid.uuid4().hex[:8]}?size=10")["headers"][":status"] == "200"
    finally:
        client.close()


@pytest.mark.parametrize("count, expected", [(40, "431"), (70, ErrorCodes.ENHANCE_YOUR_CALM)])
def test_oversized_header_list(cdn, count, expected):
    """More than max_header_bytes (32 KiB) of fields: 431 on the stream; more than twice that is
    not even decoded (GOAWAY)."""
    cluster, ca = cdn
    client = H2Client(ca)
    try:
        assert client.get("/gen/x?size=1")["headers"][":status"] == "200"   # our SETTINGS are acknowledged
        stream_id = client.request("/gen/x?size=1", fields=[(f"x-f{i}", "v" * 1000) for i in range(int(count))])
        try:
            (response,) = client.wait(stream_id)
            outcome = response["headers"][":status"] if response["headers"] else response["reset"]
        except ConnectionError:
            outcome = client.terminated.error_code if client.terminated else "closed"
    finally:
        client.close()
    assert outcome == expected, outcome


def test_drain_finishes_the_streams_in_progress(cdn):
    """Last in this module: it stops the node.  SIGTERM while a slow miss is in progress over
    HTTP/2: the node sends a graceful GOAWAY and still answers the stream in full (curl, as
    nghttp2 reads on after GOAWAY; the h2 library's client does not)."""
    cluster, ca = cdn
    url = f"https://{WWW}:{TLS_PORT}/gen/drain-{uuid.uuid4().hex[:8]}?size=5000&delay=1500"
    client = subprocess.Popen(["curl", "-sS", "--http2", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                               "--cacert", str(ca), "--resolve", f"{WWW}:{TLS_PORT}:{L1}", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        node = cluster.node("l1-1")
        started = time.monotonic()
        node.stop()
        stopped_after = time.monotonic() - started
        out, err = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    body, _, status = out.rpartition(b"\n")
    assert (status, len(body)) == (b"200 2", 5000), (status, err)
    assert stopped_after < 5        # it did not wait for a drain timeout: the stream ended, then the connection
