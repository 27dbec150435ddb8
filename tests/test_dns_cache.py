"""The answer cache, without sockets: what shares an entry, what does not, and that a hit is the full path's answer.

Two schedulers of one topology answer the same packets through the
transport's packet handler: one with the answer cache, one with it off (the
full dnspython path every time).  Every reply of the first must be byte for
byte the second's, and the cache's hit count says whether the key put two
queries together.
"""

from __future__ import annotations

import random
import tracemalloc

import dns.edns
import dns.flags
import dns.message
import dns.rdatatype
import pytest

from edge.scheduler.cache import ENTRY_OVERHEAD, AnswerCache
from edge.scheduler.health import ProbeResult
from edge.scheduler.server import NO_EDNS_LIMIT
from edge.scheduler.service import Scheduler
from tests.test_dns_answer import EAST, EAST2, WEST, topology
from tests.test_dns_server import many_edges_topology

EAST_A, EAST_B = "127.0.11.1", "127.0.11.200"      # one coverage block (east)
EAST_NESTED = "127.0.12.200"                        # another block of the same region (the east /25)
WEST_A = "127.0.12.1"


class Pair:
    """A cached scheduler and an uncached one (the reference), fed the same packets and health."""

    def __init__(self, topo=None):
        topo = topo or topology(answers=2)
        self.cached, self.reference = Scheduler(topo), Scheduler(topo)
        self.reference.server.cache = AnswerCache(0)

    def ask(self, wire: bytes, source: str = EAST_A, tcp: bool = False) -> bytes:
        replies = []
        for scheduler in (self.cached, self.reference):
            server = scheduler.server
            if tcp:
                replies.append(server.handle_tcp(wire, source, server.sources.get(source)))
            else:
                replies.append(server.handle_udp(wire, source))
        assert replies[0] == replies[1], "a cache hit differs from the full path's answer"
        assert replies[0] is not None
        return replies[0]

    def health(self, **results: ProbeResult) -> None:
        for scheduler in (self.cached, self.reference):
            checker = scheduler.health
            checker.fold([results.get(edge.name, ProbeResult(True)) for edge in checker.edges], now=0.0)

    @property
    def hits(self) -> int:
        return self.cached.server.cache.hits


def wire(name: str = "www.example.com", rdtype: str = "A", qid: int | None = None, ecs: str | None = None,
         **make: object) -> bytes:
    options = list(make.pop("options", []))  # type: ignore[call-overload]
    if ecs is not None:
        options.append(dns.edns.ECSOption.from_text(ecs))
    if options:
        make.setdefault("use_edns", 0)
    query = dns.message.make_query(name, rdtype, options=options or None, **make)  # type: ignore[arg-type]
    query.id = qid if qid is not None else random.Random(name + rdtype + str(make)).randrange(65536)
    return query.to_wire()


def addresses(reply: bytes) -> list[str]:
    message = dns.message.from_wire(reply)
    return [rr.address for rrset in message.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rr in rrset]


COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8)))

SHARED = [
    # (first, second, why): the second query is answered from the first one's entry
    ((wire(qid=1), EAST_A), (wire(qid=2), EAST_A), "another ID"),
    ((wire("www.example.com"), EAST_A), (wire("WwW.ExAmPlE.cOm"), EAST_A), "0x20: another case"),
    ((wire(), EAST_A), (wire(), EAST_B), "two clients of one coverage block"),
    ((wire(), EAST_A), (wire(), EAST_NESTED), "two blocks of one region: the answer depends on the region"),
    ((wire(flags=dns.flags.RD), EAST_A), (wire(flags=dns.flags.RD | dns.flags.AD), EAST_A), "AD is not echoed"),
    ((wire(use_edns=0, payload=4096), EAST_A), (wire(use_edns=0, payload=1232), EAST_A),
     "EDNS 4096 and 1232: both get at most our 1232"),
    ((wire(ecs="127.0.11.5/32"), WEST_A), (wire(ecs="127.0.11.9/32"), WEST_A),
     "two client subnets of one block: same place and scope, each echoed as sent"),
    ((wire(use_edns=0), EAST_A), (wire(options=[COOKIE]), EAST_A), "a cookie changes nothing"),
    ((wire("nope.example.com"), EAST_A), (wire("NOPE.example.com"), EAST_B), "NXDOMAIN: 0x20"),
]


