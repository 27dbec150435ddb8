"""Fuzzing the DNS scheduler: seeded mutations of valid queries against a real `edge run dns`.

The scheduler runs as its own process on 127.0.83.5:8053 (its L1s are in
the topology but not started: every answer takes the "all down" path,
which renders edges all the same).  A few thousand mutated queries go over
UDP, a few hundred over TCP, and for every one:

* a reply, if any, is a DNS message with the query's ID and QR set, never
  SERVFAIL (the scheduler's "I broke" answer), and within the UDP size;
* a packet dnspython cannot parse gets FORMERR or nothing; a packet shorter
  than a header, or with QR set, gets nothing;

and afterwards the scheduler is still running, answers a valid query over
UDP and TCP, has counted no SERVFAIL, and has logged no traceback.

UDP replies are matched to their packets without waiting for timeouts: the
server answers the datagrams of one socket in order, so each mutated packet
is followed by a sentinel query (a name of its own), and whatever arrives
before the sentinel's answer belongs to the mutated packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdataclass
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from edge.scheduler.answer import UDP_PAYLOAD
from tests.cluster import EAST_WEST_REGIONS, Cluster

NET = "83"
DNS_HOST, DNS_PORT = "127.0.83.5", 8053
CLIENT = "127.0.83.100"
SEED = 20261210
UDP_CASES, TCP_CASES = 3000, 300
UDP_WINDOW = 25                 # (case, sentinel) pairs in flight: their replies fit a socket buffer
UDP_MAX = UDP_PAYLOAD           # the scheduler's EDNS payload: no UDP reply is bigger

SCHEDULER = f"""
{EAST_WEST_REGIONS}[coverage]
"127.0.83.0/25" = "east"
"127.0.83.128/25" = "west"
"2001:db8::/32" = "west"
[dns]
listen = "{DNS_HOST}:{DNS_PORT}"
admin = "{DNS_HOST}:8091"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
default_region = "east"
tcp_max_per_network = 50        # the TCP fuzz opens 50 connections at once from one address
[dns.health]
interval = 5.0
timeout = 0.5
# Thousands of packets a second from one address: rate limiting would drop the
# sentinels (test_dns_rrl.py tests it); here every packet must reach the parser.
[dns.rrl]
rate = 0
"""


# --------------------------------------------------------------------------- what is mutated

def _query(name: str, rdtype: str, qid: int, **edns: object) -> bytes:
    query = dns.message.make_query(name, rdtype, **edns)  # type: ignore[arg-type]
    query.id = qid
    return query.to_wire()


def _signed(name: str, qid: int) -> bytes:
    """A query signed with a TSIG key the scheduler does not have."""
    query = dns.message.make_query(name, "A")
    query.id = qid
    query.use_tsig(dns.tsigkeyring.from_text({"fuzz-key.": "c2VjcmV0c2VjcmV0c2VjcmV0"}), keyname="fuzz-key.")
    return query.to_wire()


def _with_sections(qid: int) -> bytes:
    """Two questions, and records in the answer and authority sections, as no query has them."""
    query = dns.message.make_query("www.example.com", "A")
    query.id = qid
    query.question.append(dns.rrset.RRset(dns.name.from_text("example.com"), dns.rdataclass.IN,
                                          dns.rdatatype.SOA))
    query.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "192.0.2.1"))
    query.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "NS", "ns.example.org."))
    return query.to_wire()


COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8)))
FUZZ_BASES = [
    _query("www.example.com", "A", 0x1001),
    _query("www.example.com", "A", 0x1002, use_edns=0, options=[dns.edns.ECSOption("127.0.83.128", 25)]),
    _query("www.example.com.cdn.example.net", "AAAA", 0x1003, use_edns=0, want_dnssec=True),
    _query("example.com", "SOA", 0x1004, use_edns=0, options=[COOKIE]),
    _query("example.com", "NS", 0x1005),
    _query("nope.example.com", "ANY", 0x1006, use_edns=0, options=[dns.edns.ECSOption("2001:db8::", 56)]),
    _query("www.google.com", "TXT", 0x1007),
    _signed("www.example.com", 0x1008),
    _with_sections(0x1009),
]
# Header and question only (ARCOUNT 0), for the mutations that bring their own OPT record.
QUESTIONS = [_query(name, rdtype, 0x2000 + i) for i, (name, rdtype) in enumerate(
    [("www.example.com", "A"), ("www.example.com.cdn.example.net", "AAAA"), ("example.com", "SOA")])]
QNAME_AT = 12                   # the question name follows the 12-byte header


def flip_bits(rng: random.Random, wire: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        where = rng.randrange(len(wire) * 8)
        wire[where // 8] ^= 0x80 >> (where % 8)
    return wire


def header_bits(rng: random.Random, wire: bytearray) -> bytearray:
    """Other opcodes, rcodes and flags (TC, AA, RD, Z, AD, CD) on a query that still parses."""
    flags = int.from_bytes(wire[2:4], "big") & ~0x8000
    flags ^= rng.choice((0x7800, 0x0800, 0x1000, 0x2000, 0x0400, 0x0200, 0x0100, 0x0040, 0x0020, 0x0010,
                         0x000F, rng.randrange(0x8000)))
    wire[2:4] = (flags & 0x7FFF).to_bytes(2, "big")
    return wire


def question_type(rng: random.Random, wire: bytearray) -> bytearray:
    """Any type and class in the question: ANY, AXFR, IXFR, CH, NONE, unknown ones."""
    end = QNAME_AT
    while end < len(wire) and wire[end] != 0:
        end += wire[end] + 1
    rdtype = rng.choice((1, 2, 5, 6, 16, 28, 41, 251, 252, 255, 65535, rng.randrange(0x10000)))
    rdclass = rng.choice((1, 1, 3, 4, 254, 255, rng.randrange(0x10000)))
    wire[end + 1:end + 5] = struct.pack("!HH", rdtype, rdclass)
    return wire


def valid_ecs(rng: random.Random, wire: bytearray) -> bytearray:
    """A well-formed client subnet anywhere, any prefix length, any scope: it must be answered."""
    if rng.random() < 0.5:
        address, bits = str(ipaddress.IPv4Address(rng.randrange(1 << 32))), 32
    else:
        address, bits = str(ipaddress.IPv6Address(rng.randrange(1 << 128))), 128
    query = dns.message.from_wire(rng.choice(QUESTIONS))
    source = rng.randint(0, bits)
    network = ipaddress.ip_network(f"{address}/{source}", strict=False)
    query.use_edns(0, rng.choice((0, dns.flags.DO)), rng.choice((512, 1232, 65535)), options=[
        dns.edns.ECSOption(str(network.network_address), source, rng.choice((0, rng.randint(0, bits))))])
    return bytearray(query.to_wire())


def truncate(rng: random.Random, wire: bytearray) -> bytearray:
    return wire[:rng.randrange(len(wire))]


def random_bytes(rng: random.Random, wire: bytearray) -> bytearray:
    noise = bytearray(rng.randbytes(rng.randrange(0, 600)))
    if len(noise) > 2 and rng.random() < 0.75:
        noise[2] &= 0x7F                 # mostly queries (QR clear), or the server just drops them
    return noise


def overwrite(rng: random.Random, wire: bytearray) -> bytearray:
    start = rng.randrange(len(wire))
    end = min(len(wire), start + rng.randint(1, 16))
    wire[start:end] = rng.randbytes(end - start)
    return wire


def wrong_counts(rng: random.Random, wire: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        at = 4 + 2 * rng.randrange(4)    # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
        wire[at:at + 2] = rng.choice((0, 1, 2, 3, 255, 0xFFFF, rng.randrange(0x10000))).to_bytes(2, "big")
    return wire


def huge_label(rng: random.Random, wire: bytearray) -> bytearray:
    """A label length over 63 (or a reserved 01/10 label type) at one of the name's labels."""
    if len(wire) <= QNAME_AT:
        return wire
    starts, at = [], QNAME_AT
    while at < len(wire) and 0 < wire[at] < 64:
        starts.append(at)
        at += wire[at] + 1
    wire[rng.choice(starts or [QNAME_AT])] = rng.choice((63, 64, 65, 100, 127, 128, 191, 255))
    return wire


