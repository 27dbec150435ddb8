"""Who may change the cache, and who may read the admin listeners: real processes on 127.0.84.x.

An origin (.10) that answers 2xx to any method at /gen/, an L2 (.21) and an
L1 (.31) in front of it, and the DNS scheduler in the test's event loop
(.5, port 0).  Two sites: www.example.com with the default allowed methods,
api.example.com allowing GET, HEAD and PATCH only.  Admin clients bind their
sockets to .60 (in the topology-wide `admin_allow`) or .100 (outside it;
only the L2 lets it in, by its own `admin_allow`).
"""

from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from edge import config
from edge.scheduler.service import Scheduler
from tests.cluster import ADMIN_PORT, TRAFFIC_PORT, Cluster

NET = "127.0.84"
ALLOWED_CLIENT, OTHER_CLIENT = f"{NET}.60", f"{NET}.100"
DEFAULT_ALLOW = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
WWW, API = {"Host": "www.example.com"}, {"Host": "api.example.com"}


def topology(state: Path) -> str:
    def node(name: str, role: str, octet: int, *extra: str) -> str:
        return "\n".join([f"[nodes.{name}]", f'role = "{role}"', f'listen = "{NET}.{octet}:{TRAFFIC_PORT}"',
                          f'admin = "{NET}.{octet}:{ADMIN_PORT}"', *extra]) + "\n"

    cache = ('memory_size = "16MiB"', 'disk_size = "256MiB"')
    return (f'state_dir = "{state}"\nadmin_allow = ["{ALLOWED_CLIENT}/32"]\n'
            f'[sites.example]\nhosts = ["www.example.com"]\norigin = "http://{NET}.10:{TRAFFIC_PORT}"\n'
            f'[sites.api]\nhosts = ["api.example.com"]\norigin = "http://{NET}.10:{TRAFFIC_PORT}"\n'
            'allowed_methods = ["GET", "HEAD", "PATCH"]\n'
            '[regions.here]\nlat = 0.0\nlon = 0.0\n'
            + node("origin", "origin", 10)
            + node("l2-a", "l2", 21, *cache, f'admin_allow = ["{NET}.0/24"]')
            + node("l1-1", "l1", 31, *cache, 'region = "here"', "parent_probe_interval = 0.1")
            + f'[dns]\nlisten = "{NET}.5:0"\nadmin = "{NET}.5:0"\nzones = ["example.com"]\n'
              'cdn_zone = "cdn.example.net"\ndefault_region = "here"\n')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("access")
    path = folder / "topology.toml"
    path.write_text(topology(folder / "state"))
    c = Cluster(path, "84")
    try:
        c.start("origin", "l2-a", "l1-1")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def unique(name: str = "obj") -> str:
    return f"/gen/{name}-{uuid.uuid4().hex[:12]}?cc=max-age=600"