@pytest.mark.parametrize("first,second,why", SHARED, ids=[s[2] for s in SHARED])
def test_queries_that_get_one_answer_share_an_entry(first: tuple, second: tuple, why: str) -> None:
    pair = Pair()
    one = pair.ask(*first)
    assert pair.hits == 0
    two = pair.ask(*second)
    assert pair.hits == 1, why
    assert addresses(one) == addresses(two)
    assert dns.message.from_wire(two).question == dns.message.from_wire(second[0]).question


APART = [
    # (first, second, why): the second query needs an entry of its own
    ((wire(), EAST_A), (wire(), WEST_A), "blocks of two regions"),
    ((wire(ecs="127.0.11.0/24"), WEST_A), (wire(ecs="127.0.12.128/25"), WEST_A),
     "subnets of one region, scopes 24 and 25"),
    ((wire(ecs="127.0.11.0/24"), WEST_A), (wire(ecs="127.0.11.0/25"), WEST_A), "source /24 and /25"),
    ((wire(ecs="127.0.11.0/24"), EAST_A), (wire(use_edns=0), EAST_A), "a subnet and none"),
    ((wire(ecs="127.0.11.0/24"), EAST_A), (wire(ecs="::/0"), EAST_A), "an IPv4 subnet and an IPv6 /0"),
    ((wire(use_edns=0), EAST_A), (wire(), EAST_A), "EDNS and none"),
    ((wire(use_edns=0, payload=512), EAST_A), (wire(), EAST_A), "EDNS 512 and none: the OPT record"),
    ((wire(use_edns=0, payload=512), EAST_A), (wire(use_edns=0, payload=1232), EAST_A), "size classes"),
    ((wire(flags=dns.flags.RD), EAST_A), (wire(flags=0), EAST_A), "RD is echoed"),
    ((wire(flags=0), EAST_A), (wire(flags=dns.flags.CD), EAST_A), "CD"),
    ((wire(use_edns=0), EAST_A), (wire(use_edns=0, want_dnssec=True), EAST_A), "DO"),
    ((wire(rdtype="A"), EAST_A), (wire(rdtype="AAAA"), EAST_A), "another type"),
    ((wire("www.example.com"), EAST_A), (wire("www.example.com.cdn.example.net"), EAST_A), "another name"),
]


@pytest.mark.parametrize("first,second,why", APART, ids=[a[2] for a in APART])
def test_queries_whose_answers_may_differ_do_not_share(first: tuple, second: tuple, why: str) -> None:
    pair = Pair()
    pair.ask(*first)
    pair.ask(*second)
    assert pair.hits == 0, why
    pair.ask(*second)
    assert pair.hits == 1                                  # the second has its own entry now


def test_udp_and_tcp_do_not_share_and_both_hit() -> None:
    pair = Pair()
    pair.ask(wire(), EAST_A)
    pair.ask(wire(), EAST_A, tcp=True)
    assert pair.hits == 0
    pair.ask(wire(qid=9), EAST_B, tcp=True)
    pair.ask(wire(qid=9), EAST_B)
    assert pair.hits == 2


def test_a_client_subnet_is_echoed_as_each_query_sent_it() -> None:
    pair = Pair()
    for subnet in ("127.0.11.5/32", "127.0.11.9/32", "127.0.11.77/32"):
        (echo,) = dns.message.from_wire(pair.ask(wire(ecs=subnet), WEST_A)).options
        assert (echo.address, echo.srclen, echo.scopelen) == (subnet.split("/")[0], 32, 24)
    assert pair.hits == 2


DOWN, UP = ProbeResult(False, error="refused"), ProbeResult(True)


