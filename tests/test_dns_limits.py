"""A real `edge run dns` under load: rate limiting per network, a flood of distinct queries, ANY.

The scheduler runs as its own process on 127.0.91.5:8053 (its L1s are in
the topology but not started, as in the fuzz test: answers take the "all
down" path, which hands out edges all the same).  Clients come from two
networks: 127.0.90.x (east) and 127.0.91.x (west).
"""

from __future__ import annotations

import random
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.cluster import EAST_WEST_REGIONS, Cluster, NodeProcess

NET = "91"
DNS_HOST, DNS_PORT = "127.0.91.5", 8053
LIMITED, OTHER = "127.0.90.200", "127.0.91.200"   # two client networks (/24s): east and west
EDGES = {LIMITED: ["127.0.91.31", "127.0.91.32"], OTHER: ["127.0.91.32", "127.0.91.31"]}   # nearest first
DIG = shutil.which("dig") or "/usr/bin/dig"
RATE, SLIP = 20, 2
CACHE_SIZE = 2 * 2**20


def scheduler_config(extra: str) -> str:
    return f"""
{EAST_WEST_REGIONS}[coverage]
"127.0.90.0/24" = "east"
"127.0.91.0/24" = "west"
[dns]
listen = "{DNS_HOST}:{DNS_PORT}"
admin = "{DNS_HOST}:8091"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
default_region = "east"
{extra}
[dns.health]
interval = 5.0
timeout = 0.5
"""


def start_scheduler(tmp_path: Path, extra: str) -> Iterator[NodeProcess]:
    cluster = Cluster.create(tmp_path, NET, l1=2, l1_regions=("east", "west"), extra=scheduler_config(extra))
    try:
        cluster.start("dns")
        yield cluster.node("dns")
    finally:
        cluster.stop_all()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[NodeProcess]:
    yield from start_scheduler(tmp_path, f"[dns.rrl]\nrate = {RATE}\nslip = {SLIP}")


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[NodeProcess]:
    """One answer a second, and every refused one truncated (slip 1, Knot's default)."""
    yield from start_scheduler(tmp_path, "[dns.rrl]\nrate = 1\nslip = 1")


@pytest.fixture
def unlimited(tmp_path: Path) -> Iterator[NodeProcess]:
    yield from start_scheduler(tmp_path, f'cache_size = "{CACHE_SIZE}"\n[dns.rrl]\nrate = 0')


def metric(node: NodeProcess, name: str) -> float:
    for line in node.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def query(name: str = "www.example.com", rdtype: str = "A", qid: int = 0, **make: object) -> bytes:
    message = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    message.id = qid
    return message.to_wire()


def drain(sock: socket.socket, quiet: float) -> list[dns.message.Message]:
    """Every reply that arrives until none has for `quiet` seconds."""
    replies = []
    while select.select([sock], [], [], quiet)[0]:
        replies.append(dns.message.from_wire(sock.recv(65535)))
    return replies


def burst(source: str, count: int) -> list[dns.message.Message]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for qid in range(count):
            sock.sendto(query(qid=qid), (DNS_HOST, DNS_PORT))
        return drain(sock, 0.5)


def full_answer(message: dns.message.Message) -> bool:
    return message.rcode() == dns.rcode.NOERROR and not message.flags & dns.flags.TC and len(message.answer) == 2


# --------------------------------------------------------------------------- rate limiting

