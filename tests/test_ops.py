"""edge purge / preload / inspect / status against the whole CDN as real processes on 127.0.92.x.

Origin .10, L2s l2-a .21 and l2-b .22, L1s l1-1 (east) .31 and l1-2 (west)
.32, the DNS scheduler on .5.  The commands run as `python -m edge ...`
processes with the token in their environment, as an operator would run
them.  X-Origin-Hits, stored with each response, says which origin fetch a
client got: a purge worked when the next request through any L1 brings a
new one, and a preload when later hits still carry the first.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from edge.cachekey import cache_key
from edge.config import load
from edge.ops.preload import owners
from tests.cluster import EAST_WEST_REGIONS, REPO, Cluster

NET = "92"
HOST = {"Host": "www.example.com"}
SCHEDULER = EAST_WEST_REGIONS + f"""[dns]
listen = "127.0.{NET}.5:8053"
admin = "127.0.{NET}.5:8091"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
default_region = "east"
[dns.health]
interval = 0.2
"""


@pytest.fixture(scope="module")
def cdn(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("ops"), NET, l2=2, l1=2, l1_regions=("east", "west"),
                       extra=SCHEDULER)
    try:
        c.start("origin", "l2-a", "l2-b", "l1-1", "l1-2", "dns")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def edge(cdn: Cluster, *args: str, token: str | None = "test-token", config: Path | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_ADMIN_TOKEN")}
    env["PYTHONPATH"] = str(REPO)
    if token is not None:
        env["EDGE_ADMIN_TOKEN"] = token
    command, rest = args[0], args[1:]
    return subprocess.run([sys.executable, "-m", "edge", command, "--config", str(config or cdn.config), *rest],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60, input=stdin)


def url_of(path: str) -> str:
    return f"http://www.example.com{path}"


def owner(cdn: Cluster, path: str) -> str:
    topology = load(cdn.config)
    (node,) = owners(topology, cache_key(topology.sites[0], path, "www.example.com"))
    return node.name


async def get(http, cdn: Cluster, node: str, path: str, **headers):
    async with http.get(cdn.url(node, path), headers={**HOST, **headers}) as r:
        await r.read()
        return r.status, r.headers


async def warm(http, cdn: Cluster, *paths: str) -> None:
    """Through both L1s: the owner L2 and each L1 hold every path."""
    for path in paths:
        for l1 in ("l1-1", "l1-2"):
            await get(http, cdn, l1, path)
            _, h = await get(http, cdn, l1, path)
            assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1"), (l1, path, h["Cache-Status"])


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[1:] if line.strip()]


def unique(name: str, query: str = "cc=max-age=600") -> str:
    return f"/gen/{name}-{uuid.uuid4().hex[:10]}?{query}"


async def test_purge_url_on_every_node_l2s_first(cdn, http):
    path = unique("url")
    await warm(http, cdn, path)
    run = edge(cdn, "purge", url_of(path))
    assert run.returncode == 0, run.stderr
    rows = table(run.stdout)
    assert [row[0] for row in rows] == ["l2-a", "l2-b", "l1-1", "l1-2"] and all(r[3] == "ok" for r in rows)
    removed = {row[0] for row in rows if "removed" in " ".join(row)}
    assert removed == {owner(cdn, path), "l1-1", "l1-2"}         # where it was held
    for l1, hits in (("l1-1", "2"), ("l1-2", "2")):              # refetched once, by the owner L2
        _, h = await get(http, cdn, l1, path)
        assert h["X-Origin-Hits"] == hits and h["X-Cache"] == "MISS", h["Cache-Status"]


async def test_purge_prefix_covers_what_is_below_it_on_every_node(cdn, http):
    base = f"/gen/dir-{uuid.uuid4().hex[:8]}"
    inside = [f"{base}/a?cc=max-age=600", f"{base}/b/c?cc=max-age=600&size=3000000"]    # the second on disk only
    outside = f"{base}x/d?cc=max-age=600"
    await warm(http, cdn, *inside, outside)
    run = edge(cdn, "purge", "--prefix", url_of(base + "/"))
    assert run.returncode == 0, run.stderr
    for l1 in ("l1-1", "l1-2"):
        for path in inside:
            _, h = await get(http, cdn, l1, path)
            assert h["X-Origin-Hits"] == "2", (l1, path, h["Cache-Status"])
        _, h = await get(http, cdn, l1, outside)
        assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1")


@pytest.mark.parametrize("field", ["tags", "cachetag"])        # Surrogate-Key and Cache-Tag
async def test_purge_tag_on_every_node_and_tags_never_reach_clients(cdn, http, field):
    tag = f"product-{uuid.uuid4().hex[:8]}"
    tagged = [unique("tagged", f"cc=max-age=600&{field}={tag},common"), unique("tagged", f"cc=max-age=600&{field}={tag}")]
    other = unique("untagged", f"cc=max-age=600&{field}=common")
    await warm(http, cdn, *tagged, other)
    _, h = await get(http, cdn, "l1-1", tagged[0])
    assert "Surrogate-Key" not in h and "Cache-Tag" not in h
    run = edge(cdn, "purge", "--tag", tag)
    assert run.returncode == 0, run.stderr
    for l1 in ("l1-1", "l1-2"):
        for path in tagged:
            _, h = await get(http, cdn, l1, path)
            assert h["X-Origin-Hits"] == "2", (l1, path, h["Cache-Status"])
            assert "Surrogate-Key" not in h and "Cache-Tag" not in h
        _, h = await get(http, cdn, l1, other)
        assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1")


async def test_soft_purge_serves_stale_while_revalidating_through_both_tiers(cdn, http):
    tag = f"soft-{uuid.uuid4().hex[:8]}"
    path = unique("soft", f"cc=max-age=600,stale-while-revalidate=60&etag=1&tags={tag}")
    await warm(http, cdn, path)
    run = edge(cdn, "purge", "--soft", "--tag", tag)
    assert run.returncode == 0, run.stderr
    assert all("marked stale" in line for line in run.stdout.splitlines()[1:])
    _, h = await get(http, cdn, "l1-1", path)
    # The stale copy at once, and a refresh behind it (L1 from the L2, the L2 from the origin).
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("UPDATING", "1"), h["Cache-Status"]
    assert int(h["Age"]) >= 600
    deadline = time.monotonic() + 10
    while True:
        _, h = await get(http, cdn, "l1-1", path)
        if h["X-Cache"] == "HIT" and h["X-Origin-Hits"] == "2":
            break
        assert h["X-Origin-Hits"] in ("1", "2") and time.monotonic() < deadline, h["Cache-Status"]
        await asyncio.sleep(0.05)
    assert h["X-Origin-Conditional"] == "1"          # revalidated with the origin (304), not refetched
    assert int(h["Age"]) < 600


async def test_preload_into_the_owner_l2_and_the_east_l1s_then_hits_only(cdn, http, tmp_path):
    paths = [unique(f"pre{i}") for i in range(3)]
    listing = tmp_path / "urls.txt"
    listing.write_text("# to warm\n" + "\n".join(url_of(p) for p in paths[1:]) + "\n")
    run = edge(cdn, "preload", url_of(paths[0]), "--file", str(listing), "--regions", "east",
               "--concurrency", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 URLs through 6 node fetches" in run.stdout and "6 stored, 0 already fresh, 0 failed" in run.stdout
    for path in paths:
        _, h = await get(http, cdn, "l1-1", path)          # the east L1: its own hit
        assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1")
        _, h = await get(http, cdn, "l1-2", path)          # the west L1: a miss, the owner L2's hit
        assert h["X-Origin-Hits"] == "1" and h["Cache-Status"].startswith(f"{owner(cdn, path)}; hit")
    again = edge(cdn, "preload", *(url_of(p) for p in paths), "--regions", "all")
    assert again.returncode == 0 and "0 stored, 9 already fresh, 0 failed" in again.stdout, again.stdout


async def test_preload_reports_what_failed_and_exits_non_zero(cdn):
    stored, uncacheable, broken = unique("ok"), unique("nostore", "cc=no-store"), unique("err", "status=503")
    run = edge(cdn, "preload", *(url_of(p) for p in (stored, uncacheable, broken)))
    assert run.returncode == 1
    assert "1 stored, 0 already fresh, 2 failed" in run.stdout
    assert "not stored (no-store)" in run.stdout and "HTTP 503" in run.stdout
    assert "[" in run.stderr                                   # the progress line (not a terminal here)


async def test_inspect_a_stored_and_an_absent_url(cdn, http):
    tag = f"insp-{uuid.uuid4().hex[:6]}"
    path = unique("inspect", f"cc=max-age=600&etag=1&tags={tag}&size=4096")
    await get(http, cdn, "l1-1", path)
    holder = owner(cdn, path)
    run = edge(cdn, "inspect", url_of(path))
    assert run.returncode == 0, run.stderr
    rows = {row[0]: row for row in table(run.stdout)}
    assert set(rows) == {"l2-a", "l2-b", "l1-1", "l1-2"}
    for name in (holder, "l1-1"):            # the L1 stored the tags the L2 passed on
        row = rows[name]
        assert row[2:4] == ["yes", "memory+disk"] and row[5] == "fresh" and tag in row, row
    for name in ({"l2-a", "l2-b"} - {holder}) | {"l1-2"}:
        assert rows[name][2] == "no"
    records = json.loads(edge(cdn, "inspect", url_of(path), "--json").stdout)
    (held,) = [r for r in records if r["node"] == "l1-1"]
    (obj,) = held["objects"]
    assert held["present"] and obj["size"] == 4096 and obj["etag"] and obj["tags"] == [tag]
    assert 0 < obj["ttl"] <= 600 and obj["tiers"] == ["memory", "disk"]

    absent = edge(cdn, "inspect", url_of(unique("never-fetched")))
    assert absent.returncode == 0 and all(row[2] == "no" for row in table(absent.stdout)), absent.stdout
    bad = edge(cdn, "inspect", "http://not-ours.example/x")
    assert bad.returncode == 2 and "no site serves 'not-ours.example'" in bad.stderr


async def test_status_one_table_for_the_whole_cdn(cdn, http):
    for _ in range(3):
        await get(http, cdn, "l1-1", unique("status"))
    run = edge(cdn, "status", "--interval", "0.5")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ROLE", "HEALTH", "MEMORY", "DISK", "REQ/S", "HIT%", "PARENTS", "BANS", "DNS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"l2-a", "l2-b", "l1-1", "l1-2", "origin", "dns"}
    for l1 in ("l1-1", "l1-2"):
        assert " ok " in rows[l1] and "2/2 up" in rows[l1] and rows[l1].rstrip().endswith(" up")
    assert "2/2 edges up" in rows["dns"]
    records = {r["node"]: r for r in json.loads(edge(cdn, "status", "--interval", "0", "--json").stdout)}
    assert records["l1-1"]["tiers"][0]["objects"] >= 3 and records["l1-1"]["dns"]["up"] is True


async def test_a_failing_node_is_named_and_the_exit_is_non_zero(cdn, tmp_path):
    # A topology naming one more L1 that is not running; the L2s' ring is unchanged.
    config = tmp_path / "plus-one.toml"
    config.write_text(cdn.config.read_text().replace("[dns]", "[nodes.l1-9]\nrole = \"l1\"\n"
                      f'listen = "127.0.{NET}.39:8080"\nadmin = "127.0.{NET}.39:8091"\nregion = "east"\n[dns]', 1))
    run = edge(cdn, "purge", url_of(unique("x")), config=config)
    assert run.returncode == 1
    assert f"edge: purge failed on l1-9 (127.0.{NET}.39:8091): cannot reach it: Connection refused" in run.stderr
    assert sum(1 for row in table(run.stdout) if row[3] == "ok") == 4
    wrong = edge(cdn, "purge", "--tag", "x", token="wrong")
    assert wrong.returncode == 1 and wrong.stderr.count("HTTP 401: missing or wrong admin token") == 4
    missing = edge(cdn, "purge", "--tag", "x", token=None)
    assert missing.returncode == 2 and "no admin token" in missing.stderr
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    assert edge(cdn, "purge", "--tag", "x", "--token-file", str(token_file), token=None).returncode == 0