def compression_loop(rng: random.Random, wire: bytearray) -> bytearray:
    """The question name made of pointers: to itself, in a cycle, into the header, past the end."""
    end = QNAME_AT
    while end < len(wire) and wire[end] != 0:
        end += wire[end] + 1
    rest = wire[end + 1:]                                  # qtype, qclass and whatever follows
    loop = rng.choice((
        b"\xc0\x0c",                                       # points at itself
        b"\x03www\xc0\x0c",                                # a label, then back to the start
        b"\xc0\x0e\xc0\x0c",                               # two pointers at each other
        b"\x01a" * 3 + b"\xc0\x10",                        # into its own middle
        bytes([0xC0, rng.randrange(12)]),                  # into the header
        struct.pack("!H", 0xC000 | rng.randrange(len(wire), 0x4000)),   # past the end
    ))
    return wire[:QNAME_AT] + loop + rest


def _with_opt(rng: random.Random, question: bytes, options: bytes, *, owner: bytes = b"\x00",
              rdlen: int | None = None) -> bytearray:
    """`question` plus an OPT record carrying `options` (ARCOUNT set to 1)."""
    wire = bytearray(question)
    wire[10:12] = b"\x00\x01"
    flags = rng.choice((0, 0, 0x8000, rng.randrange(0x10000)))           # DO, or junk in the Z bits
    version = rng.choice((0, 0, 0, 1, 255))
    wire += owner + struct.pack("!HHBBHH", dns.rdatatype.OPT, rng.choice((512, 1232, 4096, 0, 0xFFFF)),
                                0, version, flags, len(options) if rdlen is None else rdlen)
    return wire + options


