"""The answer cache's wire pre-parser: table tests, and agreement with dnspython on seeded mutations."""

from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdatatype
import pytest

from edge.scheduler.wire import QueryView, parse_query, truncated_reply
from tests.test_dns_fuzz import mutate


def query(name: str = "www.example.com", rdtype: str = "A", qid: int = 0x1234, **make: object) -> bytes:
    message = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    message.id = qid
    return message.to_wire()


def with_opt(options: bytes, *, flags: int = 0, version: int = 0, payload: int = 1232, owner: bytes = b"\x00",
             rdlen: int | None = None, extended_rcode: int = 0) -> bytes:
    """A plain query plus an OPT record built by hand (ARCOUNT 1)."""
    wire = bytearray(query())
    wire[10:12] = b"\x00\x01"
    return bytes(wire) + owner + struct.pack("!HHBBHH", 41, payload, extended_rcode, version, flags,
                                             len(options) if rdlen is None else rdlen) + options


def option(code: int, body: bytes) -> bytes:
    return struct.pack("!HH", code, len(body)) + body


def ecs(family: int, srclen: int, address: bytes, scope: int = 0) -> bytes:
    return option(8, struct.pack("!HBB", family, srclen, scope) + address)


QNAME = b"\x03www\x07example\x03com\x00"
A_IN = b"\x00\x01\x00\x01"

ACCEPTED = [
    # (wire, expected view fields, why)
    (query(), dict(qkey=QNAME + A_IN, question_end=12 + len(QNAME) + 4, qtype=1, flags=0x0100, edns=False,
                   payload=0, do=False, ecs_family=0, ecs_srclen=0, ecs_address=b""), "plain query, RD set"),
    (query(use_edns=0, payload=4096, want_dnssec=True),
     dict(edns=True, payload=4096, do=True, ecs_family=0), "EDNS with DO"),
    (query(use_edns=0, options=[dns.edns.ECSOption("192.0.2.0", 24)]),
     dict(edns=True, ecs_family=1, ecs_srclen=24, ecs_address=b"\xc0\x00\x02"), "ECS IPv4 /24"),
    (query(use_edns=0, options=[dns.edns.ECSOption("2001:db8:1:200::", 56)]),
     dict(ecs_family=2, ecs_srclen=56, ecs_address=bytes.fromhex("20010db8000102")), "ECS IPv6 /56"),
    (query(use_edns=0, options=[dns.edns.ECSOption("192.0.2.128", 25)]),
     dict(ecs_family=1, ecs_srclen=25, ecs_address=b"\xc0\x00\x02\x80"), "ECS /25: a partial last byte"),
    (query(use_edns=0, options=[dns.edns.ECSOption("0.0.0.0", 0)]),
     dict(ecs_family=1, ecs_srclen=0, ecs_address=b""), "ECS source 0: use the packet's source"),
    (with_opt(option(10, bytes(8))), dict(edns=True, ecs_family=0), "a client cookie"),
    (with_opt(option(10, bytes(24)) + ecs(1, 16, b"\x0a\x01")), dict(ecs_family=1, ecs_srclen=16),
     "client and server cookie, then ECS"),
    (query("WwW.ExAmPlE.CoM"), dict(qkey=QNAME + A_IN), "0x20 case: the key is lower case"),
    (query(rdtype="HTTPS"), dict(qkey=QNAME + b"\x00\x41\x00\x01", qtype=65),
     "type 65 (0x41, 'A' in ASCII) is not lower-cased to 97"),
    (query(flags=dns.flags.RD | dns.flags.AD | dns.flags.CD), dict(flags=0x0130), "AD and CD set (dig sets AD)"),
    (query("."), dict(qkey=b"\x00" + A_IN, question_end=17), "the root name"),
]


@pytest.mark.parametrize("wire,expected,why", ACCEPTED, ids=[a[2] for a in ACCEPTED])
def test_plain_queries_are_read(wire: bytes, expected: dict, why: str) -> None:
    view = parse_query(wire)
    assert view is not None
    assert {key: getattr(view, key) for key in expected} == expected
    assert_agrees_with_dnspython(wire, view)


def long_name() -> bytes:
    return b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"    # 257 bytes: over 255


def replace_name(wire: bytes, name: bytes) -> bytes:
    return wire[:12] + name + wire[12 + len(QNAME):]


