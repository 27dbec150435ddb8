"""The scheduler over real sockets: UDP and TCP on loopback, dnspython and dig as clients.

The scheduler runs in the test's event loop on 127.0.45.x (port 0); the L1
edges it probes are small aiohttp servers on 127.0.46.x serving the cache
node's /healthz contract, which the tests turn down, up and overloaded.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from aiohttp import web

from edge import config
from edge.scheduler.answer import Answerer
from edge.scheduler.server import DnsServer, Resolved
from edge.scheduler.service import Scheduler
from tests.cluster import EAST_WEST_REGIONS

DIG = shutil.which("dig") or "/usr/bin/dig"
DNS_HOST = "127.0.45.1"
EAST_CLIENT, WEST_CLIENT = "127.0.11.1", "127.0.12.1"
EAST_EDGE, WEST_EDGE = "127.0.46.1", "127.0.46.2"
INTERVAL, TIMEOUT, FALL, RISE = 0.1, 0.5, 2, 2
CDN = "www.example.com.cdn.example.net."


class FakeEdge:
    """A real HTTP peer on loopback serving the L1 /healthz contract, switchable by the test."""

    def __init__(self, host: str):
        self.host, self.port = host, 0
        self.overloaded = False
        self.probes = 0
        self.runner: web.AppRunner | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response({"status": "ok", "node": self.host, "role": "l1",
                                  "inflight": 7 if self.overloaded else 0, "max_inflight": 5,
                                  "overloaded": self.overloaded})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def topology_text(east: FakeEdge, west: FakeEdge, dns_port: int = 0, admin_port: int = 0) -> str:
    return f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.46.10:8080"
{EAST_WEST_REGIONS}[coverage]
"127.0.11.0/24" = "east"
"127.0.12.0/24" = "west"
"203.0.113.0/24" = "west"
[nodes.l1-east]
role = "l1"
region = "east"
listen = "{EAST_EDGE}:8080"
admin = "{east.host}:{east.port}"
[nodes.l1-west]
role = "l1"
region = "west"
listen = "{WEST_EDGE}:8080"
admin = "{west.host}:{west.port}"
[dns]
listen = "{DNS_HOST}:{dns_port}"
admin = "{DNS_HOST}:{admin_port}"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
ttl = 30
default_region = "east"
[dns.health]
interval = {INTERVAL}
timeout = {TIMEOUT}
fall = {FALL}
rise = {RISE}
"""


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float, what: str) -> float:
    """Poll `check` until it holds; return the seconds it took, fail after `deadline`."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {deadline}s: {what}")


class Cluster:
    def __init__(self, scheduler: Scheduler, east: FakeEdge, west: FakeEdge):
        self.scheduler, self.east, self.west = scheduler, east, west
        self.host, self.port = scheduler.dns_address  # type: ignore[misc]
        self.admin = "http://%s:%d" % scheduler.admin_address  # type: ignore[str-format]

    async def query(self, name: str = "www.example.com", rdtype: str = "A", source: str = EAST_CLIENT,
                    tcp: bool = False, **make: object) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
        if tcp:
            return await dns.asyncquery.tcp(q, self.host, timeout=3, port=self.port, source=source)
        return await dns.asyncquery.udp(q, self.host, timeout=3, port=self.port, source=source)

    async def edges_for(self, source: str, name: str = "www.example.com") -> list[str]:
        """The A records a client at `source` gets, in wire order (its failover order)."""
        response = await self.query(name, source=source)
        return [rr.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]

    async def dig(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            DIG, f"@{self.host}", "-p", str(self.port), "+time=2", "+tries=1", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
        return out.decode()

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as reply:
            return reply.status, await reply.text()

    async def metric(self, line_prefix: str) -> float:
        _, text = await self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {line_prefix} in /metrics")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    east, west = FakeEdge(EAST_EDGE), FakeEdge(WEST_EDGE)
    await east.start()
    await west.start()
    scheduler = Scheduler(config.parse(topology_text(east, west), "<test>", Path(".")))
    await scheduler.start()
    try:
        # Ready when both edges have had their first probe.
        async def probed() -> bool:
            return all(s.probed for s in scheduler.health.snapshot.values())
        await eventually(probed, 5, "first health probes")
        yield Cluster(scheduler, east, west)
    finally:
        await scheduler.close()
        await east.stop()
        await west.stop()


# --------------------------------------------------------------------------- answers over the wire

async def test_udp_and_tcp_send_each_client_to_its_nearest_edge(cluster: Cluster) -> None:
    for tcp in (False, True):
        east = await cluster.query(source=EAST_CLIENT, tcp=tcp)
        west = await cluster.query(source=WEST_CLIENT, tcp=tcp)
        assert east.flags & dns.flags.AA and east.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in east.answer] == [
            f"www.example.com. 3600 IN CNAME {CDN}", f"{CDN} 30 IN A {EAST_EDGE}\n{CDN} 30 IN A {WEST_EDGE}"]
        assert [r.to_text() for r in west.answer][1] == f"{CDN} 30 IN A {WEST_EDGE}\n{CDN} 30 IN A {EAST_EDGE}"


async def test_the_nearest_edge_is_first_on_the_wire_every_time(cluster: Cluster) -> None:
    # dnspython shuffles an RRset's records when rendering unless told not to.  Every
    # spelling of the name (0x20) is a query of its own, rendered afresh: 64 renderings
    # in the right order by chance would be a 1 in 2**64 event.
    rng = random.Random(10)
    for source, expected in ((EAST_CLIENT, [EAST_EDGE, WEST_EDGE]), (WEST_CLIENT, [WEST_EDGE, EAST_EDGE])):
        for _ in range(32):
            name = "".join(c.upper() if rng.random() < 0.5 else c for c in "www.example.com")
            assert await cluster.edges_for(source, name) == expected, name


async def test_dig_answers_the_cname_and_the_nearest_edge(cluster: Cluster) -> None:
    east = await cluster.dig("-b", EAST_CLIENT, "www.example.com")
    assert "status: NOERROR" in east and re.search(r"flags: qr aa", east)
    assert re.search(rf"^www\.example\.com\.\s+3600\s+IN\s+CNAME\s+{re.escape(CDN)}$", east, re.M)
    assert re.findall(rf"^{re.escape(CDN)}\s+30\s+IN\s+A\s+(\S+)$", east, re.M) == [EAST_EDGE, WEST_EDGE]
    west = await cluster.dig("-b", WEST_CLIENT, "+short", "www.example.com")
    assert west.split() == [CDN, WEST_EDGE, EAST_EDGE]


async def test_dig_with_client_subnet_answers_that_subnet_and_echoes_a_scope(cluster: Cluster) -> None:
    out = await cluster.dig("-b", EAST_CLIENT, "+subnet=203.0.113.0/24", "www.example.com")
    assert re.search(rf"{re.escape(CDN)}\s+30\s+IN\s+A\s+{WEST_EDGE}", out)
    assert "CLIENT-SUBNET: 203.0.113.0/24/24" in out


async def test_dig_zone_answers_refused_nxdomain_and_soa(cluster: Cluster) -> None:
    refused = await cluster.dig("www.google.com")
    assert "status: REFUSED" in refused and "ANSWER: 0" in refused
    assert "aa" not in re.search(r"flags: ([a-z ]*);", refused).group(1).split()   # not authoritative
    nx = await cluster.dig("nope.example.com")
    assert "status: NXDOMAIN" in nx
    assert re.search(r"^example\.com\.\s+30\s+IN\s+SOA\s+ns1\.cdn\.example\.net\. hostmaster\.cdn\.example\.net\. 1 ",
                     nx, re.M)
    nodata = await cluster.dig("www.example.com.cdn.example.net", "TXT")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "AUTHORITY: 1" in nodata
    ns = await cluster.dig("example.com", "NS")
    assert re.search(r"^ns1\.cdn\.example\.net\.\s+3600\s+IN\s+A\s+127\.0\.45\.1$", ns, re.M)
    mixed = await cluster.dig("+short", "-b", WEST_CLIENT, "wWw.ExAmPlE.cOm")
    assert mixed.split() == [CDN, WEST_EDGE, EAST_EDGE]


# --------------------------------------------------------------------------- health

async def test_a_dead_edge_is_taken_out_within_the_fall_time_and_put_back(cluster: Cluster) -> None:
    assert await cluster.edges_for(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]
    await cluster.east.stop()

    async def moved() -> bool:
        return await cluster.edges_for(EAST_CLIENT) == [WEST_EDGE]     # a dead edge is no fallback
    # The rise/fall counting itself is a table test (test_dns_answer, EdgeHealth);
    # here the states, with a deadline rather than a wall-clock bound.
    await eventually(moved, 5, "east clients moved to the west edge")
    assert await cluster.metric('dns_edge_up{edge="l1-east"}') == 0
    _, explain = await cluster.get(f"/explain?name=www.example.com&client={EAST_CLIENT}")
    assert '"up": false' in explain and "probe failed" in explain

    await cluster.east.start()

    async def back() -> bool:
        return await cluster.edges_for(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]
    await eventually(back, 5, "east clients back on the east edge")
    assert await cluster.metric('dns_edge_up{edge="l1-east"}') == 1


async def test_an_overloaded_edge_sends_clients_to_the_next_nearest(cluster: Cluster) -> None:
    cluster.east.overloaded = True

    async def avoided() -> bool:
        return await cluster.edges_for(EAST_CLIENT) == [WEST_EDGE, EAST_EDGE]   # busy: only the fallback
    await eventually(avoided, 3, "overloaded east edge avoided")
    record = (await cluster.get(f"/explain?name=www.example.com&client={EAST_CLIENT}"))[1]
    assert '"overloaded": true' in record and '"inflight": 7' in record
    cluster.east.overloaded = False

    async def back() -> bool:
        return await cluster.edges_for(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]
    await eventually(back, 3, "east edge preferred again")


async def test_with_every_edge_down_it_answers_the_nearest_and_says_so(cluster: Cluster) -> None:
    await cluster.east.stop()
    await cluster.west.stop()

    async def both_down() -> bool:
        return not any(s.up for s in cluster.scheduler.health.snapshot.values())
    await eventually(both_down, 5, "both edges down")
    assert await cluster.edges_for(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]
    assert await cluster.edges_for(WEST_CLIENT) == [WEST_EDGE, EAST_EDGE]
    assert await cluster.metric("dns_all_edges_down_total") == 2
    status, body = await cluster.get(f"/explain?name=www.example.com&client={EAST_CLIENT}")
    assert status == 200 and '"all_down": true' in body


# --------------------------------------------------------------------------- admin

async def test_explain_returns_region_reason_candidates_and_answer(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{cluster.admin}/explain?name=www.example.com&client=203.0.113.7"
        async with session.get(url) as reply:
            assert reply.status == 200
            record = await reply.json()
    assert record["location"]["region"] == "west"
    assert record["location"]["reason"] == "coverage block 203.0.113.0/24"
    assert [(c["edge"], c["up"], c["chosen"]) for c in record["candidates"]] == [
        ("l1-west", True, True), ("l1-east", True, True)]
    assert record["candidates"][1]["distance_km"] == pytest.approx(4130, rel=0.01)
    assert record["answer"] == [WEST_EDGE, EAST_EDGE]


@pytest.mark.parametrize("query,error", [
    ("", "missing ?name="),
    ("name=www.example.com&client=not-an-ip", "client is not an IP address"),
    ("name=www.example.com&subnet=1.2.3/99", "subnet is not a CIDR block"),
    ("name=a..b", "cannot ask"),
    ("name=www.example.com&type=BOGUS", "cannot ask"),
])
async def test_explain_rejects_bad_input_with_400(cluster: Cluster, query: str, error: str) -> None:
    status, body = await cluster.get(f"/explain?{query}")
    assert status == 400 and error in body


async def test_metrics_count_queries_by_type_and_rcode_and_answers_by_edge(cluster: Cluster) -> None:
    for _ in range(3):
        await cluster.query(source=EAST_CLIENT)
    await cluster.query(source=WEST_CLIENT, tcp=True)
    await cluster.query("example.com", "SOA")
    await cluster.query("www.google.com")
    assert await cluster.metric('dns_queries_total{qtype="A",rcode="NOERROR"}') == 4
    assert await cluster.metric('dns_queries_total{qtype="SOA",rcode="NOERROR"}') == 1
    assert await cluster.metric('dns_queries_total{qtype="A",rcode="REFUSED"}') == 1
    # Every answer names both edges: the nearest and the fallback.
    assert await cluster.metric('dns_answers_total{edge="l1-east"}') == 4
    assert await cluster.metric('dns_answers_total{edge="l1-west"}') == 4
    # The second and third east queries (other IDs, same everything else) were cache hits:
    # counted like the others above, but decided once.
    assert await cluster.metric("dns_cache_hits_total") == 2
    assert await cluster.metric("dns_cache_misses_total") == 4
    assert await cluster.metric("dns_decision_seconds_count") == 4
    status, body = await cluster.get("/healthz")
    assert status == 200 and '"role": "dns"' in body


# --------------------------------------------------------------------------- transport edge cases

def many_edges_topology(count: int) -> config.Topology:
    nodes = "\n".join(f'[nodes.l1-{i}]\nrole = "l1"\nregion = "east"\n'
                      f'listen = "127.0.46.{100 + i}:8080"\nadmin = "127.0.46.{100 + i}:8091"' for i in range(count))
    return config.parse(f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.46.10:8080"
[regions.east]
lat = 40.71
lon = -74.01
{nodes}
[dns]
listen = "{DNS_HOST}:0"
admin = "{DNS_HOST}:0"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
answers = {count}
""", "<test>", Path("."))