def test_a_health_change_moves_the_generation_and_the_answer_and_a_probe_round_does_not() -> None:
    pair = Pair()
    assert addresses(pair.ask(wire(), EAST_A)) == [EAST, EAST2]
    generation = pair.cached.generation
    pair.health(**{"l1-east": ProbeResult(True, inflight=3, max_inflight=10)})     # a round: nothing moved
    assert pair.cached.generation == generation
    assert addresses(pair.ask(wire(), EAST_A)) == [EAST, EAST2] and pair.hits == 1
    pair.health(**{"l1-east": DOWN})                       # one failed probe of fall = 2: still up
    assert pair.cached.generation == generation
    pair.health(**{"l1-east": DOWN})
    assert pair.cached.generation == generation + 1
    assert addresses(pair.ask(wire(), EAST_A)) == [EAST2, WEST] and pair.hits == 1
    pair.health(**{"l1-east": ProbeResult(True, overloaded=True), "l1-east2": DOWN})
    pair.health(**{"l1-east": ProbeResult(True, overloaded=True), "l1-east2": DOWN})  # rise = 2
    assert addresses(pair.ask(wire(), EAST_A)) == [WEST, EAST]
    pair.health(**{"l1-east": UP, "l1-east2": DOWN})     # overloaded no more: the generation moves
    assert addresses(pair.ask(wire(), EAST_A)) == [EAST, WEST]
    assert pair.hits == 1


def test_size_classes_keep_a_truncated_answer_from_a_client_that_can_take_it_all() -> None:
    pair = Pair(many_edges_topology(40))
    small = pair.ask(wire(flags=0), EAST_A)
    assert len(small) <= NO_EDNS_LIMIT and dns.message.from_wire(small).flags & dns.flags.TC
    big = pair.ask(wire(flags=0, use_edns=0), EAST_A)
    assert len(addresses(big)) == 40 and pair.hits == 0
    again = pair.ask(wire(flags=0, qid=77), EAST_B)
    assert pair.hits == 1 and len(again) <= NO_EDNS_LIMIT and not addresses(again)


def test_any_is_one_rrset_from_the_cache_too() -> None:
    pair = Pair()
    for qid in (1, 2):
        message = dns.message.from_wire(pair.ask(wire("www.example.com.cdn.example.net", "ANY", qid=qid)))
        assert [dns.rdatatype.to_text(r.rdtype) for r in message.answer] == ["A"]
    assert pair.hits == 1


def random_query(rng: random.Random) -> tuple[bytes, str]:
    name = rng.choice(["www.example.com", "www.example.com.cdn.example.net", "example.com", "example.org",
                       "nope.example.com", "www.google.com", "ns1.cdn.example.net"])
    name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
    rdtype = rng.choice(["A", "A", "A", "AAAA", "ANY", "SOA", "NS", "TXT", "CNAME"])
    make: dict = {"flags": rng.choice([0, dns.flags.RD, dns.flags.RD | dns.flags.AD, dns.flags.CD])}
    options = []
    if rng.random() < 0.6:
        make.update(use_edns=0, payload=rng.choice([512, 700, 1232, 4096]), want_dnssec=rng.random() < 0.3)
        if rng.random() < 0.5:
            if rng.random() < 0.7:
                address = f"127.0.{rng.choice([11, 12, 13, 99])}.{rng.randrange(256)}"
                options.append(dns.edns.ECSOption(address, rng.choice([0, 8, 16, 20, 24, 25, 32])))
            else:
                options.append(dns.edns.ECSOption(f"2001:db8:{rng.randrange(65536):x}::", rng.choice([0, 32, 56])))
        if rng.random() < 0.3:
            options.append(COOKIE)
    query = dns.message.make_query(name, rdtype, options=options or None, **make)
    query.id = rng.randrange(65536)
    source = rng.choice([EAST_A, EAST_B, EAST_NESTED, WEST_A, "127.0.13.4", "10.1.2.3", "2001:db8::7", "::1"])
    return query.to_wire(), source