REFUSED = [
    # (wire, why): each goes to the full dnspython path
    (query()[:16], "shorter than a header and a question"),
    (bytes.fromhex("12348100") + query()[4:], "QR set: a response"),
    (query(flags=dns.flags.RD | dns.flags.TC), "TC set in a query"),
    (query(flags=dns.flags.AA), "AA set in a query"),
    (query(flags=0x0040), "the Z bit"),
    (query(flags=0x0001), "an RCODE in a query"),
    (bytes.fromhex("12342800") + query()[4:], "opcode UPDATE"),
    (query()[:4] + b"\x00\x02" + query()[6:] + QNAME + A_IN, "two questions"),
    (query()[:6] + b"\x00\x01" + query()[8:], "ANCOUNT 1"),
    (query()[:8] + b"\x00\x01" + query()[10:], "NSCOUNT 1"),
    (with_opt(b"")[:10] + b"\x00\x02" + with_opt(b"")[12:] + b"\x00\x00\x29" + bytes(8), "ARCOUNT 2"),
    (replace_name(query(), b"\xc0\x0c"), "a compression pointer as the name"),
    (replace_name(query(), b"\x03www\xc0\x0c"), "a pointer after a label"),
    (replace_name(query(), b"\x40" + b"a" * 64 + b"\x00"), "a label over 63"),
    (replace_name(query(), long_name()), "a name over 255 bytes"),
    (query()[:-1], "the question cut short"),
    (query() + b"\x00", "a byte after the question"),
    (with_opt(b"", owner=b"\x03www\x00"), "OPT owner is not the root"),
    (with_opt(b"", version=1), "EDNS version 1 (BADVERS, on the full path)"),
    (with_opt(b"", extended_rcode=1), "an extended RCODE in a query"),
    (with_opt(b"", flags=0x4000), "EDNS Z bits"),
    (with_opt(b"", rdlen=4), "RDLEN past the end"),
    (with_opt(b"") + b"\x00", "a byte after the OPT record"),
    (with_opt(option(3, b"")), "NSID: an option the hit path does not know"),
    (with_opt(option(12, bytes(20))), "padding: the answer would have to be padded"),
    (with_opt(ecs(1, 24, b"\x0a\x00\x00") + ecs(1, 24, b"\x0a\x00\x00")), "ECS twice"),
    (with_opt(option(10, bytes(8)) + option(10, bytes(8))), "a cookie twice"),
    (with_opt(ecs(3, 8, b"\x0a")), "ECS family 3"),
    (with_opt(ecs(1, 33, bytes(5))), "ECS source /33 for IPv4"),
    (with_opt(ecs(2, 129, bytes(17))), "ECS source /129 for IPv6"),
    (with_opt(ecs(1, 24, b"\x0a\x00\x00", scope=24)), "ECS scope set in a query"),
    (with_opt(ecs(1, 24, b"\x0a\x00\x00\x00")), "ECS address longer than its prefix"),
    (with_opt(ecs(1, 24, b"\x0a\x00")), "ECS address shorter than its prefix"),
    (with_opt(ecs(1, 25, b"\x0a\x00\x00\x81")), "ECS padding bits set past /25"),
    (with_opt(option(8, b"\x00\x01\x18")), "ECS shorter than its fixed part"),
    (with_opt(option(10, bytes(9))), "a cookie of 9 bytes"),
    (with_opt(option(10, bytes(41))), "a cookie of 41 bytes"),
    (with_opt(b"\x00\x08\x00"), "an option header cut short"),
    (with_opt(b"\x00\x08\x00\x09\x00\x01"), "an option longer than the OPT record"),
]


@pytest.mark.parametrize("wire,why", REFUSED, ids=[r[1] for r in REFUSED])
def test_anything_unusual_goes_to_the_full_path(wire: bytes, why: str) -> None:
    assert parse_query(wire) is None


def assert_agrees_with_dnspython(wire: bytes, view: QueryView) -> None:
    """What the pre-parser read is what dnspython reads from the same bytes."""
    message = dns.message.from_wire(wire)
    (question,) = message.question
    assert view.qkey == question.name.to_wire().lower() + struct.pack("!HH", question.rdtype, question.rdclass)
    assert view.question_end == 12 + len(question.name.to_wire()) + 4
    assert view.qtype == question.rdtype
    assert view.flags == message.flags and message.opcode() == dns.opcode.QUERY
    assert view.edns == (message.edns == 0) and not message.answer and not message.authority
    assert view.payload == (message.payload if message.edns == 0 else 0)
    assert view.do == bool(message.ednsflags & dns.flags.DO)
    ecs_options = [o for o in message.options if o.otype == dns.edns.OptionType.ECS]
    if view.ecs_family:
        (option_,) = ecs_options
        assert (view.ecs_family, view.ecs_srclen, view.ecs_address) == (
            option_.family, option_.srclen, option_.addrdata)
    else:
        assert not ecs_options


def test_whatever_the_pre_parser_reads_dnspython_reads_alike() -> None:
    """Seeded mutations of valid queries (the fuzz test's): never a packet dnspython refuses or reads otherwise."""
    rng = random.Random(20261211)
    read = 0
    for _ in range(20000):
        wire = mutate(rng)
        view = parse_query(wire)
        if view is not None:
            assert_agrees_with_dnspython(wire, view)
            read += 1
    # Enough of them were plain queries for the comparison to mean something.
    assert read > 1000, read


@pytest.mark.parametrize("wire", [query(), query("WwW.eXample.COM", "AAAA", use_edns=0, want_dnssec=True),
                                  query(flags=0, use_edns=0, options=[dns.edns.ECSOption("192.0.2.0", 24)])])
def test_a_slip_is_an_empty_truncated_answer_with_the_question(wire: bytes) -> None:
    view = parse_query(wire)
    assert view is not None
    reply = truncated_reply(wire, view)
    message = dns.message.from_wire(reply)
    original = dns.message.from_wire(wire)
    assert message.id == original.id
    assert message.flags & dns.flags.QR and message.flags & dns.flags.TC
    assert message.flags & dns.flags.RD == original.flags & dns.flags.RD
    assert message.question == original.question and message.question[0].name.labels == \
        original.question[0].name.labels                 # its case kept
    assert not message.answer and not message.authority and not message.additional
    assert len(reply) <= len(wire)                       # no amplification
    assert dns.rdatatype.to_text(message.question[0].rdtype) in ("A", "AAAA")
