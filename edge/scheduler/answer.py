"""The scheduler's answers: DNS query + client address + topology + health -> response.

Pure: no sockets, no clock, no logging.  The transport (``server``) parses
and renders wire format, the health checker (``health``) supplies the
snapshot; this module only decides.  Everything that does not depend on the
query (zone records, the edges ranked by distance from every region, the
coverage table) is built once in :class:`Answerer`.

What an authoritative server for the customer zones and the CDN zone answers
(RFC 1034 section 4.3.2, RFC 2308, RFC 7871):

* ``www.example.com``                  CNAME ``www.example.com.cdn.example.net``
  and, chased because we are authoritative for the target too, its A/AAAA;
* ``www.example.com.cdn.example.net``  A/AAAA of the nearest healthy L1 edges;
* SOA and NS at every zone apex; an A/AAAA for the NS host when it is in a zone;
* NXDOMAIN + SOA for unknown names in a zone, NODATA + SOA for other types,
  REFUSED outside our zones (never an open resolver).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cachetools import LRUCache

from edge.config import ConfigError, Topology
from edge.scheduler.geo import CoverageMap, CoverageMatch, IPAddress, IPNetwork, great_circle_km
from edge.scheduler.wire import ecs_value

UDP_PAYLOAD = 1232        # EDNS payload we advertise and cap UDP answers at (DNS Flag Day 2020)
STATIC_TTL = 3600         # SOA, NS, CNAME and NS-host records: they change only with the topology
SOA_SERIAL = 1            # no secondary transfers from us (AXFR is refused), so it never has to move
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

_A, _AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
_CNAME, _NS, _SOA, _ANY = dns.rdatatype.CNAME, dns.rdatatype.NS, dns.rdatatype.SOA, dns.rdatatype.ANY
_FAMILY = {_A: 4, _AAAA: 6}
_ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EdgeStatus:
    """What the health checker last concluded about one edge."""

    up: bool = True                  # not yet probed counts as up: never refuse an answer at start
    overloaded: bool = False         # healthy, but prefer the next-nearest edge
    inflight: int | None = None
    max_inflight: int | None = None
    probed: bool = False
    detail: str = "not probed yet"


UNPROBED = EdgeStatus()
HealthSnapshot = Mapping[str, EdgeStatus]   # edge name -> status; a missing edge is UNPROBED


@dataclass(frozen=True, eq=False)
class Edge:
    """An L1 edge as the scheduler hands it out (identity equality: one object per edge)."""

    name: str
    address: IPAddress
    region: str | None
    lat: float | None
    lon: float | None
    health_url: str
    rdata: dns.rdata.Rdata = field(compare=False, repr=False)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Location:
    """Where the client was placed, and why (the first half of /explain)."""

    address: IPAddress             # the address that was located
    via: str                       # "ecs" (RFC 7871 option) or "source" (packet source address)
    match: CoverageMatch | None    # the coverage block, if any
    region: str | None
    reason: str


@dataclass(frozen=True)
class Choice:
    """The edges chosen for one address family."""

    version: int                                     # 4 for A, 6 for AAAA
    ranked: tuple[tuple[Edge, float | None], ...]    # every candidate, nearest first
    chosen: tuple[Edge, ...]
    all_down: bool                                   # no candidate up: answered the nearest anyway


@dataclass
class Answer:
    """A response and the decision behind it (for metrics, logs and /explain)."""

    response: dns.message.Message
    location: Location | None = None
    choices: list[Choice] = field(default_factory=list)

    @property
    def all_down(self) -> bool:
        return any(choice.all_down for choice in self.choices)


def _address_taken(edge: Edge, *chosen: list[Edge]) -> bool:
    """Whether an edge in `chosen` already has `edge`'s address (lists of an answer or two: a scan)."""
    return any(other.address == edge.address for edges in chosen for other in edges)


# --------------------------------------------------------------------------- zone data


@dataclass(frozen=True)
class _Zone:
    apex: dns.name.Name
    soa: dns.rdata.Rdata
    ns: dns.rdata.Rdata
    negative: dns.rrset.RRset        # SOA for the authority section of NXDOMAIN/NODATA (RFC 2308 section 3)