def test_random_queries_from_the_cache_are_byte_for_byte_the_full_paths() -> None:
    rng = random.Random(20261212)
    pair = Pair()
    states = [{}, {"l1-east": DOWN}, {"l1-west": ProbeResult(True, overloaded=True)}, {"l1-east2": DOWN}]
    for i in range(6000):
        if i % 1000 == 999:
            pair.health(**rng.choice(states))
            pair.health(**rng.choice(states))
        query, source = random_query(rng)
        pair.ask(query, source, tcp=rng.random() < 0.1)
    # The queries repeat (few names, places and sizes): many were hits, each checked against the full path.
    assert pair.hits > 1000, pair.hits
    assert pair.cached.server.uncacheable == 0


def test_the_charge_per_entry_covers_what_it_really_costs() -> None:
    """ENTRY_OVERHEAD plus the bytes is at least what an entry takes in memory (tracemalloc)."""
    cache = AnswerCache(2**30)
    rng = random.Random(5)
    keys = [(bytes(rng.randrange(97, 123) for _ in range(30)) + b"\x00\x00\x01\x00\x01", 1 << 18, "east", 0)
            for _ in range(20000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:
        cache.put(key, bytes(10), bytes(rng.randrange(40, 120)), None)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # The keys existed before; a real entry also pays for its key (counted in the charge).
    key_bytes = sum(len(k[0]) + 33 + 8 * len(k) + 40 for k in keys)
    assert used + key_bytes <= cache.bytes, (used + key_bytes) / len(keys)
    assert cache.bytes < 2.5 * (used + key_bytes)          # and not wildly pessimistic
    assert ENTRY_OVERHEAD >= 256


def test_the_cache_stays_within_its_bytes_and_evicts_the_least_recently_used() -> None:
    cache = AnswerCache(100 * (ENTRY_OVERHEAD + 50))
    keys = [(f"n{i:04d}".encode() + b"\x00", 0, None, 0) for i in range(1000)]
    for i, key in enumerate(keys):
        cache.put(key, bytes(10), bytes(35), i)
        if i >= 1:
            assert cache.get(keys[0]) is not None             # kept warm: never the one evicted
        assert cache.bytes <= cache.max_bytes
    assert 90 <= cache.entries <= 100 and cache.evictions == 1000 - cache.entries
    assert cache.get(keys[1]) is None and cache.get(keys[-1]) is not None


def test_a_packet_repeated_byte_for_byte_is_answered_without_being_read_again() -> None:
    pair = Pair()
    cache = pair.cached.server.cache
    pair.ask(wire(qid=1), EAST_A)                          # a miss: one entry (the answer's template)
    pair.ask(wire(qid=2), EAST_A)                          # a hit: the packet is kept as well
    assert (pair.hits, cache.entries) == (1, 2)
    pair.ask(wire(qid=3), EAST_B)                          # the same packet from the same place
    assert (pair.hits, cache.entries) == (2, 2)
    pair.ask(wire(qid=4), WEST_A)                          # another place: neither entry applies
    assert (pair.hits, cache.entries) == (2, 3)
    pair.health(**{"l1-east": DOWN})
    pair.health(**{"l1-east": DOWN})                       # a new generation: neither applies either
    assert addresses(pair.ask(wire(qid=5), EAST_A)) == [EAST2, WEST]
    assert pair.hits == 2


def test_names_in_random_case_share_the_answer_but_keep_no_repeated_packets() -> None:
    pair = Pair()
    rng = random.Random(3)
    for qid in range(50):
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in "www.example.com")
        pair.ask(wire(name, qid=qid), EAST_A)
    assert pair.hits == 49 and pair.cached.server.cache.entries == 1


def test_a_flood_of_new_names_keeps_no_repeated_packets() -> None:
    pair = Pair()
    for i in range(300):
        pair.ask(wire(f"n{i}.example.com", qid=i), EAST_A)
    assert pair.hits == 0 and pair.cached.server.cache.entries == 300