async def send(http, node: str, cluster: Cluster, target: str, method: str = "GET", headers=WWW, **kw):
    async with http.request(method, f"http://{cluster.node(node).traffic}{target}", headers=headers,
                            allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.read()


async def admin_get(address: str, path: str, source: str, method: str = "GET", headers=None) -> tuple[int, str]:
    """An admin request from `source`, a loopback address the client socket is bound to."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.request(method, f"http://{address}{path}", headers=headers) as r:
        return r.status, await r.text()


async def metric(cluster: Cluster, node: str, line_prefix: str) -> float:
    """One sample of a node's /metrics (read from the allowed client address); 0 when absent."""
    status, text = await admin_get(cluster.node(node).admin, "/metrics", ALLOWED_CLIENT)
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


INVALIDATED = 'edge_invalidations_total{reason="unsafe-method"}'

# ------------------------------------------------------------------ allowed methods


@pytest.mark.parametrize("method, allow, reason", [
    ("PURGE", DEFAULT_ALLOW, "method_not_allowed"), ("PATCH", DEFAULT_ALLOW, "method_not_allowed"),
    ("PROPFIND", DEFAULT_ALLOW, "method_not_allowed"), ("TRACE", DEFAULT_ALLOW, "method_not_allowed"),
    # A method the parser does not know is refused by the front before any site is chosen.
    ("FOO", "GET, HEAD", "unknown_method")])
async def test_a_method_the_site_does_not_allow_evicts_nothing_anywhere(cluster, http, method, allow, reason):
    """The origin answers 2xx to any method, so before allowed_methods any of these evicted the
    URL from the L1 and the owner L2 (RFC 9111 4.4) without the purge token."""
    target = unique(method.lower())
    assert (await send(http, "l1-1", cluster, target))[1]["X-Cache"] == "MISS"
    _, hit, _ = await send(http, "l1-1", cluster, target)
    assert hit["X-Cache"] == "HIT" and hit["X-Origin-Hits"] == "1"
    counted = f'edge_refused_requests_total{{reason="{reason}"}}'
    refused = {name: await metric(cluster, name, counted) for name in ("l1-1", "l2-a")}
    invalidated = {name: await metric(cluster, name, INVALIDATED) for name in ("l1-1", "l2-a")}

    for node in ("l1-1", "l2-a"):           # through the CDN, and straight at the parent
        got, headers, body = await send(http, node, cluster, target, method=method, data=b"x" * 10)
        assert (got, headers["Allow"]) == (405, allow), body
        assert await metric(cluster, node, counted) == refused[node] + 1

    _, l2, _ = await send(http, "l2-a", cluster, target)     # first: an L1 miss would refill the L2
    _, l1, _ = await send(http, "l1-1", cluster, target)
    assert (l1["X-Cache"], l1["X-Origin-Hits"], l2["X-Cache"]) == ("HIT", "1", "HIT")
    assert {name: await metric(cluster, name, INVALIDATED) for name in ("l1-1", "l2-a")} == invalidated
    # The origin saw the fill and this request, never the refused method.
    _, direct, _ = await send(http, "origin", cluster, target)
    assert direct["X-Origin-Hits"] == "2"


async def test_an_allowed_unsafe_method_still_invalidates_both_tiers(cluster, http):
    """The control for the test above: DELETE is allowed, reaches the origin and evicts on L1 and L2."""
    target = unique("delete")
    await send(http, "l1-1", cluster, target)
    assert (await send(http, "l1-1", cluster, target))[1]["X-Cache"] == "HIT"
    status, headers, _ = await send(http, "l1-1", cluster, target, method="DELETE")
    assert (status, headers["X-Cache"], headers["X-Origin-Method"]) == (200, "BYPASS", "DELETE")
    _, after, _ = await send(http, "l1-1", cluster, target)
    assert after["X-Cache"] == "MISS" and "l2-a; fwd=uri-miss" in after["Cache-Status"]


async def test_each_site_has_its_own_allowed_methods(cluster, http):
    target = unique("api")
    await send(http, "l1-1", cluster, target, headers=API)
    assert (await send(http, "l1-1", cluster, target, headers=API))[1]["X-Cache"] == "HIT"
    status, headers, _ = await send(http, "l1-1", cluster, target, method="POST", headers=API, data=b"{}")
    assert (status, headers["Allow"]) == (405, "GET, HEAD, PATCH")
    assert (await send(http, "l1-1", cluster, target, headers=API))[1]["X-Cache"] == "HIT"
    # PATCH is allowed on this site (not by default): forwarded, and it invalidates (RFC 9111 4.4).
    status, headers, _ = await send(http, "l1-1", cluster, target, method="PATCH", headers=API, data=b"{}")
    assert (status, headers["X-Origin-Method"]) == (200, "PATCH")
    assert (await send(http, "l1-1", cluster, target, headers=API))[1]["X-Cache"] == "MISS"
    # The same method on the other site is refused.
    status, headers, _ = await send(http, "l1-1", cluster, target, method="PATCH", data=b"{}")
    assert (status, headers["Allow"]) == (405, DEFAULT_ALLOW)


def _exchange(address: str, data: bytes, wait: float = 2.0, source: str = "") -> tuple[bytes, bool]:
    """Send raw bytes (from `source`); what was answered within `wait`, and whether the node closed."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait, source_address=(source, 0)) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
        return answer, True


def test_refused_before_the_body_is_asked_for_and_logged_once(cluster):
    """The 405 comes instead of 100 Continue (the body is never read, so the connection closes);
    a bodyless refusal keeps the connection for the next request."""
    l1 = cluster.node("l1-1")
    target = unique("expect")
    answer, closed = _exchange(l1.traffic, (f"PURGE {target} HTTP/1.1\r\nHost: www.example.com\r\n"
                                            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 405 ") and b"100 Continue" not in answer and closed, answer
    answer, closed = _exchange(l1.traffic, (f"PURGE {target} HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
                                            f"GET {target} HTTP/1.1\r\nHost: www.example.com\r\n"
                                            "Connection: close\r\n\r\n").encode())
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"405", b"200"] and closed
    lines = [line for line in l1.log.read_text().splitlines() if f"refused PURGE {target}" in line]
    assert len(lines) == 2 and all(" INFO " in line and "not allowed for site example" in line for line in lines)


# ------------------------------------------------------------------ admin listeners


@pytest.mark.parametrize("node, path, outsider_status", [
    ("l1-1", "/metrics", 403), ("l1-1", "/status", 403), ("origin", "/metrics", 403),
    ("l1-1", "/healthz", 200),                     # probed from node addresses: always open
    ("l2-a", "/metrics", 200), ("l2-a", "/status", 200),      # its own admin_allow takes .100 in
])
async def test_admin_allow_list(cluster, node, path, outsider_status):
    address = cluster.node(node).admin
    assert (await admin_get(address, path, ALLOWED_CLIENT))[0] == 200
    status, text = await admin_get(address, path, OTHER_CLIENT)
    assert status == outsider_status, text


async def test_purge_needs_an_allowed_address_and_the_exact_token(cluster, http):
    target = unique("purge")
    await send(http, "l1-1", cluster, target)
    address = cluster.node("l1-1").admin
    purge = "/purge?url=" + quote(f"http://www.example.com{target}", safe="")
    for wrong in ("", "Bearer test-tokeX", "Bearer test-token2", "Bearer test", "bearer test-token"):
        status, _ = await admin_get(address, purge, ALLOWED_CLIENT, "POST",
                                    {"Authorization": wrong} if wrong else None)
        assert status == 401, wrong
    # Bytes outside ASCII are a wrong token (401), not a failed comparison (500).
    answer, _ = _exchange(address, (b"POST " + purge.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                    b"Authorization: Bearer t\xe9st-token\r\nConnection: close\r\n\r\n"),
                          source=ALLOWED_CLIENT)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    right = {"Authorization": "Bearer test-token"}
    assert (await admin_get(address, purge, OTHER_CLIENT, "POST", right))[0] == 403
    assert (await send(http, "l1-1", cluster, target))[1]["X-Cache"] == "HIT"
    assert (await admin_get(address, purge, ALLOWED_CLIENT, "POST", right))[0] == 200
    assert (await send(http, "l1-1", cluster, target))[1]["X-Cache"] == "MISS"


async def test_dns_scheduler_explain_behind_its_allow_list(cluster):
    scheduler = Scheduler(config.load(cluster.config))
    await scheduler.start()
    try:
        address = "%s:%d" % scheduler.admin_address
        explain = "/explain?name=www.example.com&client=203.0.113.7"
        status, text = await admin_get(address, explain, ALLOWED_CLIENT)
        assert status == 200 and '"region"' in text
        for path in (explain, "/metrics"):
            assert (await admin_get(address, path, OTHER_CLIENT))[0] == 403
        assert (await admin_get(address, "/healthz", OTHER_CLIENT))[0] == 200
    finally:
        await scheduler.close()
