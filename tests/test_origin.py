"""The origin: content directory, /gen/ synthetic objects, counting and metrics.

Pure decisions (ranges, preconditions, path checks, parameters) are tested
with tables; everything else over real HTTP on loopback (aiohttp test server
on port 0, the aiohttp client, raw sockets and curl).  Expected bodies are
rebuilt here with a naive one-line-at-a-time formula, independent of the
origin's block-at-a-time generator.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import itertools
import os
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import yarl
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from origin.app import OriginMetrics, PathRejected, make_app, url_path_segments
from origin.conditional import (
    ByteRange,
    RangeOutcome,
    evaluate_preconditions,
    select_range,
)
from origin.synthetic import (
    FIXED_LAST_MODIFIED,
    BadParameter,
    parse_gen_query,
    synthetic_body,
    vary_preamble,
)

CACHE_CONTROL = "public, max-age=60"
SECRET = b"TOP-SECRET-OUTSIDE-THE-CONTENT-DIR"
INDEX = b"<!doctype html><title>home</title>hello from the index\n"
STYLE = b"body { color: black; }\n" * 40          # 920 bytes
LM_2023 = 1700000000                               # Tue, 14 Nov 2023 22:13:20 GMT


def naive_tag(path: str, preamble: bytes = b"") -> bytes:
    return hashlib.sha256(path.encode() + b"\0" + preamble).hexdigest()[:46].encode()


def naive_body(path: str, start: int, end: int, preamble: bytes = b"") -> bytes:
    """What /gen/ must send for bytes start..end-1: preamble over 64-byte numbered lines."""
    if end <= start:
        return b""
    tag = naive_tag(path, preamble)
    first_line, last_line = start // 64, (end - 1) // 64
    lines = b"".join(tag + b" " + b"%016x" % n + b"\n" for n in range(first_line, last_line + 1))
    body = bytearray(lines[start - first_line * 64:end - first_line * 64])
    overlap = preamble[start:end]
    body[:len(overlap)] = overlap
    return bytes(body)


# ---------------------------------------------------------------- pure logic

@pytest.mark.parametrize("header, if_range, length, expected", [
    ("bytes=0-99", None, 1000, ByteRange(0, 99)),
    ("bytes=100-", None, 1000, ByteRange(100, 999)),
    ("bytes=-100", None, 1000, ByteRange(900, 999)),
    ("bytes=-5000", None, 1000, ByteRange(0, 999)),
    ("bytes=990-2000", None, 1000, ByteRange(990, 999)),
    ("BYTES = 5-5", None, 1000, ByteRange(5, 5)),
    ("bytes=1000-", None, 1000, RangeOutcome.UNSATISFIABLE),
    ("bytes=1000-1001", None, 1000, RangeOutcome.UNSATISFIABLE),
    ("bytes=-0", None, 1000, RangeOutcome.UNSATISFIABLE),
    ("bytes=0-", None, 0, RangeOutcome.UNSATISFIABLE),
    ("bytes=-10", None, 0, RangeOutcome.FULL),
    ("bytes=0-1,5-9", None, 1000, RangeOutcome.FULL),          # multiple ranges: whole body
    ("bytes=2000-,3000-", None, 1000, RangeOutcome.UNSATISFIABLE),
    ("bytes=9-5", None, 1000, RangeOutcome.FULL),              # invalid: ignored
    ("bytes=abc", None, 1000, RangeOutcome.FULL),
    ("bytes=-", None, 1000, RangeOutcome.FULL),
    ("items=0-5", None, 1000, RangeOutcome.FULL),
    ("bytes=0-" + "9" * 5000, None, 1000, RangeOutcome.FULL),  # absurd digits: ignored, no crash
    ("bytes=0-9", '"v1"', 1000, ByteRange(0, 9)),
    ("bytes=0-9", '"v2"', 1000, RangeOutcome.FULL),
    ("bytes=0-9", 'W/"v1"', 1000, RangeOutcome.FULL),          # If-Range needs strong comparison
    ("bytes=0-9", "Tue, 14 Nov 2023 22:13:20 GMT", 1000, ByteRange(0, 9)),
    ("bytes=0-9", "Tue, 14 Nov 2023 22:13:21 GMT", 1000, RangeOutcome.FULL),
    ("bytes=0-9", "not a date", 1000, RangeOutcome.FULL),
])
def test_select_range(header, if_range, length, expected):
    assert select_range("GET", header, if_range, length, '"v1"', LM_2023) == expected


def test_select_range_only_for_get():
    assert select_range("HEAD", "bytes=0-9", None, 100, None, None) is RangeOutcome.FULL
    assert select_range("POST", "bytes=0-9", None, 100, None, None) is RangeOutcome.FULL
    assert select_range("GET", None, None, 100, None, None) is RangeOutcome.FULL


LM_HTTP = "Tue, 14 Nov 2023 22:13:20 GMT"
EARLIER = "Tue, 14 Nov 2023 22:13:19 GMT"


@pytest.mark.parametrize("method, conditions, expected", [
    ("GET", {}, None),
    ("GET", {"if_none_match": '"v1"'}, 304),
    ("GET", {"if_none_match": 'W/"v1"'}, 304),                 # weak comparison
    ("GET", {"if_none_match": '"a", "v1"'}, 304),
    ("GET", {"if_none_match": "*"}, 304),
    ("HEAD", {"if_none_match": '"v1"'}, 304),
    ("GET", {"if_none_match": '"v2"'}, None),
    ("GET", {"if_none_match": "v1"}, None),                    # not an entity-tag
    ("POST", {"if_none_match": '"v1"'}, 412),
    ("PUT", {"if_none_match": "*"}, 412),
    ("GET", {"if_modified_since": LM_HTTP}, 304),
    ("GET", {"if_modified_since": "Wed, 15 Nov 2023 00:00:00 GMT"}, 304),
    ("GET", {"if_modified_since": EARLIER}, None),
    ("GET", {"if_modified_since": "garbage"}, None),
    ("POST", {"if_modified_since": LM_HTTP}, None),             # IMS is for GET and HEAD only
    ("GET", {"if_none_match": '"v2"', "if_modified_since": LM_HTTP}, None),  # INM wins over IMS
    ("GET", {"if_match": '"v1"'}, None),
    ("GET", {"if_match": 'W/"v1"'}, 412),                      # If-Match: strong comparison
    ("GET", {"if_match": '"v2"'}, 412),
    ("PUT", {"if_match": "*"}, None),
    ("PUT", {"if_unmodified_since": EARLIER}, 412),
    ("PUT", {"if_unmodified_since": LM_HTTP}, None),
    ("PUT", {"if_match": '"v1"', "if_unmodified_since": EARLIER}, None),  # If-Match wins
])
def test_evaluate_preconditions(method, conditions, expected):
    assert evaluate_preconditions(method, etag='"v1"', last_modified=LM_2023, **conditions) == expected


def test_preconditions_without_validators():
    assert evaluate_preconditions("GET", etag=None, last_modified=None, if_none_match='"x"') is None
    assert evaluate_preconditions("GET", etag=None, last_modified=None, if_modified_since=LM_HTTP) is None
    assert evaluate_preconditions("GET", etag=None, last_modified=None, if_none_match="*") == 304


@pytest.mark.parametrize("raw, expected", [
    ("/", []),
    ("/a/b.html", ["a", "b.html"]),
    ("//a///b", ["a", "b"]),
    ("/caf%C3%A9.txt", ["café.txt"]),
    ("/%252e%252e", ["%2e%2e"]),                # double-encoded: a literal name, not a dot-segment
    ("/..", 400), ("/a/../b", 400), ("/%2e%2e/x", 400), ("/%2E%2e/x", 400), ("/./a", 400),
    ("/..%2fetc", 400), ("/%2fetc%2fpasswd", 400), ("/a%5c..%5cb", 400), ("/a%00.txt", 400),
    ("/%ff", 400), ("relative", 400),
    ("/.git/config", 404), ("/.env", 404),
])
def test_url_path_segments(raw, expected):
    if isinstance(expected, int):
        with pytest.raises(PathRejected) as caught:
            url_path_segments(raw)
        assert caught.value.status == expected
    else:
        assert url_path_segments(raw) == expected


@pytest.mark.parametrize("query, field", [
    ({"size": "abc"}, "size"), ({"size": "-1"}, "size"), ({"size": "1.5"}, "size"),
    ({"size": str(2**41)}, "size"), ({"status": "99"}, "status"), ({"status": "600"}, "status"),
    ({"status": "ok"}, "status"), ({"status": "150"}, "status"), ({"delay": "soon"}, "delay"),
    ({"delay": "-1"}, "delay"), ({"delay": "nan"}, "delay"), ({"expires": "later"}, "expires"),
    ({"etag": 'a"b'}, "etag"), ({"etag": ""}, "etag"), ({"lm": "yesterday"}, "lm"),
    ({"lm": "-5"}, "lm"), ({"vary": "a b"}, "vary"), ({"vary": ""}, "vary"),
    ({"cc": "max-age=1\r\nSet-Cookie: a=b"}, "cc"), ({"cdncc": "x\ny"}, "cdncc"),
    ({"age": "-3"}, "age"), ({"tags": "a b"}, "tags"), ({"tags": "a,,b"}, "tags"), ({"tags": ""}, "tags"),
    ({"cachetag": "caf\u00e9"}, "cachetag"), ({"tags": "x" * 1025}, "tags"),
])
def test_parse_gen_query_rejects(query, field):
    with pytest.raises(BadParameter) as caught:
        parse_gen_query(query)
    assert str(caught.value).startswith(f"{field}:")


def test_parse_gen_query_values():
    spec = parse_gen_query({"size": "10", "status": "404", "cc": "max-age=5", "cdncc": "max-age=9",
                            "expires": "-30", "etag": "1", "lm": "1", "vary": "Accept-Encoding, *",
                            "delay": "250", "age": "7", "other": "ignored"})
    assert (spec.size, spec.status, spec.cache_control, spec.cdn_cache_control) == (10, 404, "max-age=5", "max-age=9")
    assert (spec.expires, spec.etag, spec.last_modified, spec.age) == (-30, "derive", FIXED_LAST_MODIFIED, 7)
    assert (spec.vary, spec.vary_fields, spec.delay) == ("Accept-Encoding, *", ("accept-encoding",), 0.25)
    assert parse_gen_query({}).size == 1024 and parse_gen_query({}).cache_control is None
    assert parse_gen_query({"etag": "v1"}).etag == '"v1"'
    assert parse_gen_query({"etag": 'W/"v1"'}).etag == 'W/"v1"'
    assert parse_gen_query({"lm": str(LM_2023)}).last_modified == LM_2023


@pytest.mark.parametrize("start, end", [
    (0, 0), (0, 1), (0, 64), (3, 130), (262_100, 262_300), (262_144, 524_288),
    (100, 600_000), (5 * 2**30 - 77, 5 * 2**30),
])
def test_synthetic_body_matches_naive_lines(start, end):
    tag = naive_tag("/gen/t")
    assert b"".join(synthetic_body(tag, start, end)) == naive_body("/gen/t", start, end)


def test_synthetic_body_with_preamble_keeps_offsets():
    preamble = b"accept-encoding: gzip\n"
    tag = naive_tag("/gen/v", preamble)
    for start, end in [(0, 10), (0, 200), (5, 30), (22, 90), (40, 300_000)]:
        got = b"".join(synthetic_body(tag, start, end, preamble))
        assert got == naive_body("/gen/v", start, end, preamble)


@pytest.mark.parametrize("headers, expected", [
    ([("Accept-Encoding", "gzip")], b"accept-encoding: gzip\naccept-language (absent)\n"),
    ([("Accept-Encoding", "")], b"accept-encoding: \naccept-language (absent)\n"),
    ([("Accept-Language", "fr"), ("accept-language", "de")], b"accept-encoding (absent)\naccept-language: fr, de\n"),
])
def test_vary_preamble_names_each_value(headers, expected):
    assert vary_preamble(("accept-encoding", "accept-language"), CIMultiDict(headers)) == expected


def test_synthetic_body_is_generated_lazily_in_bounded_chunks():
    chunks = synthetic_body(naive_tag("/gen/huge"), 0, 8 * 2**30)   # 8 GiB: must not be built
    first = list(itertools.islice(chunks, 3))
    assert [len(c) for c in first] == [262_144] * 3
    assert first[1][:46] == naive_tag("/gen/huge") and first[1][47:63] == b"%016x" % 4096


def test_metrics_cap_path_labels():
    registry = CollectorRegistry()
    metrics = OriginMetrics(registry, max_path_labels=3)
    for path in ["/a", "/b", "/c", "/d", "/e", "/a", "/d"]:
        metrics.observe("GET", 200, path)
    metrics.observe("FROB", 400, "/a")
    samples = _samples(registry)
    paths = {labels["path"]: value for name, labels, value in samples if name == "origin_path_requests_total"}
    assert paths == {"/a": 3.0, "/b": 1.0, "/c": 1.0, "other": 3.0}
    assert ("origin_requests_total", {"method": "other", "status": "400"}, 1.0) in samples


# ---------------------------------------------------------------- fixtures

@dataclass
class Site:
    root: Path
    secret: Path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "style.css").write_bytes(STYLE)
    (root / "data.json").write_bytes(b'{"a": 1}\n')
    (root / "LICENSE").write_bytes(b"plain words\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "backup.tar.gz").write_bytes(b"\x1f\x8b not really")
    os.mkfifo(root / "pipe.txt")                    # opening it must not hang the origin
    (root / "sub" / "index.html").write_bytes(b"<p>sub index</p>\n")
    (root / "sub" / "page.html").write_bytes(b"<p>sub page</p>\n")
    (root / ".env").write_bytes(SECRET)
    os.utime(root / "style.css", (LM_2023, LM_2023))
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    (root / "link-out").symlink_to(secret)
    (root / "link-dir").symlink_to(tmp_path)
    (root / "link-in").symlink_to(root / "style.css")
    return Site(root, secret)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(aiohttp_client, site, registry):
    return await aiohttp_client(make_app(site.root, CACHE_CONTROL, registry))


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict, float]]:
    text = generate_latest(registry).decode()
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


async def raw_request(host: str, port: int, target: str, method: str = "GET") -> bytes:
    """One HTTP/1.1 request written byte for byte, so no client can normalise the target."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