@dataclass
class _Node:
    """One owner name of our zones and its records, rendered once at start.

    Owners carry the configured (lower) case: the renderer compresses an
    owner equal to the question name into a pointer to the question, so the
    client still sees its own spelling (and 0x20 case randomisation survives).
    """

    name: dns.name.Name
    zone: _Zone
    cname: dns.name.Name | None = None
    cname_rrset: dns.rrset.RRset | None = None
    edges: bool = False                                        # A/AAAA are the chosen edges
    static: dict[int, dns.rrset.RRset] = field(default_factory=dict)
    glue: list[dns.rrset.RRset] = field(default_factory=list)  # additional section of an NS answer
    # Choices are few (the topology bounds them), but the bound is kept as an LRU like every
    # per-query cache of the scheduler, never emptied wholesale.
    edge_rrsets: LRUCache = field(default_factory=lambda: LRUCache(_EDGE_RRSET_CACHE))

    def edge_rrset(self, chosen: tuple[Edge, ...], ttl: int) -> dns.rrset.RRset:
        """The A or AAAA RRset for `chosen`, built once per distinct choice."""
        rrset = self.edge_rrsets.get(chosen)
        if rrset is None:
            rrset = self.edge_rrsets[chosen] = dns.rrset.from_rdata_list(
                self.name, ttl, [edge.rdata for edge in chosen])
        return rrset


_EDGE_RRSET_CACHE = 4096