def edns_garbage(rng: random.Random, wire: bytearray) -> bytearray:
    """OPT records with random options, lengths that overrun, a name that is not the root, or two OPTs."""
    options = b""
    for _ in range(rng.randint(1, 4)):
        body = rng.randbytes(rng.randrange(0, 40))
        length = rng.choice((len(body), len(body), len(body) + rng.randint(1, 30), max(0, len(body) - 3)))
        options += struct.pack("!HH", rng.choice((rng.randrange(0x10000), 8, 10, 12, 15)), length) + body
    question = rng.choice(QUESTIONS)
    kind = rng.randrange(4)
    if kind == 0:
        return _with_opt(rng, question, options)
    if kind == 1:
        return _with_opt(rng, question, options, rdlen=len(options) + rng.choice((-2, -1, 1, 7, 300)))
    if kind == 2:
        return _with_opt(rng, question, options, owner=b"\x03www\x00")
    twice = _with_opt(rng, question, options)
    twice[10:12] = b"\x00\x02"
    return twice + twice[len(question):]                    # the same OPT record again


def bad_ecs(rng: random.Random, wire: bytearray) -> bytearray:
    """EDNS Client Subnet with bad families, prefix lengths past the family, address bytes too many or few."""
    family = rng.choice((1, 1, 2, 2, 0, 3, 0xFFFF))
    source = rng.choice((0, 24, 32, 33, 56, 128, 129, 200, 255, rng.randrange(256)))
    scope = rng.choice((0, 0, 24, 64, 255))
    needed = (source + 7) // 8
    address = rng.randbytes(rng.choice((needed, needed, max(0, needed - 1), needed + 1, 16, 0)))
    body = struct.pack("!HBB", family, source, scope) + address
    ecs = struct.pack("!HH", dns.edns.OptionType.ECS, len(body)) + body
    return _with_opt(rng, rng.choice(QUESTIONS), ecs + (ecs if rng.random() < 0.1 else b""))


def splice(rng: random.Random, wire: bytearray) -> bytearray:
    """A piece of another query repeated or inserted somewhere."""
    other = rng.choice(FUZZ_BASES)
    start = rng.randrange(len(other))
    piece = other[start:start + rng.randint(1, 40)] * rng.choice((1, 1, 2, 50))
    where = rng.randrange(len(wire) + 1)
    return wire[:where] + piece + wire[where:]


MUTATIONS: list[Callable[[random.Random, bytearray], bytearray]] = [
    flip_bits, flip_bits, header_bits, question_type, valid_ecs, truncate, random_bytes, overwrite,
    wrong_counts, wrong_counts, huge_label, compression_loop, compression_loop, edns_garbage, edns_garbage,
    bad_ecs, bad_ecs, bad_ecs, splice,
]