# ---------------------------------------------------------------- content directory

async def test_file_has_validators_cache_control_and_type(client):
    resp = await client.get("/style.css")
    assert resp.status == 200
    assert await resp.read() == STYLE
    assert resp.headers["Cache-Control"] == CACHE_CONTROL
    assert resp.headers["Last-Modified"] == LM_HTTP
    etag = resp.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert resp.headers["Content-Type"] == "text/css; charset=utf-8"
    assert resp.headers["Content-Length"] == str(len(STYLE))
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Server"] == "edge-origin"
    assert (await client.get("/style.css")).headers["ETag"] == etag     # stable


async def test_content_types(client):
    expected = {"/": "text/html; charset=utf-8", "/data.json": "application/json; charset=utf-8",
                "/LICENSE": "application/octet-stream", "/empty.txt": "text/plain; charset=utf-8",
                "/backup.tar.gz": "application/gzip"}
    for path, content_type in expected.items():
        resp = await client.get(path)
        assert (resp.status, resp.headers["Content-Type"]) == (200, content_type), path


async def test_etag_changes_when_file_changes(client, site):
    before = (await client.get("/data.json")).headers["ETag"]
    (site.root / "data.json").write_bytes(b'{"a": 2, "b": 3}\n')
    resp = await client.get("/data.json")
    assert resp.headers["ETag"] != before and await resp.read() == b'{"a": 2, "b": 3}\n'


