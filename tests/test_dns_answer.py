"""Pure tests of the scheduler's decisions: no sockets, no clock, literal expectations.

Distances used below (great circle, km, within 1%), from published city tables:
New York (east) - Washington 330, New York - San Francisco (west) 4130,
Chicago (central) - Washington 955, Chicago - New York 1145,
San Francisco - Washington 3920.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from edge import config
from edge.scheduler.answer import Answerer, EdgeStatus
from edge.scheduler.geo import CoverageMap, great_circle_km
from edge.config import HealthCheck
from edge.scheduler.health import EdgeHealth, HealthChecker, ProbeResult, parse_health

TOPOLOGY = """
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.46.10:8080"

[sites.apex]
hosts = ["example.org"]
origin = "http://127.0.46.10:8080"

[regions.east]
lat = 40.71
lon = -74.01
[regions.west]
lat = 37.77
lon = -122.42
[regions.central]
lat = 41.88
lon = -87.63

[coverage]
"127.0.11.0/24" = "east"
"127.0.12.0/24" = "west"
"127.0.12.128/25" = "east"
"127.0.13.0/24" = "central"
"2001:db8::/32" = "west"

[nodes.origin]
role = "origin"
listen = "127.0.46.10:8080"
admin = "127.0.46.10:8091"

[nodes.l1-east]
role = "l1"
region = "east"
listen = "127.0.46.1:8080"
admin = "127.0.46.1:8091"

[nodes.l1-east2]
role = "l1"
region = "east"
lat = 38.90
lon = -77.04
listen = "127.0.46.3:8080"
admin = "127.0.46.3:8091"

[nodes.l1-west]
role = "l1"
region = "west"
listen = "127.0.46.2:8080"
admin = "127.0.46.2:8091"

[nodes.l1-v6]
role = "l1"
region = "west"
listen = "[::1]:8080"
admin = "[::1]:8091"