def test_rrl_answers_the_rate_then_slips_and_drops_for_one_network_only(limited: NodeProcess) -> None:
    started = time.monotonic()
    replies = burst(LIMITED, 200)
    sent_in = time.monotonic() - started
    full = [r for r in replies if full_answer(r)]
    slipped = [r for r in replies if r.flags & dns.flags.TC]
    assert len(full) + len(slipped) == len(replies)
    # A full bucket (one second's worth), plus what refilled while the burst was being answered.
    assert RATE <= len(full) <= RATE + RATE * sent_in + 1, (len(full), sent_in)
    refused = 200 - len(full)
    assert len(slipped) == refused // SLIP                 # every second refused answer is truncated
    for reply in slipped:                                  # empty, with the question: "ask over TCP"
        assert not reply.answer and reply.question[0].name.to_text() == "www.example.com."
    assert metric(limited, 'dns_rrl_limited_total{action="slipped"}') == len(slipped)
    assert metric(limited, 'dns_rrl_limited_total{action="dropped"}') == refused - len(slipped)

    # Another network is not touched, and the limited one is answered over TCP.
    other = burst(OTHER, RATE)
    assert len(other) == RATE and all(full_answer(r) for r in other)
    over_tcp = dns.query.tcp(dns.message.make_query("www.example.com", "A"), DNS_HOST, port=DNS_PORT,
                             timeout=3, source=LIMITED)
    assert full_answer(over_tcp)
    time.sleep(1.0)                                         # a second later the bucket has refilled
    again = burst(LIMITED, RATE // 2)
    assert len(again) == RATE // 2 and all(full_answer(r) for r in again)


def test_dig_retries_a_slipped_answer_over_tcp(strict: NodeProcess) -> None:
    replies = burst(LIMITED, 5)                             # the network's one answer this second, then slips
    assert sum(full_answer(r) for r in replies) == 1 and sum(bool(r.flags & dns.flags.TC) for r in replies) == 4
    out = subprocess.run([DIG, f"@{DNS_HOST}", "-p", str(DNS_PORT), "-b", LIMITED, "+time=2", "+tries=1",
                          "www.example.com"], capture_output=True, text=True, timeout=15).stdout
    assert "Truncated, retrying in TCP mode" in out, out
    assert "status: NOERROR" in out and re.findall(r"IN\s+A\s+(\S+)$", out, re.M) == EDGES[LIMITED], out


# --------------------------------------------------------------------------- a flood

def rss(node: NodeProcess) -> int:
    for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def random_query(rng: random.Random, qid: int) -> bytes:
    label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(4, 30)))
    name = f"{label}.{rng.choice(['example.com', 'cdn.example.net', 'www.example.com'])}"
    name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
    options = None
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            options = [dns.edns.ECSOption(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0", rng.randint(8, 24))]
        else:
            options = [dns.edns.ECSOption(f"2001:db8:{rng.randrange(65536):x}::", rng.randint(32, 56))]
    return query(name, rng.choice(["A", "AAAA"]), qid, use_edns=0 if options else None, options=options)


def normal_answer(source: str) -> bool:
    response = dns.query.udp(dns.message.make_query("www.example.com", "A"), DNS_HOST, port=DNS_PORT,
                             timeout=3, source=source)
    return [rr.address for rrset in response.answer[1:] for rr in rrset] == EDGES[source]


def test_a_flood_of_distinct_names_and_subnets_keeps_memory_bounded_and_answers_flowing(
        unlimited: NodeProcess) -> None:
    rng = random.Random(20261213)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LIMITED, 0))
        for i in range(2000):                                # warm up: imports, pools, the first entries
            sock.sendto(random_query(rng, i), (DNS_HOST, DNS_PORT))
        drain(sock, 0.3)
        before = rss(unlimited)
        answered = 0
        for window in range(40):                             # 40 x 500 = 20,000 queries, none asked twice
            for i in range(500):
                sock.sendto(random_query(rng, i), (DNS_HOST, DNS_PORT))
            answered += len(drain(sock, 0.1))
            if window % 10 == 9:
                assert normal_answer(OTHER), f"a normal query was not answered after {window + 1} windows"
        growth = rss(unlimited) - before
    # The flood itself was answered too, but for what overflowed the sockets' buffers.
    assert answered > 10000, answered
    assert normal_answer(LIMITED)
    assert metric(unlimited, "dns_cache_bytes") <= CACHE_SIZE
    assert metric(unlimited, "dns_cache_evictions_total") > 0    # it was full and made room
    # Bounded by the cache's size plus what the process keeps besides it (allocator slack, buffers).
    assert growth < CACHE_SIZE + 16 * 2**20, growth / 2**20


# --------------------------------------------------------------------------- ANY

def test_any_is_minimal(unlimited: NodeProcess) -> None:
    def dig(*args: str) -> str:
        return subprocess.run([DIG, f"@{DNS_HOST}", "-p", str(DNS_PORT), "-b", OTHER, "+time=2", "+tries=1",
                               *args], capture_output=True, text=True, timeout=15).stdout

    for _ in range(2):                                       # the second from the cache
        out = dig("ANY", "www.example.com.cdn.example.net")
        assert "status: NOERROR" in out and "ANSWER: 2," in out
        assert re.findall(r"IN\s+(\w+)\s+127\.0\.91\.\d+$", out, re.M) == ["A", "A"]
    apex = dig("ANY", "example.com")
    assert "status: NOERROR" in apex and "ANSWER: 1," in apex and re.search(r"IN\s+SOA\s", apex)
    assert not re.search(r"IN\s+NS\s", apex)
    cname = dig("ANY", "www.example.com")
    assert "ANSWER: 1," in cname and re.search(r"IN\s+CNAME\s", cname)