async def test_file_if_none_match_gives_304(client):
    etag = (await client.get("/style.css")).headers["ETag"]
    for header in (etag, "W/" + etag, f'"nope", {etag}', "*"):
        resp = await client.get("/style.css", headers={"If-None-Match": header})
        assert resp.status == 304, header
        assert await resp.read() == b""
        assert resp.headers["ETag"] == etag and resp.headers["Cache-Control"] == CACHE_CONTROL
    resp = await client.get("/style.css", headers={"If-None-Match": '"other"'})
    assert resp.status == 200 and await resp.read() == STYLE


async def test_file_if_modified_since(client):
    resp = await client.get("/style.css", headers={"If-Modified-Since": LM_HTTP})
    assert resp.status == 304 and resp.headers["Last-Modified"] == LM_HTTP
    resp = await client.get("/style.css", headers={"If-Modified-Since": EARLIER})
    assert resp.status == 200 and await resp.read() == STYLE
    # If-None-Match present: If-Modified-Since is not looked at (RFC 9110 13.1.3).
    resp = await client.get("/style.css", headers={"If-None-Match": '"other"', "If-Modified-Since": LM_HTTP})
    assert resp.status == 200


async def test_file_ranges(client):
    cases = {"bytes=0-9": (0, 9), "bytes=900-": (900, 919), "bytes=-20": (900, 919), "bytes=915-5000": (915, 919)}
    for header, (first, last) in cases.items():
        resp = await client.get("/style.css", headers={"Range": header})
        assert resp.status == 206, header
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{len(STYLE)}"
        assert await resp.read() == STYLE[first:last + 1]
        assert resp.headers["Content-Length"] == str(last - first + 1)
        assert resp.headers["Cache-Control"] == CACHE_CONTROL