class AnswererResolver:
    """The pure answerer with every edge healthy; a name starting "boom" raises."""

    generation = 0

    def __init__(self, answerer: Answerer):
        self.answerer = answerer
        self.counted: list[object] = []

    def resolve(self, query: dns.message.Message, client: object) -> Resolved:
        if query.question and query.question[0].name.labels[0].startswith(b"boom"):
            raise RuntimeError("the resolver broke")
        result = self.answerer.answer(query, client, {})  # type: ignore[arg-type]
        return Resolved(result.response, tuple(e.name for c in result.choices for e in c.chosen))

    def place(self, *client: object) -> object:
        return self.answerer.place(*client)  # type: ignore[arg-type]

    def tally(self, qtype: int | None, rcode: int, decision: object) -> object:
        return (qtype, rcode, decision)

    def count(self, tally: object) -> None:
        self.counted.append(tally)


@pytest.fixture
async def big() -> AsyncIterator[tuple[str, int]]:
    """A bare DnsServer whose answer for www.example.com holds 40 A records (about 730 bytes)."""
    server = DnsServer(AnswererResolver(Answerer(many_edges_topology(40))))
    address = await server.start(DNS_HOST, 0)
    try:
        yield address
    finally:
        await server.close()


def a_count(response: dns.message.Message) -> int:
    return sum(len(r) for r in response.answer if r.rdtype == dns.rdatatype.A)