def _rdata(rdtype: int, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


class Answerer:
    """Answers queries for the topology's zones; build once, call :meth:`answer` per query."""

    def __init__(self, topology: Topology):
        if topology.dns is None:
            raise ConfigError(topology.source, "dns", "no [dns] table: this topology has no scheduler")
        self.topology = topology
        self.dns = conf = topology.dns
        self.ttl = conf.ttl
        self.answers = conf.answers
        self.default_region = conf.default_region
        self.coverage = CoverageMap(topology.coverage)
        self._lookups = self.coverage.lookups
        self.edges = self._edges(topology)

        nameserver = dns.name.from_text(conf.nameserver)
        hostmaster = dns.name.from_text(conf.hostmaster)
        zone_names = dict.fromkeys([*conf.customer_zones, conf.cdn_zone])
        self._zones: list[_Zone] = []
        for text in zone_names:
            apex = dns.name.from_text(text)
            soa = _rdata(_SOA, f"{nameserver} {hostmaster} {SOA_SERIAL} {SOA_REFRESH} {SOA_RETRY} "
                               f"{SOA_EXPIRE} {conf.ttl}")
            negative = dns.rrset.from_rdata_list(apex, min(STATIC_TTL, conf.ttl), [soa])
            self._zones.append(_Zone(apex, soa, _rdata(_NS, str(nameserver)), negative))
        # Deepest zone first, so a name is answered from the most specific zone holding it.
        self._zones.sort(key=lambda z: len(z.apex.labels), reverse=True)

        self._names: dict[dns.name.Name, _Node] = {}
        for zone in self._zones:
            apex = self._node(zone.apex)
            apex.static[_SOA] = dns.rrset.from_rdata_list(zone.apex, STATIC_TTL, [zone.soa])
            apex.static[_NS] = dns.rrset.from_rdata_list(zone.apex, STATIC_TTL, [zone.ns])
        for site in topology.sites:
            target = dns.name.from_text(site.cdn_name)
            target_node = self._node(target)
            if target_node is not None:              # config puts every cdn_name in the cdn zone
                target_node.edges = True
            for host in site.hosts:
                node = self._node(dns.name.from_text(host))
                if node is None:
                    continue
                if node.name == node.zone.apex:
                    # RFC 1912 section 2.4: no CNAME beside the apex SOA/NS, so the
                    # apex answers the edges itself (what providers call ALIAS).
                    node.edges = True
                else:
                    node.cname = target
                    node.cname_rrset = dns.rrset.from_rdata_list(
                        node.name, STATIC_TTL, [_rdata(_CNAME, str(target))])
        listen = ipaddress.ip_address(conf.listen.host)
        ns_node = self._node(nameserver)
        if ns_node is not None and not listen.is_unspecified:
            rdtype = _A if listen.version == 4 else _AAAA
            ns_node.static[rdtype] = dns.rrset.from_rdata_list(
                nameserver, STATIC_TTL, [_rdata(rdtype, str(listen))])
            for zone in self._zones:       # in-zone NS host: its address goes along (glue)
                self._names[zone.apex].glue.append(ns_node.static[rdtype])

        # Every region's candidates ranked once, per address family.
        self._ranked: dict[tuple[str | None, int], tuple[tuple[Edge, float | None], ...]] = {}
        for region in (*(r.name for r in topology.regions), None):
            for version in (4, 6):
                self._ranked[(region, version)] = self._rank(region, version)

    # ----------------------------------------------------------------- building

    @staticmethod
    def _edges(topology: Topology) -> tuple[Edge, ...]:
        edges = []
        for node in topology.by_role("l1"):
            try:
                address = ipaddress.ip_address(node.listen.host)
            except ValueError:
                # Answers carry addresses; a name could only be a CNAME the client resolves elsewhere.
                raise ConfigError(topology.source, f"nodes.{node.name}.listen",
                                  "the DNS scheduler hands this address to clients: "
                                  f"it must be an IP address, not the name {node.listen.host!r}") from None
            if address.is_unspecified:
                raise ConfigError(topology.source, f"nodes.{node.name}.listen",
                                  "the DNS scheduler hands this address to clients: "
                                  f"it must be a specific address, not {address}")
            lat, lon = node.lat, node.lon
            if node.region is not None:
                region = topology.region(node.region)
                lat = region.lat if lat is None else lat
                lon = region.lon if lon is None else lon
            rdtype = _A if address.version == 4 else _AAAA
            edges.append(Edge(node.name, address, node.region, lat, lon,
                              f"{node.admin.url}/healthz", _rdata(rdtype, str(address))))
        return tuple(edges)

    def _node(self, name: dns.name.Name) -> _Node | None:
        """The node for `name`, creating it and its empty non-terminals (RFC 8020)."""
        zone = self._zone_of(name)
        if zone is None:
            return None
        node = self._names.get(name)
        if node is None:
            node = self._names[name] = _Node(name, zone)
            ancestor = name
            while ancestor != zone.apex:
                ancestor = ancestor.parent()
                self._names.setdefault(ancestor, _Node(ancestor, zone))
        return node

    def _zone_of(self, name: dns.name.Name) -> _Zone | None:
        for zone in self._zones:
            if name.is_subdomain(zone.apex):
                return zone
        return None

    def _rank(self, region: str | None, version: int) -> tuple[tuple[Edge, float | None], ...]:
        edges = [e for e in self.edges if e.address.version == version]
        if region is None:
            return tuple((e, None) for e in edges)        # nowhere to measure from: topology order
        origin = self.topology.region(region)

        def distance(edge: Edge) -> float:
            if edge.lat is None or edge.lon is None:
                return math.inf
            return great_circle_km(origin.lat, origin.lon, edge.lat, edge.lon)

        ranked = sorted(((e, distance(e)) for e in edges), key=lambda pair: (pair[1], pair[0].name))
        return tuple(ranked)

    # ----------------------------------------------------------------- deciding

    def locate(self, address: IPAddress, via: str = "source") -> Location:
        """Region of a client: longest coverage block, else the default region."""
        match = self.coverage.lookup(address)
        if match is not None:
            return Location(address, via, match, match.region, f"coverage block {match.network}")
        if self.default_region is not None:
            return Location(address, via, None, self.default_region,
                            f"default region: no coverage block holds {address}")
        return Location(address, via, None, None,
                        f"no coverage block holds {address} and no default region: edges in topology order")

    def choose(self, region: str | None, version: int, health: HealthSnapshot) -> Choice:
        """The nearest `answers` edges that are up, preferring those not overloaded, in that order.

        The order is the client's failover order: clients (curl, browsers)
        connect to the first address and try the next when a connect fails,
        so the nearest healthy edge comes first and the next nearest healthy
        one after it.  That second address is what carries a client whose
        first edge dies while the answer is still in its cache (the TTL).

        An overloaded edge is healthy but busy: it comes after every edge
        that is up and not overloaded, wherever they are.  An edge on an
        address already chosen is passed over (two L1s may share an IP on
        different ports): the RRset would hold the address once, and the
        same address twice is no fallback.  If no candidate is up, the
        nearest are answered anyway (a far-off or dead edge is still better
        than no answer) and the choice says so.
        """
        ranked = self._ranked[(region, version)]
        fresh: list[Edge] = []
        busy: list[Edge] = []
        for edge, _ in ranked:
            status = health.get(edge.name, UNPROBED)
            if status.up and not _address_taken(edge, fresh, busy):
                (busy if status.overloaded else fresh).append(edge)
                if len(fresh) >= self.answers:
                    break
        chosen = (fresh + busy)[: self.answers]
        all_down = not chosen and bool(ranked)
        if all_down:
            for edge, _ in ranked:
                if len(chosen) < self.answers and not _address_taken(edge, chosen):
                    chosen.append(edge)
        return Choice(version, ranked, tuple(chosen), all_down)

    def place(self, version: int, value: int, ecs_family: int = 0, ecs_srclen: int = 0,
              ecs_address: bytes = b"") -> Hashable:
        """What an answer depends on about where the client is (a part of the answer cache's key).

        `version`/`value` are the packet's source address as an integer; the
        ``ecs_*`` arguments the client subnet option, if any (family 0: none).
        Without a subnet that is the region alone: :meth:`choose` sees nothing
        else, so two clients of one region (in one coverage block or in two)
        get the same answer.  With one, the echoed option also depends on the
        subnet's family and source length and on the scope (RFC 7871 section
        7.2.1), so those are part of it; its address bytes are the query's own,
        which the transport copies into each answer.  The same lookups as
        :meth:`_locate_query`, on integers.
        """
        if ecs_family and ecs_srclen:
            version = 4 if ecs_family == 1 else 6
            value = ecs_value(ecs_family, ecs_address)
            match = self.coverage.lookup_value(version, value)
            region = match.region if match is not None else self.default_region
            return (ecs_family, ecs_srclen, region, self.coverage.scope_value(version, value, match))
        match = self._lookups[version](value)
        region = match.region if match is not None else self.default_region
        return (ecs_family, 0, region, 0) if ecs_family else region

    # ----------------------------------------------------------------- answering

    def answer(self, query: dns.message.Message, client: IPAddress, health: HealthSnapshot) -> Answer:
        """Build the response to a parsed query from `client` (RFC 1034 section 4.3.2).

        The transport has already dropped responses and short packets and
        turned parse errors into FORMERR; size limits are its job too.
        """
        response = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
        result = Answer(response)
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)         # RFC 6891 section 6.1.3
            return result
        ecs = self._ecs(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return self._finish(result, ecs, client)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return self._finish(result, ecs, client)
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        node = self._names.get(qname)                      # case-insensitive (RFC 4343)
        zone = node.zone if node is not None else self._zone_of(qname)
        if zone is None or question.rdclass != dns.rdataclass.IN or qtype in _ZONE_TRANSFERS:
            response.set_rcode(dns.rcode.REFUSED)          # not ours: never an open resolver
            return self._finish(result, ecs, client)

        response.flags |= dns.flags.AA
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(zone.negative)
            return self._finish(result, ecs, client)
        if node.cname_rrset is not None and qtype != _CNAME:
            response.answer.append(node.cname_rrset)
            if qtype == _ANY:                             # RFC 8482: a subset is a fine ANY answer
                return self._finish(result, ecs, client)
            target = self._names.get(node.cname)
            if target is None:                            # RFC 6604: rcode of the last name in the chain
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._zone_of(node.cname).negative)
                return self._finish(result, ecs, client)
            node = target
        if not self._records(result, node, qtype, ecs, client, health):
            response.authority.append(node.zone.negative)  # NODATA (RFC 2308 section 2.2)
        return self._finish(result, ecs, client)

    def _records(self, result: Answer, node: _Node, qtype: int, ecs: dns.edns.ECSOption | None,
                 client: IPAddress, health: HealthSnapshot) -> bool:
        """Append the records of `node` for `qtype`; False if it has none (NODATA)."""
        response = result.response
        before = len(response.answer)
        if qtype == _ANY:
            return self._any(result, node, ecs, client, health)
        if qtype == _CNAME and node.cname_rrset is not None:
            response.answer.append(node.cname_rrset)
        elif qtype in node.static:
            response.answer.append(node.static[qtype])
            if qtype == _NS:
                response.additional.extend(node.glue)
        if node.edges and qtype in _FAMILY:
            self._edges_of(result, node, qtype, ecs, client, health)
        return len(response.answer) > before

    def _edges_of(self, result: Answer, node: _Node, rdtype: int, ecs: dns.edns.ECSOption | None,
                  client: IPAddress, health: HealthSnapshot) -> bool:
        """Append the chosen edges of one family; False if the topology has none of that family."""
        if result.location is None:
            result.location = self._locate_query(ecs, client)
        choice = self.choose(result.location.region, _FAMILY[rdtype], health)
        result.choices.append(choice)
        if choice.chosen:
            result.response.answer.append(node.edge_rrset(choice.chosen, self.ttl))
        return bool(choice.chosen)

    def _any(self, result: Answer, node: _Node, ecs: dns.edns.ECSOption | None, client: IPAddress,
             health: HealthSnapshot) -> bool:
        """One RRset for ANY (RFC 8482 section 4.1): a subset is a complete answer.

        Everything at a name makes the biggest answer for the smallest query
        (what reflection attacks ask for), and no client needs it.  A name that
        hands out edges answers its A records (AAAA when there are no IPv4
        edges), any other name the first of its records (SOA at an apex); a
        CNAME owner answers its CNAME (in :meth:`answer`).
        """
        if node.edges and (self._edges_of(result, node, _A, ecs, client, health)
                           or self._edges_of(result, node, _AAAA, ecs, client, health)):
            return True
        for rrset in node.static.values():
            result.response.answer.append(rrset)
            return True
        return False

    @staticmethod
    def _ecs(query: dns.message.Message) -> dns.edns.ECSOption | None:
        for option in query.options:
            if option.otype == dns.edns.OptionType.ECS:
                return option  # type: ignore[return-value]
        return None

    def _locate_query(self, ecs: dns.edns.ECSOption | None, client: IPAddress) -> Location:
        # RFC 7871 section 7.1.2: a source prefix of 0 means "do not use ECS for me".
        if ecs is not None and ecs.srclen > 0:
            # Only the first srclen bits are the client's (RFC 7871 section 6).
            subnet = ipaddress.ip_network(f"{ecs.address}/{ecs.srclen}", strict=False)
            return self.locate(subnet.network_address, "ecs")
        return self.locate(client, "source")

    def _finish(self, result: Answer, ecs: dns.edns.ECSOption | None, client: IPAddress) -> Answer:
        """Echo the client subnet with its scope (RFC 7871 section 7.2.1)."""
        if ecs is not None:
            location = result.location
            scope = 0     # the answer did not depend on where the client is
            if location is not None and location.via == "ecs":
                scope = self.coverage.scope(location.address, location.match)
            response = result.response
            response.use_edns(0, 0, UDP_PAYLOAD, response.request_payload,
                              options=[dns.edns.ECSOption(ecs.address, ecs.srclen, scope)])
        return result

    # ----------------------------------------------------------------- explaining

    def explain(self, name: str, client: IPAddress, health: HealthSnapshot, qtype: str = "A",
                subnet: IPNetwork | None = None) -> dict:
        """The decision record for a query, as JSON-able data (GET /explain).

        Runs the same :meth:`answer` the DNS path runs, so the explanation can
        never disagree with what a resolver would be told.  Raises ValueError
        for a name or type that is not valid DNS.
        """
        try:
            rdtype = dns.rdatatype.from_text(qtype)
            options = [dns.edns.ECSOption(str(subnet.network_address), subnet.prefixlen)] if subnet else None
            query = dns.message.make_query(name, rdtype, options=options)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"cannot ask for {name!r} type {qtype!r}: {exc}") from None
        result = self.answer(query, client, health)
        ecs = self._ecs(query)
        location = result.location or self._locate_query(ecs, client)
        response = result.response
        candidates = []
        for choice in result.choices:
            chosen = set(choice.chosen)
            for rank, (edge, distance) in enumerate(choice.ranked, 1):
                status = health.get(edge.name, UNPROBED)
                candidates.append({
                    "edge": edge.name, "address": str(edge.address), "region": edge.region,
                    "rank": rank, "distance_km": None if distance is None or math.isinf(distance)
                    else round(distance, 1),
                    "up": status.up, "overloaded": status.overloaded, "inflight": status.inflight,
                    "max_inflight": status.max_inflight, "probed": status.probed,
                    "detail": status.detail, "chosen": edge in chosen,
                })
        answer_ecs = self._ecs(response) if response.edns >= 0 else None
        return {
            "query": {"name": name, "type": dns.rdatatype.to_text(rdtype), "client": str(client),
                      "subnet": str(subnet) if subnet else None},
            "location": {
                "address": str(location.address), "via": location.via, "region": location.region,
                "coverage_block": str(location.match.network) if location.match else None,
                "reason": location.reason,
            },
            "candidates": candidates,
            "all_down": result.all_down,
            "answer": [str(edge.address) for choice in result.choices for edge in choice.chosen],
            "rcode": dns.rcode.to_text(response.rcode()),
            "ttl": self.ttl,
            "ecs_scope": answer_ecs.scopelen if answer_ecs else None,
            "records": [line for rrset in response.answer for line in rrset.to_text().splitlines()],
        }