async def test_file_unsatisfiable_and_multiple_ranges(client):
    resp = await client.get("/style.css", headers={"Range": "bytes=920-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(STYLE)}"
    resp = await client.get("/empty.txt", headers={"Range": "bytes=0-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == "bytes */0"
    resp = await client.get("/style.css", headers={"Range": "bytes=0-1,5-6"})
    assert resp.status == 200 and await resp.read() == STYLE


async def test_file_if_range(client):
    etag = (await client.get("/style.css")).headers["ETag"]
    resp = await client.get("/style.css", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert resp.status == 206 and await resp.read() == STYLE[:4]
    resp = await client.get("/style.css", headers={"Range": "bytes=0-3", "If-Range": LM_HTTP})
    assert resp.status == 206
    resp = await client.get("/style.css", headers={"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert resp.status == 200 and await resp.read() == STYLE


async def test_file_head(client):
    resp = await client.head("/style.css")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(STYLE))
    assert "ETag" in resp.headers and resp.headers["Cache-Control"] == CACHE_CONTROL
    assert await resp.read() == b""


async def test_directories_serve_index(client):
    resp = await client.get("/")
    assert resp.status == 200 and await resp.read() == INDEX
    resp = await client.get("/sub/")
    assert resp.status == 200 and await resp.read() == b"<p>sub index</p>\n"
    resp = await client.get("/sub?x=1", allow_redirects=False)
    assert resp.status == 301 and resp.headers["Location"] == "/sub/?x=1"
    assert (await client.get("/sub/page.html")).status == 200
    assert (await client.get("/missing.html")).status == 404
    assert (await client.get("/pipe.txt")).status == 404
    assert (await client.post("/index.html")).status == 405


async def test_symlink_inside_is_served(client):
    resp = await client.get("/link-in")
    assert resp.status == 200 and await resp.read() == STYLE


TRAVERSALS = [
    "/../secret.txt", "/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt",
    "/..%2fsecret.txt", "/sub/..%2f..%2fsecret.txt", "/sub/../../secret.txt", "/..%5csecret.txt",
    "/link-out", "/link-dir/secret.txt", "/index.html%00", "/.env", "/%2e%65nv",
    "/%252e%252e/secret.txt",
]


async def test_traversal_via_client_never_leaks(client, site):
    absolute = [urllib.parse.quote(str(site.secret), safe=""), "/" + str(site.secret)]   # %2F... and //tmp/...
    for target in TRAVERSALS + ["/" + a for a in absolute]:
        url = yarl.URL(f"http://{client.server.host}:{client.server.port}{target}", encoded=True)
        resp = await client.session.get(url)
        body = await resp.read()
        assert resp.status in (400, 404), target
        assert SECRET not in body, target


async def test_traversal_via_raw_socket_never_leaks(client, site):
    targets = TRAVERSALS + ["/%2F" + urllib.parse.quote(str(site.secret)[1:], safe=""),
                            "//" + str(site.secret).lstrip("/"), "/index.html\\..\\..\\secret.txt"]
    for target in targets:
        answer = await raw_request(client.server.host, client.server.port, target)
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 404), (target, answer[:200])
        assert SECRET not in answer, target


async def test_traversal_via_curl_path_as_is(client):
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    base = f"http://{client.server.host}:{client.server.port}"
    for target in ("/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt"):
        proc = await asyncio.create_subprocess_exec(
            curl, "-s", "--path-as-is", "-w", "\n%{http_code}", base + target,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert out.rsplit(b"\n", 1)[1] in (b"400", b"404"), target
        assert SECRET not in out


async def test_demo_site_by_default(aiohttp_client, registry):
    client = await aiohttp_client(make_app(None, "public, max-age=30", registry))
    for path, content_type in (("/", "text/html"), ("/style.css", "text/css"), ("/app.js", "javascript")):
        resp = await client.get(path)
        assert resp.status == 200 and content_type in resp.headers["Content-Type"], path
        assert resp.headers["Cache-Control"] == "public, max-age=30"
        assert len(await resp.read()) > 100


def test_missing_content_dir_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        make_app(tmp_path / "nope", CACHE_CONTROL, CollectorRegistry())


# ---------------------------------------------------------------- /gen/

async def test_gen_sizes_are_exact_and_deterministic(client):
    for size in (0, 1, 63, 64, 65, 1000, 262_143, 262_144, 262_145, 2**20, 2**20 + 1, 3 * 2**20 + 7):
        resp = await client.get(f"/gen/sizes/obj.bin?size={size}")
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert body == naive_body("/gen/sizes/obj.bin", 0, size), size
    resp = await client.get("/gen/default")
    assert len(await resp.read()) == 1024
    other = await (await client.get("/gen/other")).read()
    assert other != await (await client.get("/gen/default")).read()     # content depends on the path


async def test_gen_large_body_streams(client):
    size = 50 * 2**20
    digests = []
    for _ in range(2):
        resp = await client.get(f"/gen/large.bin?size={size}")
        assert resp.headers["Content-Length"] == str(size)
        digest, received, chunks = hashlib.sha256(), 0, 0
        async for chunk in resp.content.iter_chunked(2**20):
            digest.update(chunk)
            received += len(chunk)
            chunks += 1
        assert received == size and chunks >= 50
        digests.append(digest.hexdigest())
    assert digests[0] == digests[1]
    assert digests[0] == hashlib.sha256(naive_body("/gen/large.bin", 0, size)).hexdigest()


async def test_gen_huge_body_starts_at_once(client):
    size = 6 * 2**30                       # 6 GiB: only streaming can answer this
    resp = await client.get(f"/gen/huge.bin?size={size}")
    assert resp.headers["Content-Length"] == str(size)
    head = await resp.content.readexactly(2**20)
    assert head == naive_body("/gen/huge.bin", 0, 2**20)
    resp.close()
    resp = await client.get(f"/gen/huge.bin?size={size}", headers={"Range": f"bytes={size - 100}-"})
    assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert await resp.read() == naive_body("/gen/huge.bin", size - 100, size)


async def test_gen_cache_control_and_friends(client):
    resp = await client.get("/gen/cc?cc=public,%20max-age=30&cdncc=max-age=600")
    assert resp.headers["Cache-Control"] == "public, max-age=30"
    assert resp.headers["CDN-Cache-Control"] == "max-age=600"
    resp = await client.get("/gen/nocc")
    assert "Cache-Control" not in resp.headers and "CDN-Cache-Control" not in resp.headers
    assert "ETag" not in resp.headers and "Last-Modified" not in resp.headers and "Expires" not in resp.headers
    assert (await client.get("/gen/age?age=42")).headers["Age"] == "42"


async def test_gen_tags_as_surrogate_key_and_cache_tag(client):
    resp = await client.get("/gen/tagged?tags=product-42,%20cat-7&cachetag=a,b")
    assert resp.headers["Surrogate-Key"] == "product-42 cat-7"
    assert resp.headers["Cache-Tag"] == "a,b"
    resp = await client.get("/gen/untagged")
    assert "Surrogate-Key" not in resp.headers and "Cache-Tag" not in resp.headers


async def test_gen_expires(client):
    for offset in (120, -120, 0):
        resp = await client.get(f"/gen/expires?expires={offset}")
        date = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp()
        expires = email.utils.parsedate_to_datetime(resp.headers["Expires"]).timestamp()
        assert abs(expires - date - offset) <= 1, offset


async def test_gen_etag_and_last_modified(client):
    first = (await client.get("/gen/e?size=10&etag=1")).headers["ETag"]
    assert first.startswith('"') and len(first) > 10
    assert (await client.get("/gen/e?size=10&etag=1")).headers["ETag"] == first
    assert (await client.get("/gen/e?size=11&etag=1")).headers["ETag"] != first
    assert (await client.get("/gen/f?size=10&etag=1")).headers["ETag"] != first
    assert (await client.get("/gen/e?etag=v7")).headers["ETag"] == '"v7"'
    assert (await client.get('/gen/e?etag=W/%22v7%22')).headers["ETag"] == 'W/"v7"'
    assert (await client.get("/gen/e?lm=1")).headers["Last-Modified"] == "Thu, 01 Jan 2026 00:00:00 GMT"
    assert (await client.get(f"/gen/e?lm={LM_2023}")).headers["Last-Modified"] == LM_HTTP


async def test_gen_conditional_requests(client):
    url = "/gen/cond?size=100&etag=1&lm=1&cc=max-age=5"
    etag = (await client.get(url)).headers["ETag"]
    for headers in ({"If-None-Match": etag}, {"If-None-Match": "W/" + etag},
                    {"If-Modified-Since": "Thu, 01 Jan 2026 00:00:00 GMT"}):
        resp = await client.get(url, headers=headers)
        assert resp.status == 304, headers
        assert await resp.read() == b""
        assert resp.headers["ETag"] == etag and resp.headers["Cache-Control"] == "max-age=5"
        assert resp.headers["X-Origin-Conditional"] == "1"
    resp = await client.get(url, headers={"If-Modified-Since": "Wed, 31 Dec 2025 23:59:59 GMT"})
    assert resp.status == 200 and len(await resp.read()) == 100
    resp = await client.get(url, headers={"If-None-Match": '"old"'})
    assert resp.status == 200 and resp.headers["X-Origin-Conditional"] == "1"
    assert (await client.get(url)).headers["X-Origin-Conditional"] == "0"
    # An error status is never turned into a 304 (RFC 9110 13.2.1).
    resp = await client.get(url + "&status=404", headers={"If-None-Match": etag})
    assert resp.status == 404


async def test_gen_range(client):
    resp = await client.get("/gen/r?size=1000&etag=1", headers={"Range": "bytes=100-199"})
    assert resp.status == 206 and resp.headers["Content-Range"] == "bytes 100-199/1000"
    assert await resp.read() == naive_body("/gen/r", 100, 200)
    resp = await client.get("/gen/r?size=1000", headers={"Range": "bytes=1000-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == "bytes */1000"


async def test_gen_vary_makes_variants(client):
    url = "/gen/v?size=300&vary=Accept-Encoding"
    gzip = await client.get(url, headers={"Accept-Encoding": "gzip"})
    gzip_body = await gzip.read()
    br_body = await (await client.get(url, headers={"Accept-Encoding": "br"})).read()
    again = await (await client.get(url, headers={"Accept-Encoding": "gzip"})).read()
    assert gzip.headers["Vary"] == "Accept-Encoding"
    assert len(gzip_body) == len(br_body) == 300
    assert b"accept-encoding: gzip" in gzip_body and b"accept-encoding: br" in br_body
    assert gzip_body == again and gzip_body != br_body
    preamble = b"accept-encoding: gzip\n"
    assert gzip_body == naive_body("/gen/v", 0, 300, preamble)


async def test_gen_status(client):
    resp = await client.get("/gen/s?status=404&size=10")
    assert resp.status == 404 and len(await resp.read()) == 10
    assert (await client.get("/gen/s?status=503")).status == 503
    resp = await client.get("/gen/s?status=301&size=5", allow_redirects=False)
    assert resp.status == 301 and resp.headers["Location"] == "/gen/s?size=5"
    resp = await client.get("/gen/s?status=302&location=/elsewhere", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/elsewhere"
    resp = await client.get("/gen/s?status=204")
    assert resp.status == 204 and await resp.read() == b"" and "Content-Length" not in resp.headers


async def test_gen_delay(client):
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.get("/gen/slow?delay=250")
    assert resp.status == 200
    assert loop.time() - started >= 0.25


async def test_gen_head(client):
    resp = await client.head("/gen/h?size=12345&cc=max-age=1")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "12345" and resp.headers["Cache-Control"] == "max-age=1"
    assert await resp.read() == b""
    assert resp.headers["X-Origin-Method"] == "HEAD"


async def test_gen_answers_any_method(client):
    body = b"x" * 300_000
    for method in ("POST", "PUT", "PATCH", "DELETE", "PURGE", "OPTIONS"):
        resp = await client.request(method, "/gen/m?size=7", data=body)
        assert resp.status == 200, method
        assert resp.headers["X-Origin-Method"] == method
        assert resp.headers["X-Origin-Body-Length"] == str(len(body))
        assert len(await resp.read()) == 7
    answer = await raw_request(client.server.host, client.server.port, "/gen/m", method="PROPFIND")
    assert answer.startswith(b"HTTP/1.1 200") and b"X-Origin-Method: PROPFIND" in answer
    resp = await client.get("/gen/m")
    assert resp.headers["X-Origin-Body-Length"] == "0"


async def test_gen_echoes_request_facts(client):
    resp = await client.get("/gen/echo", headers={"Via": "1.1 l1-east (edge)", "X-Forwarded-For": "203.0.113.7"})
    assert resp.headers["X-Origin-Via"] == "1.1 l1-east (edge)"
    assert resp.headers["X-Origin-XFF"] == "203.0.113.7"
    resp = await client.get("/gen/echo")
    assert "X-Origin-Via" not in resp.headers and "X-Origin-XFF" not in resp.headers


@pytest.mark.parametrize("query, field", [
    ("size=abc", "size"), ("size=-1", "size"), ("status=99", "status"), ("delay=x", "delay"),
    ("etag=a%22b", "etag"), ("lm=later", "lm"), ("expires=x", "expires"), ("vary=a%20b", "vary"),
    ("cc=a%0d%0aSet-Cookie:%20x=1", "cc"),
])
async def test_gen_bad_parameters_are_400(client, query, field):
    resp = await client.get(f"/gen/bad?{query}")
    text = await resp.text()
    assert resp.status == 400
    assert text.startswith(f"bad parameter: {field}:"), text
    assert "Traceback" not in text and "Set-Cookie" not in resp.headers


# ---------------------------------------------------------------- counting and metrics

async def test_hits_are_counted_per_url(client):
    seen = [int((await client.get("/gen/h?size=1")).headers["X-Origin-Hits"]) for _ in range(3)]
    assert seen == [1, 2, 3]
    assert (await client.get("/gen/h?size=2")).headers["X-Origin-Hits"] == "1"
    assert (await client.get("/gen/h")).headers["X-Origin-Hits"] == "1"
    assert (await client.get("/index.html")).headers["X-Origin-Hits"] == "1"
    etag = (await client.get("/index.html")).headers["ETag"]
    resp = await client.get("/index.html", headers={"If-None-Match": etag})
    assert resp.status == 304 and resp.headers["X-Origin-Hits"] == "3"
    resp = await client.get("/index.html", headers={"Range": "bytes=0-1"})
    assert resp.status == 206 and resp.headers["X-Origin-Hits"] == "4"
    for path in ("/nope.html", "/gen/h?size=bad", "/../x"):
        resp = await client.session.get(yarl.URL(f"http://{client.server.host}:{client.server.port}{path}", encoded=True))
        assert resp.status in (400, 404) and resp.headers["X-Origin-Hits"] == "1", path


async def test_metrics_count_requests_paths_and_bytes(client, registry):
    requests = [("GET", "/gen/metric?size=100")] * 3 + [
        ("GET", "/gen/metric?size=50"), ("GET", "/style.css"), ("POST", "/gen/metric?size=10"),
        ("GET", "/gen/metric?size=x"), ("HEAD", "/gen/metric?size=999"), ("GET", "/nope"),
        ("GET", f"/gen/metric-big?size={3 * 2**20}"), ("GET", "/style.css?r=1"),
    ]
    received = 0
    for method, url in requests:
        headers = {"Range": "bytes=0-9"} if url.endswith("?r=1") else {}
        received += len(await (await client.request(method, url, data=b"abc", headers=headers)).read())
    samples = _samples(registry)

    def value(name, **labels):
        return sum(v for n, l, v in samples if n == name and l == labels)

    assert value("origin_requests_total", method="GET", status="200") == 6
    assert value("origin_requests_total", method="GET", status="206") == 1
    assert value("origin_requests_total", method="GET", status="404") == 1
    assert value("origin_requests_total", method="POST", status="200") == 1
    assert value("origin_requests_total", method="GET", status="400") == 1
    assert value("origin_requests_total", method="HEAD", status="200") == 1
    assert value("origin_path_requests_total", path="/gen/metric") == 7
    assert value("origin_path_requests_total", path="/style.css") == 2
    assert received > 3 * 2**20 + len(STYLE)
    assert value("origin_response_bytes_total") == received
    counters = {n for n, _, _ in samples if not n.endswith("_created")}
    assert counters == {"origin_requests_total", "origin_path_requests_total", "origin_response_bytes_total"}