async def test_without_edns_an_answer_over_512_bytes_is_truncated_and_tcp_gets_it_all(big: tuple[str, int]) -> None:
    host, port = big
    query = dns.message.make_query("www.example.com", "A")
    udp = await dns.asyncquery.udp(query, host, timeout=3, port=port)
    assert udp.flags & dns.flags.TC and not udp.answer and len(udp.to_wire()) <= 512
    tcp = await dns.asyncquery.tcp(query, host, timeout=3, port=port)
    assert not tcp.flags & dns.flags.TC and a_count(tcp) == 40


@pytest.mark.parametrize("payload,truncated", [(512, True), (600, True), (1232, False), (4096, False)])
async def test_edns_payload_size_is_honoured(big: tuple[str, int], payload: int, truncated: bool) -> None:
    host, port = big
    query = dns.message.make_query("www.example.com", "A", use_edns=0, payload=payload)
    udp = await dns.asyncquery.udp(query, host, timeout=3, port=port)
    assert bool(udp.flags & dns.flags.TC) == truncated
    assert len(udp.wire) <= max(512, min(payload, 1232))   # never above the client's size or ours
    assert a_count(udp) == (0 if truncated else 40)


async def test_dig_retries_a_truncated_answer_over_tcp(big: tuple[str, int]) -> None:
    host, port = big
    proc = await asyncio.create_subprocess_exec(
        DIG, f"@{host}", "-p", str(port), "+noedns", "+time=2", "+tries=1", "www.example.com",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 15))[0].decode()
    assert "Truncated, retrying in TCP mode" in out
    assert len(re.findall(r"\sIN\s+A\s+127\.0\.46\.\d+$", out, re.M)) == 40


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.replies.put_nowait(data)


