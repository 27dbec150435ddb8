"""The scheduler's transport over real loopback sockets, in the test's event loop: TCP limits and the cache vs health.

Servers and clients live on 127.0.90.x and 127.0.91.x (two client networks,
two /24s).  The DNS server binds port 0 on 127.0.90.1; the fake L1s it
probes are aiohttp servers on 127.0.90.31-32 serving the /healthz contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from edge import config
from edge.scheduler.answer import Answerer
from edge.scheduler.server import DnsServer
from edge.scheduler.service import Scheduler
from tests.cluster import EAST_WEST_REGIONS
from tests.test_dns_server import AnswererResolver, FakeEdge, eventually

DNS_HOST = "127.0.90.1"
HOLDER, OTHERS = "127.0.90.10", "127.0.91.{}"       # one client network holding connections, and another
EAST_EDGE, WEST_EDGE = "127.0.90.31", "127.0.90.32"
INTERVAL, TIMEOUT, FALL, RISE = 0.1, 0.5, 2, 2


def topology_text(east_admin: str = f"{EAST_EDGE}:8091", west_admin: str = f"{WEST_EDGE}:8091") -> str:
    return f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.90.10:8080"
{EAST_WEST_REGIONS}[coverage]
"127.0.90.0/24" = "east"
"127.0.91.0/24" = "west"
[nodes.l1-east]
role = "l1"
region = "east"
listen = "{EAST_EDGE}:8080"
admin = "{east_admin}"
[nodes.l1-west]
role = "l1"
region = "west"
listen = "{WEST_EDGE}:8080"
admin = "{west_admin}"
[dns]
listen = "{DNS_HOST}:0"
admin = "{DNS_HOST}:0"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
[dns.health]
interval = {INTERVAL}
timeout = {TIMEOUT}
fall = {FALL}
rise = {RISE}
"""


@contextlib.asynccontextmanager
async def dns_server(**limits: object) -> AsyncIterator[tuple[str, int]]:
    """A DnsServer over the pure answerer (every edge healthy) with the given TCP limits."""
    topology = config.parse(topology_text(), "<test>", Path("."))
    server = DnsServer(AnswererResolver(Answerer(topology)), **limits)  # type: ignore[arg-type]
    address = await server.start(DNS_HOST, 0)
    try:
        yield address
    finally:
        await server.close()


def frame(name: str = "www.example.com", qid: int = 1) -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = qid
    return query.to_wire(prepend_length=True)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, qid: int) -> dns.message.Message:
    writer.write(frame(qid=qid))
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(size), 3))


