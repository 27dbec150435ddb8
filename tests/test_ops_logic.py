"""The operator commands' pure parts: URL splitting, ring owners, verdicts, rates, tables, tokens."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from edge import admin, config
from edge.cachekey import NotServed, cache_key, split_url
from edge.ops import preload, purge, status
from edge.ops.table import human_bytes, render, seconds
from edge.upstream.ring import HashRing

TOPOLOGY = """
[sites.example]
hosts = ["www.example.com", "img.example.com"]
origin = "http://127.0.0.1:9"
[regions.east]
lat = 0.0
lon = 0.0
[regions.west]
lat = 1.0
lon = 1.0
[nodes.l2-a]
role = "l2"
listen = "127.0.0.2:80"
admin = "127.0.0.2:81"
[nodes.l2-b]
role = "l2"
listen = "127.0.0.3:80"
admin = "127.0.0.3:81"
[nodes.l1-e]
role = "l1"
region = "east"
listen = "127.0.0.4:80"
admin = "127.0.0.4:81"
[nodes.l1-w]
role = "l1"
region = "west"
listen = "127.0.0.5:80"
admin = "127.0.0.5:81"
parents = ["l2-b"]
"""


@pytest.fixture
def topology(tmp_path):
    return config.parse(TOPOLOGY, "t.toml", tmp_path)


@pytest.mark.parametrize("url, expected", [
    ("http://www.example.com/a.js?v=1", ("www.example.com", "/a.js?v=1")),
    ("https://WWW.example.com:8443/a", ("WWW.example.com:8443", "/a")),
    ("http://www.example.com", ("www.example.com", "/")),
    ("http://www.example.com?x=1", ("www.example.com", "/?x=1")),
    ("http://www.example.com/a#frag", ("www.example.com", "/a")),
])
def test_split_url(topology, url, expected):
    site, host, target = split_url(topology, url)
    assert (site.name, host, target) == ("example", *expected)


@pytest.mark.parametrize("url, error", [
    ("/a.js", ValueError), ("ftp://www.example.com/a", ValueError), ("http:///a", ValueError),
    ("http://other.example/a", NotServed),
])
def test_split_url_refuses(topology, url, error):
    with pytest.raises(error):
        split_url(topology, url)


def test_owners_follow_each_l1s_ring(topology):
    # l1-e uses both L2s, l1-w only l2-b: a key owned by l2-a for l1-e is preloaded into both.
    site = topology.sites[0]
    both = HashRing({"l2-a": 1.0, "l2-b": 1.0})
    for i in range(40):
        key = cache_key(site, f"/k{i}", "www.example.com")
        names = [node.name for node in preload.owners(topology, key)]
        assert names == sorted({both.owner(key), "l2-b"})


def test_plan_orders_owner_l2s_before_the_regions_l1s(topology):
    steps = preload.plan(topology, ["http://www.example.com/x"], ["west"])
    ((url, nodes),) = steps
    assert [n.role for n in nodes][-1] == "l1" and nodes[-1].name == "l1-w"
    assert [n.name for n in preload.l1s_in(topology, ["all"])] == ["l1-e", "l1-w"]
    with pytest.raises(ValueError, match="unknown region 'north'"):
        preload.l1s_in(topology, ["north"])


@pytest.mark.parametrize("status, fields, outcome", [
    (200, {"Cache-Status": "l2-a; fwd=uri-miss; fwd-status=200; stored; ttl=60", "X-Cache": "MISS"}, "stored"),
    (200, {"Cache-Status": "l2-a; hit; ttl=50", "X-Cache": "HIT"}, "fresh"),
    (200, {"Cache-Status": "l2-a; hit; ttl=50, l1-e; fwd=uri-miss; stored", "X-Cache": "MISS"}, "stored"),
    (200, {"Cache-Status": "l2-a; fwd=stale; fwd-status=304; ttl=60", "X-Cache": "REVALIDATED"}, "stored"),
    (200, {"Cache-Status": "l2-a; fwd=uri-miss; fwd-status=200; detail=no-store", "X-Cache": "MISS"}, "failed"),
    (503, {"Cache-Status": "l2-a; fwd=uri-miss; fwd-status=503; stored", "X-Cache": "MISS"}, "failed"),
])
def test_preload_reads_the_nodes_own_cache_status_entry(status, fields, outcome):
    node = "l1-e" if "l1-e" in fields["Cache-Status"] else "l2-a"
    assert preload.classify(node, status, CIMultiDict(fields))[0] == outcome


def test_purge_values_are_checked_before_any_call(topology):
    assert purge.check_values(topology, "url", ["http://img.example.com/a"]) is None
    assert "no site serves" in purge.check_values(topology, "prefix", ["http://nope.example/"])
    assert "not a tag" in purge.check_values(topology, "tag", ["ok", "not ok"])


METRICS = """# TYPE edge_requests_total counter
edge_requests_total{cache_status="HIT",method="GET"} %d
edge_requests_total{cache_status="HIT",method="HEAD"} 1
edge_requests_total{cache_status="MISS",method="GET"} %d
edge_requests_total{cache_status="REFUSED",method="GET"} 5
"""


def test_rate_and_hit_ratio_between_two_scrapes():
    before = status.request_counts(METRICS % (10, 10))
    after = status.request_counts(METRICS % (40, 20))
    assert before == {"HIT": 11.0, "MISS": 10.0, "REFUSED": 5.0}
    assert status.rate_and_ratio(before, after, 2.0) == (20.0, "75.0")
    assert status.rate_and_ratio(after, after, 1.0) == (0.0, "67.2*")     # nothing new: since start
    assert status.rate_and_ratio({}, {}, 1.0) == (0.0, "-")


def test_tables_and_units():
    assert render(("A", "BB"), [("x", None), ("long", 2)]) == "A     BB\nx     -\nlong  2\n"
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0B", "1023B", "1.5KiB", "5.0GiB"]
    assert [seconds(v) for v in (None, 42.9, -3, 600, 7500)] == ["-", "42s", "-3s", "10m00s", "2h05m"]


def test_the_token_comes_from_the_option_the_variable_or_the_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    assert admin.load_token({}) is None
    assert admin.load_token({"EDGE_ADMIN_TOKEN": "env"}) == "env"
    assert admin.load_token({"EDGE_ADMIN_TOKEN_FILE": str(token_file)}) == "from-file"
    assert admin.load_token({"EDGE_ADMIN_TOKEN": "env"}, token_file=str(token_file)) == "from-file"
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        if bad.name == "empty":
            bad.write_text("\n")
        with pytest.raises(OSError, match=str(bad)):
            admin.load_token({"EDGE_ADMIN_TOKEN_FILE": str(bad)})