async def test_garbage_over_udp_is_dropped_or_formerr_and_the_server_keeps_answering(big: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UdpClient, remote_addr=big)
    try:
        transport.sendto(b"\x12\x34\x01")                          # shorter than a header: dropped
        transport.sendto(bytes.fromhex("abcd8180") + bytes(8))     # a response (QR set): dropped
        rng = random.Random(4)
        for _ in range(200):                                       # noise with the QR bit set: all dropped
            noise = bytearray(rng.randbytes(rng.randrange(12, 200)))
            noise[2] |= 0x80
            transport.sendto(bytes(noise))
        # A header that promises one question and carries none: FORMERR, same ID.
        transport.sendto(bytes.fromhex("beef0100") + (1).to_bytes(2, "big") + bytes(6))
        formerr = dns.message.from_wire(await asyncio.wait_for(client.replies.get(), 3))
        assert formerr.id == 0xBEEF and formerr.rcode() == dns.rcode.FORMERR and formerr.flags & dns.flags.QR
        good = dns.message.make_query("www.example.com", "A")
        transport.sendto(good.to_wire())
        # Packets are handled in order, so nothing was sent for the dropped ones.
        reply = dns.message.from_wire(await asyncio.wait_for(client.replies.get(), 3))
        assert reply.id == good.id and reply.rcode() == dns.rcode.NOERROR
        assert client.replies.empty()
        for _ in range(200):                                       # queries with junk appended: FORMERR
            transport.sendto(good.to_wire() + rng.randbytes(rng.randrange(1, 50)))
        for _ in range(200):
            assert dns.message.from_wire(await asyncio.wait_for(client.replies.get(), 3)).rcode() == dns.rcode.FORMERR
    finally:
        transport.close()