class Holder:
    """One client keeping connections open, each asking a query every `every` seconds."""

    def __init__(self, address: tuple[str, int], count: int, every: float):
        self.address, self.count, self.every = address, count, every
        self.open: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.answered = 0
        self.lost = 0                              # connections the server closed under us
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for _ in range(self.count):
            self.open.append(await asyncio.open_connection(*self.address, local_addr=(HOLDER, 0)))
        self.tasks = [asyncio.create_task(self.keep(i, *pair)) for i, pair in enumerate(self.open)]

    async def keep(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        qid = index * 1000
        try:
            while True:
                qid += 1
                await exchange(reader, writer, qid)
                self.answered += 1
                await asyncio.sleep(self.every)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            self.lost += 1

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for _, writer in self.open:
            writer.close()


async def new_clients(address: tuple[str, int], count: int) -> int:
    """How many of `count` new TCP clients (from the other network, one after another) get an answer."""
    answered = 0
    for i in range(count):
        query = dns.message.make_query("www.example.com", "A")
        try:
            response = await dns.asyncquery.tcp(query, address[0], port=address[1], timeout=2,
                                                source=OTHERS.format(10 + i))
        except (dns.exception.DNSException, OSError, EOFError):
            continue
        answered += response.rcode() == dns.rcode.NOERROR and bool(response.answer)
    return answered


# --------------------------------------------------------------------------- TCP limits

async def test_connections_held_open_with_a_query_every_few_seconds_do_not_lock_new_clients_out() -> None:
    """The issue's case, scaled down: one client holds every connection, asking on each every 0.3 s."""
    async with dns_server(max_tcp_connections=16, max_tcp_per_network=16, tcp_idle_timeout=10.0) as address:
        holder = Holder(address, 16, every=0.3)
        await holder.start()
        try:
            await asyncio.sleep(0.5)
            assert holder.answered >= 16 and holder.lost == 0       # all 16 in use, none idle for long
            assert await new_clients(address, 25) == 25
            # The first took the place of one of the holder's (the one that asked longest ago);
            # the others found it free again, each having closed after its answer.

            async def replaced() -> bool:
                return holder.lost >= 1
            await eventually(replaced, 2, "one of the holder's connections closed")
        finally:
            await holder.stop()


async def test_a_network_at_its_cap_gets_no_more_connections_and_others_are_served() -> None:
    async with dns_server(max_tcp_connections=64, max_tcp_per_network=4) as address:
        held = [await asyncio.open_connection(*address, local_addr=(HOLDER, 0)) for _ in range(10)]
        try:
            answered = refused = 0
            for qid, (reader, writer) in enumerate(held, 1):
                try:
                    answered += (await exchange(reader, writer, qid)).id == qid
                except (asyncio.IncompleteReadError, ConnectionError):
                    refused += 1
            assert (answered, refused) == (4, 6)
            assert await new_clients(address, 25) == 25
            for qid, (reader, writer) in enumerate(held[:4], 100):   # the first four still work
                assert (await exchange(reader, writer, qid)).id == qid
        finally:
            for _, writer in held:
                writer.close()


async def test_idle_connections_are_closed_and_busy_ones_kept() -> None:
    async with dns_server(tcp_idle_timeout=0.6) as address:
        idle_reader, idle_writer = await asyncio.open_connection(*address, local_addr=(HOLDER, 0))
        busy_reader, busy_writer = await asyncio.open_connection(*address, local_addr=(HOLDER, 0))
        try:
            started = time.monotonic()
            qid = 0
            while time.monotonic() - started < 2.0:                   # well past the idle timeout
                qid += 1
                assert (await exchange(busy_reader, busy_writer, qid)).id == qid
                await asyncio.sleep(0.2)
            # The silent one was closed: 0.6 s idle plus at most one 0.5 s sweep.
            assert await asyncio.wait_for(idle_reader.read(), 1) == b""
        finally:
            idle_writer.close()
            busy_writer.close()


async def test_pipelined_queries_are_answered_in_order() -> None:
    async with dns_server() as address:
        reader, writer = await asyncio.open_connection(*address, local_addr=(HOLDER, 0))
        try:
            names = ["www.example.com", "nope.example.com", "example.com", "www.google.com"] * 5
            writer.write(b"".join(frame(name, qid) for qid, name in enumerate(names, 1)))
            for qid, name in enumerate(names, 1):
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
                response = dns.message.from_wire(await reader.readexactly(size))
                assert response.id == qid and response.question[0].name.to_text() == name + "."
        finally:
            writer.close()


# --------------------------------------------------------------------------- the cache and health

@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[Scheduler, FakeEdge, FakeEdge]]:
    east, west = FakeEdge(EAST_EDGE), FakeEdge(WEST_EDGE)
    await east.start()
    await west.start()
    text = topology_text(f"{east.host}:{east.port}", f"{west.host}:{west.port}")
    scheduler = Scheduler(config.parse(text, "<test>", Path(".")))
    await scheduler.start()
    try:
        async def probed() -> bool:
            return all(s.probed for s in scheduler.health.snapshot.values())
        await eventually(probed, 5, "first health probes")
        yield scheduler, east, west
    finally:
        await scheduler.close()
        await east.stop()
        await west.stop()


async def edges_for(scheduler: Scheduler, source: str) -> list[str]:
    host, port = scheduler.dns_address  # type: ignore[misc]
    response = await dns.asyncquery.udp(dns.message.make_query("www.example.com", "A"), host, port=port,
                                        timeout=3, source=source)
    return [rr.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]


async def test_an_edge_going_down_changes_the_cached_answer_within_the_fall_time(scheduler) -> None:
    scheduler, east, _ = scheduler
    cache = scheduler.server.cache
    for _ in range(5):
        assert await edges_for(scheduler, "127.0.90.50") == [EAST_EDGE, WEST_EDGE]
    assert cache.hits >= 4                                    # the answer is being served from the cache
    await east.stop()
    started = time.monotonic()

    async def moved() -> bool:
        return await edges_for(scheduler, "127.0.90.50") == [WEST_EDGE]
    await eventually(moved, 5, "east clients moved off the dead edge")
    took = time.monotonic() - started
    assert took <= FALL * INTERVAL + TIMEOUT + 0.5, took     # fall probes, then the probe's timeout at most
    hits = cache.hits
    assert await edges_for(scheduler, "127.0.90.51") == [WEST_EDGE]
    assert cache.hits == hits + 1                             # the new answer is cached in its turn


async def test_the_schedulers_metrics_pass_promtool_and_count_hits_like_misses(scheduler) -> None:
    scheduler, _, _ = scheduler
    for source in ("127.0.90.50", "127.0.90.51", "127.0.91.50"):
        await edges_for(scheduler, source)                    # a miss, a hit, a miss (another region)
    url = "http://%s:%d/metrics" % scheduler.admin_address  # type: ignore[str-format]
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        text = await reply.text()
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['dns_queries_total{qtype="A",rcode="NOERROR"}']) == 3
    assert float(lines['dns_answers_total{edge="l1-east"}']) == 3       # both edges in every answer
    assert float(lines["dns_cache_hits_total"]) == 1 and float(lines["dns_cache_misses_total"]) == 2
    assert float(lines["dns_decision_seconds_count"]) == 2
    # Two answers, and the first one again under its packet (it was hit: the next repeat skips the pre-parser).
    assert float(lines["dns_cache_entries"]) == 3 and 0 < float(lines["dns_cache_bytes"]) <= float(
        lines["dns_cache_max_bytes"])