def mutate(rng: random.Random) -> bytes:
    wire = bytearray(rng.choice(FUZZ_BASES))
    for _ in range(rng.choice((1, 1, 1, 2))):
        wire = rng.choice(MUTATIONS)(rng, wire)
        if not wire:
            break
    return bytes(wire)


# --------------------------------------------------------------------------- what a reply must be

@dataclass
class Outcomes:
    """What the fuzz saw: counts per kind of reply, and every broken promise."""

    dropped: int = 0
    formerr: int = 0
    answered: int = 0
    problems: list[str] = field(default_factory=list)


def parses(wire: bytes) -> bool:
    try:
        dns.message.from_wire(wire)
        return True
    except Exception:                  # whatever dnspython refuses is malformed for this test
        return False


def check(case: bytes, replies: list[bytes], outcomes: Outcomes, *, limit: int) -> None:
    """Judge the replies to one mutated message; broken promises go to `outcomes.problems`."""
    if not replies:
        outcomes.dropped += 1
        return
    if len(replies) > 1:
        outcomes.problems.append(f"{len(replies)} replies to {case.hex()}")
    reply = replies[0]
    if len(case) < 12 or case[2] & 0x80:
        outcomes.problems.append(f"answered a short packet or a response: {case.hex()}")
    if len(reply) > limit:
        outcomes.problems.append(f"{len(reply)}-byte reply over {limit} to {case.hex()}")
    try:
        message = dns.message.from_wire(reply)
    except Exception as exc:
        outcomes.problems.append(f"unparseable reply ({exc}) {reply.hex()} to {case.hex()}")
        return
    rcode = message.rcode()
    if message.id != int.from_bytes(case[:2], "big") or not message.flags & dns.flags.QR:
        outcomes.problems.append(f"reply id {message.id:#06x} flags {message.flags:#06x} to {case.hex()}")
    if rcode == dns.rcode.SERVFAIL:
        outcomes.problems.append(f"SERVFAIL (an internal error) for {case.hex()}")
    elif rcode == dns.rcode.FORMERR:
        outcomes.formerr += 1
    elif not parses(case):
        outcomes.problems.append(f"{dns.rcode.to_text(rcode)}, not FORMERR, for malformed {case.hex()}")
    else:
        outcomes.answered += 1


# --------------------------------------------------------------------------- the scheduler

@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    cluster = Cluster.create(tmp_path_factory.mktemp("dns-fuzz"), NET, l1=2, l1_regions=("east", "west"),
                             extra=SCHEDULER)
    try:
        cluster.start("dns")
        yield cluster.node("dns")
    finally:
        cluster.stop_all()


def sentinel(index: int) -> tuple[bytes, dns.name.Name]:
    query = dns.message.make_query(f"sentinel-{index}.example.com", "A")
    query.id = index & 0xFFFF
    return query.to_wire(), query.question[0].name