async def test_garbage_over_tcp_gets_formerr_and_the_connection_goes_on(big: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*big)
    try:
        junk = bytes.fromhex("beef0100") + (1).to_bytes(2, "big") + bytes(6)
        writer.write(len(junk).to_bytes(2, "big") + junk)
        size = int.from_bytes(await reader.readexactly(2), "big")
        assert dns.message.from_wire(await reader.readexactly(size)).rcode() == dns.rcode.FORMERR
        good = dns.message.make_query("www.example.com", "A")
        writer.write(good.to_wire(prepend_length=True))
        size = int.from_bytes(await reader.readexactly(2), "big")
        assert a_count(dns.message.from_wire(await reader.readexactly(size))) == 40
        writer.write((3).to_bytes(2, "big") + b"abc")                 # too short to answer: hang up
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()


async def test_a_resolver_exception_is_servfail_and_the_next_query_is_answered(big: tuple[str, int]) -> None:
    host, port = big
    boom = await dns.asyncquery.udp(dns.message.make_query("boom.example.com", "A"), host, timeout=3, port=port)
    assert boom.rcode() == dns.rcode.SERVFAIL
    fine = await dns.asyncquery.udp(dns.message.make_query("www.example.com", "A", use_edns=0), host,
                                    timeout=3, port=port)
    assert fine.rcode() == dns.rcode.NOERROR and a_count(fine) == 40


async def test_a_busy_address_fails_start_with_oserror_and_leaves_nothing_bound() -> None:
    east, west = FakeEdge(EAST_EDGE), FakeEdge(WEST_EDGE)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((DNS_HOST, 0))
        port = taken.getsockname()[1]
        scheduler = Scheduler(config.parse(topology_text(east, west, dns_port=port), "<test>", Path(".")))
        with pytest.raises(OSError):
            await scheduler.start()
    # The admin listener is what comes up second: make its bind fail instead.
    with socket.socket() as taken:
        taken.bind((DNS_HOST, 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        scheduler = Scheduler(config.parse(topology_text(east, west, admin_port=admin_port), "<test>", Path(".")))
        with pytest.raises(OSError):
            await scheduler.start()
        assert scheduler.server._udp is None and scheduler.server._tcp is None
