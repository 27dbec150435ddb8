"""One cache node in front of the origin, as real processes on 127.0.31.x.

Each test uses its own URLs, so they share one origin and one node.  The
origin's X-Origin-Hits header is the proof of offload: a response that still
says 1 after several requests came from the cache.
"""

from __future__ import annotations

import asyncio
import http.client as httplib
import socket
import subprocess
import uuid
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster

HOST = {"Host": "www.example.com"}
EXTENSION_METHODS = 'allowed_methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PROPFIND", "MKCOL", "M-SEARCH", "UNLOCK"]'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The WebDAV and SSDP methods some tests forward are allowed on top of the defaults.
    c = Cluster.create(tmp_path_factory.mktemp("cache-node"), "31", l1=1, extra_site=EXTENSION_METHODS)
    try:
        c.start("origin", "l1-1")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def unique(path: str = "obj") -> str:
    return f"/gen/{path}-{uuid.uuid4().hex[:12]}"


async def get(http, url, method="GET", headers=None, **kw):
    async with http.request(method, url, headers={**HOST, **(headers or {})}, allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_miss_then_hit_origin_counted_once(cluster, http):
    url = cluster.url("l1-1", unique() + "?size=5000&cc=max-age=60")
    status, h1, body1 = await get(http, url)
    assert (status, h1["X-Cache"], h1["X-Origin-Hits"]) == (200, "MISS", "1")
    status, h2, body2 = await get(http, url)
    assert (status, h2["X-Cache"], h2["X-Origin-Hits"]) == (200, "HIT", "1")
    assert body1 == body2 and len(body2) == 5000
    assert "l1-1; hit" in h2["Cache-Status"]
    assert "fwd=uri-miss" in h1["Cache-Status"] and "stored" in h1["Cache-Status"]
    assert "1.1 l1-1" in h2["Via"]
    assert int(h2["Age"]) >= 0


async def test_revalidation_sends_conditional_and_freshens(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=0&etag=1")
    status, h1, body1 = await get(http, url)
    assert (status, h1["X-Cache"]) == (200, "MISS")
    status, h2, body2 = await get(http, url)
    # The stored copy is stale at once: the node asked with If-None-Match, the origin said 304.
    assert (status, h2["X-Cache"], h2["X-Origin-Conditional"], h2["X-Origin-Hits"]) == (200, "REVALIDATED", "1", "2")
    assert "fwd=stale" in h2["Cache-Status"] and "fwd-status=304" in h2["Cache-Status"]
    assert body2 == body1


async def test_vary_keeps_variants_apart(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&vary=Accept-Language")
    _, g1, en = await get(http, url, headers={"Accept-Language": "en"})
    _, f1, fr = await get(http, url, headers={"Accept-Language": "fr"})
    assert g1["X-Cache"] == "MISS" and f1["X-Cache"] == "MISS"
    assert "vary-miss" in f1["Cache-Status"]
    assert en != fr
    _, g2, en2 = await get(http, url, headers={"Accept-Language": "en"})
    _, f2, fr2 = await get(http, url, headers={"Accept-Language": "fr"})
    assert (g2["X-Cache"], en2) == ("HIT", en)
    assert (f2["X-Cache"], fr2) == ("HIT", fr)


async def test_equivalent_vary_values_share_a_variant(cluster, http):
    """RFC 9111 4.1: values that mean the same (case, whitespace, unordered list) select one variant."""
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&vary=Accept-Language")
    _, first, body = await get(http, url, headers={"Accept-Language": "en, fr"})
    _, second, body2 = await get(http, url, headers={"Accept-Language": "FR,en"})
    assert (first["X-Cache"], second["X-Cache"], body2) == ("MISS", "HIT", body)


async def test_vary_star_never_served_from_cache(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&vary=*")
    _, h1, _ = await get(http, url)
    _, h2, _ = await get(http, url)
    assert (h1["X-Cache"], h2["X-Cache"], h2["X-Origin-Hits"]) == ("MISS", "MISS", "2")


def coalesced_waits(cluster) -> float:
    metrics = cluster.node("l1-1").metrics()
    (line,) = [line for line in metrics.splitlines() if line.startswith("edge_coalesced_waits_total")]
    return float(line.split()[-1])


async def test_hundred_concurrent_cold_requests_reach_origin_once(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&delay=300&size=2048")
    waits_before = coalesced_waits(cluster)
    results = await asyncio.gather(*(get(http, url) for _ in range(100)))
    assert all(status == 200 for status, _, _ in results)
    assert {h["X-Origin-Hits"] for _, h, _ in results} == {"1"}
    assert len({body for _, _, body in results}) == 1 and len(results[0][2]) == 2048
    # One leader's MISS; the followers are collapsed hits (RFC 9211 2.6), answered whole.
    statuses = sorted((h["X-Cache"], "collapsed" in h["Cache-Status"]) for _, h, _ in results)
    assert statuses == [("HIT", True)] * 99 + [("MISS", False)]
    assert all(h["Content-Length"] == "2048" and "l1-1; hit; ttl=" in h["Cache-Status"]
               for _, h, _ in results if h["X-Cache"] == "HIT")
    assert coalesced_waits(cluster) - waits_before == 99       # exactly the followers, counted once each


async def test_collapsed_followers_with_conditionals_and_ranges_are_answered_as_asked(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&delay=300&size=2048&etag=1")
    plain = get(http, url)
    ranged = get(http, url, headers={"Range": "bytes=10-19"})
    head = get(http, url, method="HEAD")
    (s1, h1, b1), (s2, h2, b2), (s3, h3, b3) = await asyncio.gather(plain, ranged, head)
    assert (s1, len(b1)) == (200, 2048)
    assert (s2, h2["Content-Range"], b2) == (206, "bytes 10-19/2048", b1[10:20])
    assert (s3, h3["Content-Length"], b3) == (200, "2048", b"")
    status, h4, b4 = await get(http, url, headers={"If-None-Match": h1["ETag"]})
    assert (status, b4) == (304, b"")


async def test_not_storable_response_lets_waiters_fetch_themselves(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=no-store&delay=200")
    results = await asyncio.gather(*(get(http, url) for _ in range(5)))
    assert sorted(int(h["X-Origin-Hits"]) for _, h, _ in results) == [1, 2, 3, 4, 5]


async def test_no_store_and_private_are_not_cached(cluster, http):
    for cc in ("no-store", "private,max-age=60"):
        url = cluster.url("l1-1", unique() + f"?cc={cc}")
        await get(http, url)
        _, h, _ = await get(http, url)
        assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2"), cc


async def test_cdn_cache_control_overrides_cache_control(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=no-store&cdncc=max-age=60")
    await get(http, url)
    _, h, _ = await get(http, url)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1")


async def test_cdn_cache_control_directives_of_the_wrong_type_are_ignored(cluster, http):
    """RFC 9213 2.1 / RFC 8941: max-age="600" is a String, not an Integer: no freshness from it."""
    url = cluster.url("l1-1", unique() + "?cc=max-age=600&cdncc=" + quote('max-age="600"'))
    await get(http, url)
    _, h, _ = await get(http, url)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2")


async def test_head_is_served_from_stored_get(cluster, http):
    url = cluster.url("l1-1", unique() + "?size=3000&cc=max-age=60")
    await get(http, url)
    status, h, body = await get(http, url, method="HEAD")
    assert (status, h["X-Cache"], h["Content-Length"], body) == (200, "HIT", "3000", b"")


async def test_client_conditional_answered_from_cache(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&etag=1")
    _, h1, _ = await get(http, url)
    status, h2, body = await get(http, url, headers={"If-None-Match": h1["ETag"]})
    assert (status, h2["X-Cache"], body, h2["ETag"]) == (304, "HIT", b"", h1["ETag"])


async def test_unsafe_method_invalidates_stored_url(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60")
    await get(http, url)
    _, h, _ = await get(http, url)
    assert h["X-Cache"] == "HIT"
    status, hp, _ = await get(http, url, method="POST", data=b"x" * 1000)
    assert (status, hp["X-Cache"], hp["X-Origin-Method"], hp["X-Origin-Body-Length"]) == (200, "BYPASS", "POST", "1000")
    _, h3, _ = await get(http, url)
    assert h3["X-Cache"] == "MISS"


async def test_extension_method_known_to_the_parser_is_forwarded(cluster, http):
    url = cluster.url("l1-1", unique())
    status, h, _ = await get(http, url, method="PROPFIND", data=b"hello")
    assert (status, h["X-Origin-Method"], h["X-Origin-Body-Length"], h["X-Cache"]) == (200, "PROPFIND", "5", "BYPASS")


async def test_unknown_method_gets_405_and_never_reaches_the_origin(cluster, http):
    path = unique()
    status, h, body = await get(http, cluster.url("l1-1", path), method="FROBNICATE", data=b"hello")
    assert status == 405 and h["Allow"] == "GET, HEAD" and b"not allowed" in body
    _, h, _ = await get(http, cluster.url("l1-1", path + "?cc=no-store"))
    assert h["X-Origin-Hits"] == "1"


async def test_a_get_with_a_body_fills_without_its_body_framing(cluster, http):
    """A cache fill is a bodyless GET: the client's Content-Length must not go with it, or the
    upstream waits for a body that never comes (and every coalesced waiter times out)."""
    url = cluster.url("l1-1", unique() + "?cc=max-age=60&size=300")
    results = await asyncio.gather(*(get(http, url, data=b"hello", headers={"Expect": "100-continue"})
                                     for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert {h["X-Origin-Body-Length"] for _, h, _ in results} == {"0"}
    assert {h["X-Origin-Hits"] for _, h, _ in results} == {"1"}


async def test_if_modified_since_without_last_modified_uses_the_stored_date(cluster, http):
    """RFC 9111 4.3.2: no Last-Modified, so the stored Date is what If-Modified-Since is checked against."""
    url = cluster.url("l1-1", unique() + "?cc=max-age=60")
    _, h, _ = await get(http, url)
    assert "Last-Modified" not in h and "ETag" not in h
    status, h2, body = await get(http, url, headers={"If-Modified-Since": h["Date"]})
    assert (status, h2["X-Cache"], body) == (304, "HIT", b"")
    earlier = formatdate(parsedate_to_datetime(h["Date"]).timestamp() - 10, usegmt=True)
    status, _, body = await get(http, url, headers={"If-Modified-Since": earlier})
    assert status == 200 and body


@pytest.mark.parametrize(("status", "cc", "stored"), [
    (299, "max-age=60", True),                          # RFC 9111 3: unknown, but explicitly fresh
    (599, "max-age=60", True),
    (599, "max-age=60, must-understand", False),        # RFC 9111 5.2.2.3
    (299, "", False),                                   # unknown and no explicit freshness
])
async def test_unknown_status_codes_are_stored_only_with_explicit_freshness(cluster, http, status, cc, stored):
    url = cluster.url("l1-1", unique() + f"?status={status}&cc={quote(cc)}")
    first, h1, _ = await get(http, url)
    again, h2, _ = await get(http, url)
    assert (first, again) == (status, status)
    assert (h2["X-Cache"], h2["X-Origin-Hits"]) == (("HIT", "1") if stored else ("MISS", "2"))


async def test_via_and_forwarded_for_added(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=no-store")
    _, h, _ = await get(http, url, headers={"X-Forwarded-For": "192.0.2.7"})
    assert h["X-Origin-Via"] == "1.1 l1-1"
    assert h["X-Origin-XFF"] == "192.0.2.7, 127.0.0.1"  # the test client connects from 127.0.0.1


async def test_stale_while_revalidate_serves_stale_and_refreshes(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=0,stale-while-revalidate=60&etag=1")
    await get(http, url)
    _, h2, _ = await get(http, url)
    assert (h2["X-Cache"], h2["X-Origin-Hits"]) == ("UPDATING", "1")
    # The refresh ran in the background; poll until the origin has seen it.
    for _ in range(100):
        _, h, _ = await get(http, cluster.url("origin", url.split(":8080", 1)[1]), method="HEAD")
        if int(h["X-Origin-Hits"]) >= 3:    # the refresh, plus this HEAD
            break
        await asyncio.sleep(0.05)
    assert int(h["X-Origin-Hits"]) >= 3


async def test_unknown_host_refused_never_proxied(cluster, http):
    url = cluster.url("l1-1", unique())
    async with http.get(url, headers={"Host": "evil.example.org"}) as r:
        assert r.status == 421
        assert "X-Origin-Hits" not in r.headers


async def test_host_with_port_and_case_matches_site(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60")
    async with http.get(url, headers={"Host": "WWW.Example.COM:8080"}) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "MISS"


def test_malformed_request_gets_400(cluster):
    host, port = cluster.node("l1-1").traffic.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
        reply = s.recv(4096)
    assert reply.split(b" ", 2)[1] == b"400"
    for garbage in (b"GET /\xff\xfe HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: www.example.com\r\nHost: other.example\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(garbage)
            assert s.recv(4096).split(b" ", 2)[1] == b"400"
    # The node is still serving, and logged the client's mistakes in one line each.
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /gen/after-garbage HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    log = cluster.node("l1-1").log.read_text()
    assert "malformed request (400" in log and "Traceback" not in log


async def test_loop_detected_by_own_name_in_via(cluster, http):
    url = cluster.url("l1-1", unique())
    status, _, body = await get(http, url, headers={"Via": "1.1 someone, 1.1 l1-1"})
    assert status == 508 and b"loop" in body


async def test_metrics_count_by_cache_status(cluster, http):
    url = cluster.url("l1-1", unique() + "?cc=max-age=60")
    await get(http, url)
    await get(http, url)
    text = cluster.node("l1-1").metrics()
    assert samples(text, "edge_requests_total", site="example", cache_status="HIT", method="GET",
                   status_class="2xx")
    assert 'edge_cache_objects{tier="memory"}' in text
    assert "edge_upstream_response_seconds_bucket" in text
    assert "edge_request_duration_seconds_bucket" in text


def samples(text: str, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample `name` whose labels include `labels`, by its whole label set."""
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()}


def total(text: str, name: str, **labels: str) -> float:
    return sum(samples(text, name, **labels).values())


async def test_metrics_count_by_site_status_class_and_bytes_by_cache_status(cluster, http):
    """Exact deltas: one MISS and two hits (one through the front's hit path, one a HEAD) of a
    3000-byte object, a 503 from the origin, and a Host no site serves.  Nothing else runs on
    this node meanwhile (the module's tests run one after another)."""
    before = cluster.node("l1-1").metrics()
    url = cluster.url("l1-1", unique() + "?size=3000&cc=max-age=60")
    assert (await get(http, url))[1]["X-Cache"] == "MISS"
    assert (await get(http, url))[1]["X-Cache"] == "HIT"
    assert (await get(http, url, method="HEAD"))[1]["X-Cache"] == "HIT"
    assert (await get(http, cluster.url("l1-1", unique() + "?status=503&size=10")))[0] == 503
    assert (await get(http, url, headers={"Host": "not-ours.example.org"}))[0] == 421
    after = cluster.node("l1-1").metrics()

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    site = {"site": "example"}
    assert delta("edge_requests_total", **site, cache_status="MISS", status_class="2xx") == 1
    assert delta("edge_requests_total", **site, cache_status="HIT", method="GET", status_class="2xx") == 1
    assert delta("edge_requests_total", **site, cache_status="HIT", method="HEAD", status_class="2xx") == 1
    assert delta("edge_requests_total", **site, cache_status="MISS", status_class="5xx") == 1
    # The unknown Host is no site: its label is "", never the name the client sent.
    assert delta("edge_requests_total", site="", cache_status="REFUSED", status_class="4xx") == 1
    assert "not-ours" not in after
    assert delta("edge_requests_total") == 5
    assert delta("edge_response_body_bytes_total", **site, cache_status="MISS") == 3000 + 10   # and the 503
    assert delta("edge_response_body_bytes_total", **site, cache_status="HIT") == 3000    # the HEAD sent none
    assert {dict(k)["site"] for k in samples(after, "edge_requests_total")} <= {"example", ""}


@pytest.mark.parametrize("node", ["l1-1", "origin"])
async def test_build_info_and_process_metrics(cluster, node):
    from edge import __version__
    text = cluster.node(node).metrics()
    assert samples(text, "edge_build_info") == {(("version", __version__),): 1.0}
    assert total(text, "process_resident_memory_bytes") > 1e6
    assert total(text, "process_cpu_seconds_total") > 0
    assert total(text, "process_open_fds") > 0


async def test_purge_needs_token(cluster, http):
    path = unique() + "?cc=max-age=60"
    url = cluster.url("l1-1", path)
    await get(http, url)
    admin = f"http://{cluster.node('l1-1').admin}/purge"
    target = f"http://www.example.com{path}"
    async with http.post(admin, params={"url": target}) as r:
        assert r.status == 401
    async with http.post(admin, params={"url": target}, headers={"Authorization": "Bearer test-token"}) as r:
        assert r.status == 200
    _, h, _ = await get(http, url)
    assert h["X-Cache"] == "MISS"


@pytest.mark.parametrize("how", ["purge", "unsafe-method"])
async def test_purging_or_invalidating_a_vary_url_drops_every_variant(cluster, http, how):
    path = unique() + "?cc=max-age=60&vary=Accept-Language"
    url = cluster.url("l1-1", path)
    for language in ("en", "fr"):
        await get(http, url, headers={"Accept-Language": language})
        _, h, _ = await get(http, url, headers={"Accept-Language": language})
        assert h["X-Cache"] == "HIT"
    if how == "purge":
        async with http.post(f"http://{cluster.node('l1-1').admin}/purge",
                             params={"url": f"http://www.example.com{path}"},
                             headers={"Authorization": "Bearer test-token"}) as r:
            assert r.status == 200
    else:
        status, _, _ = await get(http, url, method="POST", data=b"x")
        assert status == 200
    for language in ("en", "fr"):                 # a new fill of one variant must not revive the others
        _, h, _ = await get(http, url, headers={"Accept-Language": language})
        assert h["X-Cache"] == "MISS", (language, h["Cache-Status"])
        _, h, _ = await get(http, url, headers={"Accept-Language": language})
        assert h["X-Cache"] == "HIT"


@pytest.mark.parametrize("node", ["l1-1", "origin"])
async def test_metrics_pass_promtool(cluster, http, node):
    await get(http, cluster.url("l1-1", unique() + "?cc=max-age=60"))
    text = cluster.node(node).metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_extension_method_then_get_on_one_connection(cluster):
    """The connection that forwarded an extension method keeps serving ordinary requests."""
    host, port = cluster.node("l1-1").traffic.split(":")
    conn = httplib.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("MKCOL", "/gen/coffee", body=b"abc", headers=HOST)
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/gen/tea?cc=no-store", headers=HOST)
        second = conn.getresponse()
        second.read()
        assert conn.sock is sock, "the connection was not kept alive"
    finally:
        conn.close()
    assert (first.status, first.headers["X-Origin-Method"]) == (200, "MKCOL")
    assert (second.status, second.headers["X-Origin-Method"]) == (200, "GET")


async def test_extension_methods_share_one_metric_label(cluster, http):
    for method in ("PROPFIND", "M-SEARCH", "UNLOCK"):
        await get(http, cluster.url("l1-1", unique()), method=method)
    text = cluster.node("l1-1").metrics()
    assert samples(text, "edge_requests_total", cache_status="BYPASS", method="OTHER")
    assert 'method="PROPFIND"' not in text


async def test_range_served_from_a_memory_hit(cluster, http):
    url = cluster.url("l1-1", unique() + "?size=10000&cc=max-age=60&etag=1")
    _, h, full = await get(http, url)
    status, h2, part = await get(http, url, headers={"Range": "bytes=100-199"})
    assert (status, h2["X-Cache"], h2["Content-Range"], part) == (206, "HIT", "bytes 100-199/10000", full[100:200])
    status, h3, tail = await get(http, url, headers={"Range": "bytes=-10", "If-Range": h["ETag"]})
    assert (status, tail) == (206, full[-10:])
    status, h4, _ = await get(http, url, headers={"Range": "bytes=20000-"})
    assert (status, h4["Content-Range"]) == (416, "bytes */10000")
    status, _, whole = await get(http, url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert (status, whole) == (200, full)


async def test_range_on_a_streaming_miss_then_from_disk(cluster, http):
    size = 3 * 2**20          # above memory_object_max and stream_threshold: streamed, kept on disk
    url = cluster.url("l1-1", unique() + f"?size={size}&cc=max-age=60")
    status, h, part = await get(http, url, headers={"Range": "bytes=1048000-1048999"})
    assert (status, h["X-Cache"], h["Content-Range"], len(part)) == (206, "MISS", f"bytes 1048000-1048999/{size}", 1000)
    # The fill went on to store the whole object: a full GET is a hit from disk.
    _, h2, full = await get(http, url)
    assert (h2["X-Cache"], len(full), h2["X-Origin-Hits"]) == ("HIT", size, "1")
    assert part == full[1048000:1049000]
    status, h3, part2 = await get(http, url, headers={"Range": "bytes=2097152-2097251"})
    assert (status, h3["X-Cache"], part2) == (206, "HIT", full[2097152:2097252])


async def test_unsafe_method_invalidates_same_host_location_only(cluster, http):
    target = unique("created") + "?cc=max-age=60"
    await get(http, cluster.url("l1-1", target))
    _, h, _ = await get(http, cluster.url("l1-1", target))
    assert h["X-Cache"] == "HIT"
    post = cluster.url("l1-1", unique("collection") + "?status=201&location=" + quote(target, safe=""))
    # A Location on another host invalidates nothing (RFC 9111 4.4).
    elsewhere = cluster.url("l1-1", unique("collection") + "?status=201&location="
                            + quote("http://other.example.org" + target, safe=""))
    status, _, _ = await get(http, elsewhere, method="POST", data=b"{}")
    assert status == 201
    _, h, _ = await get(http, cluster.url("l1-1", target))
    assert h["X-Cache"] == "HIT"
    status, hp, _ = await get(http, post, method="POST", data=b"{}")
    assert (status, hp["Location"]) == (201, target)
    _, h, _ = await get(http, cluster.url("l1-1", target))
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2")


async def test_admin_endpoints_are_not_on_the_traffic_port(cluster, http):
    node = cluster.node("l1-1")
    async with http.get(f"http://{node.traffic}/metrics") as r:
        assert r.status == 421          # no site Host: refused, never the node's own metrics
    async with http.post(f"http://{node.traffic}/purge", params={"url": "http://www.example.com/"},
                         headers={"Authorization": "Bearer test-token"}) as r:
        assert r.status == 421
    async with http.get(f"http://{node.admin}/healthz") as r:
        assert r.status == 200 and (await r.json())["node"] == "l1-1"