def udp_fuzz(cases: list[bytes]) -> list[list[bytes]]:
    """Send every case followed by its sentinel; return the replies that came before each sentinel's."""
    replies: list[list[bytes]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((CLIENT, 0))
        sock.settimeout(3)
        for start in range(0, len(cases), UDP_WINDOW):
            window = range(start, min(start + UDP_WINDOW, len(cases)))
            names = {}
            for i in window:
                sock.sendto(cases[i], (DNS_HOST, DNS_PORT))
                wire, names[i] = sentinel(i)
                sock.sendto(wire, (DNS_HOST, DNS_PORT))
            for i in window:
                got: list[bytes] = []
                while True:
                    try:
                        data = sock.recv(65535)
                    except TimeoutError:
                        raise AssertionError(f"no answer to sentinel {i}: the scheduler stopped answering "
                                             f"after {cases[i].hex()}") from None
                    if is_sentinel(data, names[i]):
                        break
                    got.append(data)
                replies.append(got)
    return replies


def is_sentinel(data: bytes, name: dns.name.Name) -> bool:
    try:
        message = dns.message.from_wire(data)
    except Exception:
        return False
    return bool(message.question) and message.question[0].name == name


def framed(messages: list[bytes], rng: random.Random) -> tuple[bytes, list[bytes]]:
    """The TCP byte stream for `messages` (now and then with a wrong length), and the messages the server will read."""
    stream, frames = b"", []
    for message in messages:
        length = len(message)
        if rng.random() < 0.1:
            length = max(0, length + rng.choice((-5, -1, 1, 40)))
        stream += length.to_bytes(2, "big") + message
    rest = stream
    while len(rest) >= 2:
        length = int.from_bytes(rest[:2], "big")
        if len(rest) - 2 < length:
            break                                              # cut short: the server gets EOF mid-message
        frames.append(rest[2:2 + length])
        rest = rest[2 + length:]
    return stream, frames


async def tcp_exchange(stream: bytes) -> list[bytes]:
    """Write `stream`, half-close, and read framed replies until the server hangs up."""
    reader, writer = await asyncio.open_connection(DNS_HOST, DNS_PORT, local_addr=(CLIENT, 0))
    replies = []
    try:
        writer.write(stream)
        writer.write_eof()
        async with asyncio.timeout(5):
            while True:
                try:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    replies.append(await reader.readexactly(size))
                except asyncio.IncompleteReadError as exc:
                    assert not exc.partial, f"a reply cut short: {exc.partial.hex()}"
                    return replies
    except ConnectionResetError:
        return replies
    finally:
        writer.close()


def tcp_fuzz(conversations: list[bytes]) -> list[list[bytes]]:
    async def run_all() -> list[list[bytes]]:
        results: list[list[bytes]] = []
        for start in range(0, len(conversations), 50):
            results += await asyncio.gather(*(tcp_exchange(s) for s in conversations[start:start + 50]))
        return results
    return asyncio.run(run_all())


def answers_a_valid_query() -> None:
    query = dns.message.make_query("www.example.com", "A")
    for ask in (dns.query.udp, dns.query.tcp):
        response = ask(query, DNS_HOST, timeout=3, port=DNS_PORT, source=CLIENT)
        assert response.rcode() == dns.rcode.NOERROR
        assert [rr.address for rrset in response.answer[1:] for rr in rrset] == ["127.0.83.31", "127.0.83.32"]


def test_fuzzed_queries_get_formerr_or_an_answer_or_nothing_and_never_stop_the_scheduler(scheduler) -> None:
    """Seeded mutations of valid queries over UDP and TCP: never a SERVFAIL, a bad reply or a traceback."""
    rng = random.Random(SEED)
    answers_a_valid_query()

    udp_cases = [mutate(rng) for _ in range(UDP_CASES)]
    udp = Outcomes()
    for case, replies in zip(udp_cases, udp_fuzz(udp_cases)):
        check(case, replies, udp, limit=UDP_MAX)

    conversations = [framed([mutate(rng) for _ in range(rng.randint(1, 3))], rng) for _ in range(TCP_CASES)]
    tcp = Outcomes()
    for (stream, frames), replies in zip(conversations, tcp_fuzz([s for s, _ in conversations])):
        if len(replies) > len(frames):
            tcp.problems.append(f"{len(replies)} replies to {len(frames)} messages: {stream.hex()}")
        for frame, reply in zip(frames, replies):
            check(frame, [reply], tcp, limit=65535)
        tcp.dropped += len(frames) - len(replies)

    assert udp.problems == [] and tcp.problems == [], (udp.problems + tcp.problems)[:10]
    # The fuzz reached every path (dropped, refused as malformed, parsed and answered), each
    # for at least 1% of the messages: a fuzz that only ever hits one path proves little.
    assert min(udp.dropped, udp.formerr, udp.answered) >= UDP_CASES // 100, udp
    assert min(tcp.dropped, tcp.formerr, tcp.answered) >= TCP_CASES // 100, tcp

    assert scheduler.proc is not None and scheduler.proc.poll() is None, "the scheduler exited"
    answers_a_valid_query()
    metrics = scheduler.metrics()
    assert 'rcode="SERVFAIL"' not in metrics, [line for line in metrics.splitlines() if "SERVFAIL" in line]
    log = scheduler.log.read_text(errors="replace")
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000):][:6000]