[dns]
listen = "127.0.45.1:8053"
admin = "127.0.45.1:8091"
zones = ["example.com", "example.org"]
cdn_zone = "cdn.example.net"
ttl = 30
answers = ANSWERS
default_region = "east"
"""

CNAME = "www.example.com. 3600 IN CNAME www.example.com.cdn.example.net."
CDN = "www.example.com.cdn.example.net."
EAST, EAST2, WEST = "127.0.46.1", "127.0.46.3", "127.0.46.2"
SOA_COM = "example.com. 30 IN SOA ns1.cdn.example.net. hostmaster.cdn.example.net. 1 3600 600 86400 30"
SOA_NET = "cdn.example.net. 30 IN SOA ns1.cdn.example.net. hostmaster.cdn.example.net. 1 3600 600 86400 30"
DOWN = EdgeStatus(up=False, probed=True)
BUSY = EdgeStatus(up=True, overloaded=True, probed=True)


def topology(answers: int = 1, text: str = TOPOLOGY) -> config.Topology:
    return config.parse(text.replace("ANSWERS", str(answers)), "<test>", Path("."))


@pytest.fixture(scope="module")
def answerer() -> Answerer:
    return Answerer(topology())


def ask(answerer: Answerer, name: str, rdtype: str = "A", client: str = "127.0.11.1",
        health: dict | None = None, ecs: str | None = None) -> dns.message.Message:
    options = [dns.edns.ECSOption.from_text(ecs)] if ecs else None
    query = dns.message.make_query(name, rdtype, options=options)
    return answerer.answer(query, ipaddress.ip_address(client), health or {}).response


def a_record(address: str) -> str:
    return f"{CDN} 30 IN A {address}"


def lines(section: list) -> set[str]:
    return {line for rrset in section for line in rrset.to_text().splitlines()}


# --------------------------------------------------------------------------- who gets which edge

WHERE = [
    # (client, health, expected edge address, why)
    ("127.0.11.1", {}, EAST, "east block -> east edge"),
    ("127.0.12.1", {}, WEST, "west block -> west edge"),
    ("127.0.12.200", {}, EAST, "the nested /25 inside the west /24 is east: longest prefix wins"),
    ("127.0.13.1", {}, EAST2, "central (Chicago) is nearer Washington (955 km) than New York (1145 km)"),
    ("10.0.0.1", {}, EAST, "no block: default region east"),
    ("127.0.11.1", {"l1-east": DOWN}, EAST2, "nearest down -> next nearest"),
    ("127.0.11.1", {"l1-east": DOWN, "l1-east2": DOWN}, WEST, "both east edges down -> west"),
    ("127.0.12.1", {"l1-west": DOWN}, EAST2, "west down -> Washington (3920 km) before New York (4130 km)"),
    ("127.0.11.1", {"l1-east": BUSY}, EAST2, "overloaded nearest -> next nearest healthy"),
    ("127.0.11.1", {"l1-east": BUSY, "l1-east2": DOWN, "l1-west": DOWN}, EAST,
     "overloaded is still better than down"),
    ("127.0.11.1", {"l1-east": DOWN, "l1-east2": DOWN, "l1-west": DOWN}, EAST,
     "all down: the nearest anyway"),
]


@pytest.mark.parametrize("client,health,expected,why", WHERE, ids=[w[3] for w in WHERE])
def test_nearest_healthy_edge(answerer: Answerer, client: str, health: dict, expected: str, why: str) -> None:
    response = ask(answerer, "www.example.com", client=client, health=health)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert lines(response.answer) == {CNAME, a_record(expected)}


def test_all_down_is_flagged_and_partial_outage_is_not(answerer: Answerer) -> None:
    query = dns.message.make_query("www.example.com", "A")
    client = ipaddress.ip_address("127.0.11.1")
    everything_down = {"l1-east": DOWN, "l1-east2": DOWN, "l1-west": DOWN}
    assert answerer.answer(query, client, everything_down).all_down
    assert not answerer.answer(query, client, {"l1-east": DOWN, "l1-east2": DOWN}).all_down


def addresses(response: dns.message.Message) -> list[str]:
    """The A/AAAA addresses of the answer, in the order they were put in."""
    return [rr.address for rrset in response.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rr in rrset]


ORDER = [
    # (client, ECS option, health, expected addresses in order, why), with answers = 2 (the default)
    ("127.0.11.1", None, {}, [EAST, EAST2], "nearest first, the next nearest after it"),
    ("127.0.12.1", None, {}, [WEST, EAST2], "west: Washington (3920 km) before New York (4130 km)"),
    ("127.0.13.1", None, {}, [EAST2, EAST], "central: Washington (955 km) before New York (1145 km)"),
    ("127.0.11.1", "127.0.12.0/24", {}, [WEST, EAST2], "the client subnet decides, not the source"),
    ("127.0.12.1", "127.0.11.0/24", {}, [EAST, EAST2], "the client subnet decides, the other way"),
    ("127.0.11.1", None, {"l1-east": DOWN}, [EAST2, WEST], "nearest down: the next two, in order"),
    ("127.0.11.1", None, {"l1-east2": DOWN}, [EAST, WEST], "a dead edge is never the fallback"),
    ("127.0.11.1", None, {"l1-east": BUSY}, [EAST2, WEST], "overloaded nearest: two healthy ones beat it"),
    ("127.0.12.1", None, {"l1-east2": BUSY}, [WEST, EAST], "an overloaded second is passed over too"),
    ("127.0.11.1", None, {"l1-east": BUSY, "l1-west": DOWN}, [EAST2, EAST],
     "overloaded only as the fallback, after the healthy one"),
    ("127.0.11.1", None, {"l1-east": BUSY, "l1-east2": BUSY}, [WEST, EAST],
     "the one not overloaded first however far, then the nearest overloaded"),
    ("127.0.11.1", None, {"l1-east": DOWN, "l1-west": DOWN}, [EAST2], "one edge up: that one alone"),
    ("127.0.11.1", None, {"l1-east": DOWN, "l1-east2": DOWN, "l1-west": DOWN}, [EAST, EAST2],
     "all down: the nearest two anyway"),
]


@pytest.mark.parametrize("client,ecs,health,expected,why", ORDER, ids=[o[4] for o in ORDER])
def test_answer_is_the_nearest_healthy_edge_then_the_next_nearest(client: str, ecs: str | None, health: dict,
                                                                  expected: list[str], why: str) -> None:
    answerer = Answerer(topology(answers=2))
    response = ask(answerer, "www.example.com", client=client, health=health, ecs=ecs)
    assert response.answer[0].to_text() == CNAME
    assert addresses(response) == expected
    subnet = ipaddress.ip_network(ecs) if ecs else None
    record = answerer.explain("www.example.com", ipaddress.ip_address(client), health, subnet=subnet)
    assert record["answer"] == expected


def test_answers_defaults_to_two() -> None:
    text = "\n".join(line for line in TOPOLOGY.splitlines() if not line.startswith("answers"))
    assert Answerer(topology(text=text)).answers == 2
    assert addresses(ask(Answerer(topology(text=text)), CDN)) == [EAST, EAST2]


SHARED_ADDRESS = TOPOLOGY.replace('listen = "127.0.46.3:8080"', 'listen = "127.0.46.1:8081"')

SHARED = [
    # l1-east2 now listens on l1-east's address (another port): as a fallback it would be no fallback.
    ("127.0.13.1", {}, ["127.0.46.1", WEST], "the nearer of the two is answered, then another address"),
    ("127.0.11.1", {}, ["127.0.46.1", WEST], "the second edge on the address is passed over"),
    ("127.0.11.1", {"l1-east": DOWN, "l1-east2": DOWN, "l1-west": DOWN}, ["127.0.46.1", WEST],
     "all down: the nearest two addresses"),
]


@pytest.mark.parametrize("client,health,expected,why", SHARED, ids=[s[3] for s in SHARED])
def test_edges_sharing_an_address_count_once(client: str, health: dict, expected: list[str], why: str) -> None:
    response = ask(Answerer(topology(answers=2, text=SHARED_ADDRESS)), "www.example.com", client=client,
                   health=health)
    assert addresses(response) == expected


# --------------------------------------------------------------------------- authoritative behaviour

ZONE = [
    # (name, type, rcode, aa, answer lines, authority lines, additional lines)
    ("www.example.com", "CNAME", "NOERROR", True, {CNAME}, set(), set()),
    ("www.example.com", "AAAA", "NOERROR", True, {CNAME, f"{CDN} 30 IN AAAA ::1"}, set(), set()),
    ("www.example.com", "MX", "NOERROR", True, {CNAME}, {SOA_NET}, set()),
    ("www.example.com", "ANY", "NOERROR", True, {CNAME}, set(), set()),
    (CDN, "A", "NOERROR", True, {a_record(EAST)}, set(), set()),
    (CDN, "TXT", "NOERROR", True, set(), {SOA_NET}, set()),
    # ANY gets one RRset (RFC 8482): the edges' A records, not A and AAAA.
    (CDN, "ANY", "NOERROR", True, {a_record(EAST)}, set(), set()),
    ("example.com", "SOA", "NOERROR", True,
     {SOA_COM.replace(" 30 IN SOA", " 3600 IN SOA")}, set(), set()),
    ("example.com", "NS", "NOERROR", True, {"example.com. 3600 IN NS ns1.cdn.example.net."}, set(),
     {"ns1.cdn.example.net. 3600 IN A 127.0.45.1"}),
    ("example.com", "A", "NOERROR", True, set(), {SOA_COM}, set()),
    # At an apex ANY is the SOA alone (not SOA and NS), or the edges where the apex hands them out.
    ("example.com", "ANY", "NOERROR", True, {SOA_COM.replace(" 30 IN SOA", " 3600 IN SOA")}, set(), set()),
    ("example.org", "ANY", "NOERROR", True, {"example.org. 30 IN A 127.0.46.1"}, set(), set()),
    ("ns1.cdn.example.net", "ANY", "NOERROR", True, {"ns1.cdn.example.net. 3600 IN A 127.0.45.1"}, set(), set()),
    ("example.com.cdn.example.net", "ANY", "NOERROR", True, set(), {SOA_NET}, set()),
    ("ns1.cdn.example.net", "A", "NOERROR", True, {"ns1.cdn.example.net. 3600 IN A 127.0.45.1"}, set(), set()),
    # A customer name at a zone apex cannot be a CNAME (RFC 1912 2.4): it answers the edge itself.
    ("example.org", "A", "NOERROR", True, {"example.org. 30 IN A 127.0.46.1"}, set(), set()),
    ("example.org", "SOA", "NOERROR", True,
     {"example.org. 3600 IN SOA ns1.cdn.example.net. hostmaster.cdn.example.net. 1 3600 600 86400 30"},
     set(), set()),
    ("nope.example.com", "A", "NXDOMAIN", True, set(), {SOA_COM}, set()),
    ("foo.www.example.com", "A", "NXDOMAIN", True, set(), {SOA_COM}, set()),
    ("example.com.cdn.example.net", "A", "NOERROR", True, set(), {SOA_NET}, set()),   # empty non-terminal
    ("google.com", "A", "REFUSED", False, set(), set(), set()),
    ("com", "NS", "REFUSED", False, set(), set(), set()),
    (".", "NS", "REFUSED", False, set(), set(), set()),
    ("example.com", "AXFR", "REFUSED", False, set(), set(), set()),
]


@pytest.mark.parametrize("name,rdtype,rcode,aa,answer,authority,additional", ZONE,
                         ids=[f"{z[0]}/{z[1]}" for z in ZONE])
def test_zone_answers(answerer: Answerer, name: str, rdtype: str, rcode: str, aa: bool,
                      answer: set, authority: set, additional: set) -> None:
    response = ask(answerer, name, rdtype)
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert bool(response.flags & dns.flags.AA) == aa
    assert lines(response.answer) == answer
    assert lines(response.authority) == authority
    assert lines(response.additional) == additional
    assert [q.to_text() for q in response.question] == [f"{dns.name.from_text(name)} IN {rdtype}"]


def test_name_case_is_ignored_and_the_question_keeps_its_case(answerer: Answerer) -> None:
    response = ask(answerer, "WwW.ExAmPlE.CoM", "A")
    assert lines(response.answer) == {CNAME, a_record(EAST)}
    wire = response.to_wire()
    # On the wire the owner is compressed to the question, so the client sees its own spelling.
    assert b"\x03WwW\x07ExAmPlE\x03CoM\x00" in wire
    parsed = dns.message.from_wire(wire)
    assert parsed.answer[0].name.to_text() == "WwW.ExAmPlE.CoM."


def test_other_classes_are_refused(answerer: Answerer) -> None:
    query = dns.message.make_query("www.example.com", "A", rdclass=dns.rdataclass.CH)
    response = answerer.answer(query, ipaddress.ip_address("127.0.11.1"), {}).response
    assert response.rcode() == dns.rcode.REFUSED and not response.answer


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.STATUS, dns.opcode.UPDATE])
def test_other_opcodes_are_not_implemented(answerer: Answerer, opcode: int) -> None:
    query = dns.message.make_query("example.com", "SOA")
    query.set_opcode(opcode)
    response = answerer.answer(query, ipaddress.ip_address("127.0.11.1"), {}).response
    assert response.rcode() == dns.rcode.NOTIMP and response.opcode() == opcode


def test_a_query_without_exactly_one_question_is_formerr(answerer: Answerer) -> None:
    query = dns.message.Message()
    response = answerer.answer(query, ipaddress.ip_address("127.0.11.1"), {}).response
    assert response.rcode() == dns.rcode.FORMERR


def test_unknown_edns_version_gets_badvers(answerer: Answerer) -> None:
    query = dns.message.make_query("www.example.com", "A", use_edns=1)
    response = answerer.answer(query, ipaddress.ip_address("127.0.11.1"), {}).response
    assert response.rcode() == dns.rcode.BADVERS and response.edns == 0 and not response.answer


def test_no_edns_in_the_answer_unless_the_query_had_it(answerer: Answerer) -> None:
    assert ask(answerer, "www.example.com").edns == -1
    query = dns.message.make_query("www.example.com", "A", use_edns=0, payload=4096)
    response = answerer.answer(query, ipaddress.ip_address("127.0.11.1"), {}).response
    assert response.edns == 0 and response.payload == 1232 and not response.options


# --------------------------------------------------------------------------- EDNS client subnet

ECS = [
    # (ecs option text, packet source, expected edge, expected scope)
    ("127.0.11.0/24", "127.0.12.1", EAST, 24),
    # The west /24 holds an east /25, so the answer only holds for the /25 half.
    ("127.0.12.0/24", "127.0.11.1", WEST, 25),
    ("127.0.12.128/25", "127.0.12.1", EAST, 25),
    # 127.0.0.0/16 is in no block (default east); 127.0.11.0/24 shares its first 20 bits,
    # so the answer holds for 127.0.0.0/21 only: a scope longer than the source is allowed.
    ("127.0.0.0/16", "127.0.12.1", EAST, 21),
    ("10.1.0.0/16", "127.0.12.1", EAST, 2),      # 10/8 and 127/8 share 1 leading bit
    ("2001:db8:1::/48", "127.0.11.1", WEST, 32),
    ("0.0.0.0/0", "127.0.12.1", WEST, 0),        # RFC 7871 7.1.2: source 0 means use the packet source
]


@pytest.mark.parametrize("ecs,source,expected,scope", ECS)
def test_client_subnet_decides_and_is_echoed_with_scope(answerer: Answerer, ecs: str, source: str,
                                                        expected: str, scope: int) -> None:
    response = ask(answerer, "www.example.com", client=source, ecs=ecs)
    assert lines(response.answer) == {CNAME, a_record(expected)}
    (echo,) = response.options
    address, srclen = ecs.split("/")
    assert (echo.address, echo.srclen, echo.scopelen) == (address, int(srclen), scope)


def test_client_subnet_scope_is_zero_when_the_answer_does_not_depend_on_it(answerer: Answerer) -> None:
    for name, rdtype in (("nope.example.com", "A"), ("example.com", "SOA"), ("google.com", "A")):
        (echo,) = ask(answerer, name, rdtype, ecs="127.0.12.0/24").options
        assert echo.scopelen == 0, name


# --------------------------------------------------------------------------- explain

def test_explain_gives_region_reason_candidates_and_answer(answerer: Answerer) -> None:
    record = answerer.explain("www.example.com", ipaddress.ip_address("127.0.12.1"), {"l1-west": BUSY})
    assert record["location"] == {"address": "127.0.12.1", "via": "source", "region": "west",
                                  "coverage_block": "127.0.12.0/24", "reason": "coverage block 127.0.12.0/24"}
    ranked = [(c["edge"], c["distance_km"], c["overloaded"], c["chosen"]) for c in record["candidates"]]
    assert [r[0] for r in ranked] == ["l1-west", "l1-east2", "l1-east"]
    assert ranked[0][1:] == (0.0, True, False)
    assert ranked[1][1] == pytest.approx(3920, rel=0.01) and ranked[1][3] is True
    assert ranked[2][1] == pytest.approx(4130, rel=0.01) and ranked[2][3] is False
    assert record["answer"] == [EAST2] and record["rcode"] == "NOERROR" and record["all_down"] is False
    assert record["records"] == [CNAME, a_record(EAST2)]


def test_explain_names_the_default_region_and_the_subnet(answerer: Answerer) -> None:
    record = answerer.explain("www.example.com", ipaddress.ip_address("192.0.2.1"), {})
    assert record["location"]["region"] == "east"
    assert record["location"]["coverage_block"] is None
    assert record["location"]["reason"].startswith("default region")
    record = answerer.explain("www.example.com", ipaddress.ip_address("192.0.2.1"), {},
                              subnet=ipaddress.ip_network("127.0.12.0/24"))
    assert record["location"]["via"] == "ecs" and record["location"]["region"] == "west"
    assert record["ecs_scope"] == 25 and record["answer"] == [WEST]


@pytest.mark.parametrize("name,rdtype", [("a..b", "A"), ("x" * 64 + ".example.com", "A"),
                                         ("www.example.com", "NOSUCHTYPE")])
def test_explain_rejects_bad_input_with_valueerror(answerer: Answerer, name: str, rdtype: str) -> None:
    with pytest.raises(ValueError, match="cannot ask"):
        answerer.explain(name, ipaddress.ip_address("127.0.0.1"), {}, rdtype)


def test_an_edge_on_a_wildcard_address_is_a_config_error() -> None:
    text = TOPOLOGY.replace('listen = "127.0.46.1:8080"', 'listen = "0.0.0.0:8080"')
    with pytest.raises(config.ConfigError, match="nodes.l1-east.listen"):
        Answerer(topology(text=text))


# --------------------------------------------------------------------------- geo

@pytest.mark.parametrize("a,b,km", [
    ((40.71, -74.01), (37.77, -122.42), 4130),     # New York - San Francisco
    ((51.51, -0.13), (48.86, 2.35), 343),          # London - Paris
    ((41.88, -87.63), (38.90, -77.04), 955),       # Chicago - Washington
    ((41.88, -87.63), (40.71, -74.01), 1145),      # Chicago - New York
    ((0.0, 0.0), (0.0, 180.0), 20015),             # half the equator: pi * 6371 km
    ((90.0, 0.0), (-90.0, 0.0), 20015),            # pole to pole
])
def test_great_circle_distance(a: tuple, b: tuple, km: float) -> None:
    assert great_circle_km(*a, *b) == pytest.approx(km, rel=0.01)


def test_great_circle_distance_of_a_point_to_itself_is_zero() -> None:
    assert great_circle_km(12.3, 45.6, 12.3, 45.6) == 0


COVERAGE = CoverageMap([(ipaddress.ip_network(n), r) for n, r in [
    ("10.0.0.0/8", "a"), ("10.1.0.0/16", "b"), ("10.1.2.0/24", "c"), ("10.1.2.128/25", "d"),
    ("2001:db8::/32", "v6"), ("2001:db8:ff::/48", "v6b")]])

LOOKUP = [
    # (address, block, region, scope)
    ("10.9.9.9", "10.0.0.0/8", "a", 13),       # 10.9 and 10.1 part at the 13th bit (9 = 1001, 1 = 0001)
    ("10.128.0.1", "10.0.0.0/8", "a", 9),      # differs from 10.1/16 at bit 9
    ("10.1.3.1", "10.1.0.0/16", "b", 24),
    ("10.1.200.1", "10.1.0.0/16", "b", 17),
    ("10.1.2.1", "10.1.2.0/24", "c", 25),
    ("10.1.2.200", "10.1.2.128/25", "d", 25),
    ("11.0.0.1", None, None, 8),               # 10/8 and 11/8 differ in the 8th bit only
    ("192.0.2.1", None, None, 1),
    ("2001:db8:1::1", "2001:db8::/32", "v6", 41),
    ("2001:db8:ff:1::1", "2001:db8:ff::/48", "v6b", 48),
]


@pytest.mark.parametrize("address,block,region,scope", LOOKUP)
def test_coverage_longest_prefix_and_scope(address: str, block: str | None, region: str | None, scope: int) -> None:
    ip = ipaddress.ip_address(address)
    match = COVERAGE.lookup(ip)
    assert (str(match.network) if match else None, match.region if match else None) == (block, region)
    assert COVERAGE.scope(ip, match) == scope


# --------------------------------------------------------------------------- health state machine

OK, FAIL, HOT = ProbeResult(True), ProbeResult(False, error="refused"), ProbeResult(True, overloaded=True)

SEQUENCES = [
    # (probe results, expected `up` after each, rise=2, fall=2)
    ([OK, OK, OK], [True, True, True]),
    ([FAIL], [False]),                                     # the first probe decides at once
    ([OK, FAIL, OK, FAIL, OK], [True] * 5),                # single failures never take it out
    ([OK, FAIL, FAIL], [True, True, False]),               # fall = 2
    ([OK, FAIL, FAIL, OK, FAIL, OK, OK], [True, True, False, False, False, False, True]),   # rise = 2 in a row
    ([FAIL, OK, OK], [False, False, True]),
]


@pytest.mark.parametrize("results,expected", SEQUENCES)
def test_rise_and_fall(results: list[ProbeResult], expected: list[bool]) -> None:
    state, seen = EdgeHealth(), []
    for now, result in enumerate(results):
        state = state.observe(result, rise=2, fall=2, now=float(now))
        seen.append(state.up)
    assert seen == expected


def test_since_records_the_last_transition_time() -> None:
    state = EdgeHealth()
    for now, result in [(10.0, OK), (11.0, OK), (12.0, FAIL), (13.0, FAIL), (14.0, FAIL)]:
        state = state.observe(result, rise=2, fall=2, now=now)
    assert (state.up, state.since, state.bad) == (False, 13.0, 3)
    assert state.status().detail == "probe failed (3 in a row): refused"


def test_overload_comes_from_the_last_good_probe_and_down_is_never_overloaded() -> None:
    state = EdgeHealth().observe(HOT, rise=2, fall=2, now=0.0)
    assert state.status().overloaded
    state = state.observe(FAIL, rise=2, fall=2, now=1.0)      # still up after one failure: still busy
    assert state.status().up and state.status().overloaded
    state = state.observe(FAIL, rise=2, fall=2, now=2.0)
    assert not state.status().up and not state.status().overloaded
    state = state.observe(OK, rise=1, fall=2, now=3.0)
    assert state.status().up and not state.status().overloaded


BUSY_ROUND = ProbeResult(True, inflight=9, max_inflight=10)

GENERATIONS = [
    # (rounds of one edge's probe results, generation after each): it moves only when up or
    # overloaded does, never for what every round changes (in-flight counts, details)
    ([OK, BUSY_ROUND, OK], [0, 0, 0]),
    ([OK, FAIL, FAIL, FAIL], [0, 0, 1, 1]),                # down after fall = 2
    ([FAIL, OK, OK], [1, 1, 2]),                           # down at the first probe, up after rise = 2
    ([OK, HOT, HOT, OK], [0, 1, 1, 2]),
]


@pytest.mark.parametrize("rounds,expected", GENERATIONS)
def test_health_generation_moves_only_with_what_answers_depend_on(rounds: list[ProbeResult],
                                                                  expected: list[int]) -> None:
    edges = Answerer(topology()).edges
    checker = HealthChecker(edges, HealthCheck(fall=2, rise=2))
    seen = []
    for now, result in enumerate(rounds):
        checker.fold([result if edge.name == "l1-east" else OK for edge in edges], float(now))
        seen.append(checker.generation)
    assert seen == expected


PLACES = [
    # (source, ECS (address, srclen) or None, expected place)
    ("127.0.11.1", None, "east"),
    ("127.0.12.200", None, "east"),              # the east /25 inside the west /24: another block, same region
    ("127.0.12.1", None, "west"),
    ("10.0.0.1", None, "east"),                  # no block: the default region
    ("2001:db8::1", None, "west"),
    ("127.0.12.1", ("127.0.11.0", 24), (1, 24, "east", 24)),
    ("127.0.12.1", ("127.0.12.0", 24), (1, 24, "west", 25)),   # the answer holds for the /25 half only
    ("127.0.11.1", ("0.0.0.0", 0), (1, 0, "east", 0)),         # source 0: located by the packet source
    ("127.0.11.1", ("2001:db8:1::", 48), (2, 48, "west", 32)),
]


@pytest.mark.parametrize("source,ecs,expected", PLACES)
def test_place_is_what_an_answer_depends_on_about_the_client(source: str, ecs: tuple | None,
                                                            expected: object) -> None:
    answerer = Answerer(topology())
    ip = ipaddress.ip_address(source)
    if ecs is None:
        assert answerer.place(ip.version, int(ip)) == expected
        return
    option = dns.edns.ECSOption(*ecs)
    assert answerer.place(ip.version, int(ip), option.family, option.srclen, option.addrdata) == expected
    # The same region and scope as the full answer's.
    response = ask(answerer, "www.example.com", client=source, ecs=f"{ecs[0]}/{ecs[1]}")
    assert response.options[0].scopelen == expected[3]


@pytest.mark.parametrize("status,body,expected", [
    (200, {"status": "ok", "inflight": 3, "max_inflight": 10, "overloaded": False},
     ProbeResult(True, False, 3, 10)),
    (200, {"status": "ok", "inflight": 11, "max_inflight": 10, "overloaded": True},
     ProbeResult(True, True, 11, 10)),
    (200, None, ProbeResult(True)),
    (200, {"overloaded": "yes", "inflight": True}, ProbeResult(True)),   # wrong types are ignored
    (503, {"status": "draining"}, ProbeResult(False, error="HTTP 503")),
    (404, None, ProbeResult(False, error="HTTP 404")),
])
def test_parse_health(status: int, body: object, expected: ProbeResult) -> None:
    assert parse_health(status, body) == expected
