"""The DNS transport: UDP and TCP on one address, an answer cache in wire format, rate limiting.

The resolver decides (``answer``, through ``service``); this module moves bytes:

* **Hit path.**  A small pre-parser (``wire``) reads the header, the
  question and the OPT record; the key (``cache``) adds the size limit, the
  client's place (from the resolver) and the health generation; a hit is
  the cached answer with the query's ID, question and client subnet bytes,
  sent from the datagram callback.  No dnspython, no task.
* **Full path**, for misses and for anything the pre-parser hands on:
  dnspython parses; a packet shorter than a header, or one that is itself a
  response, is dropped; a parse error gets FORMERR (RFC 1035 section 4.1.1)
  and an exception in the resolver gets SERVFAIL, and the server keeps
  answering (as dnspython's tests/nanonameserver.py does).  Answers fit the
  client's EDNS payload (RFC 6891 section 6.2.5), capped at our own, and 512
  bytes without EDNS (RFC 1035 section 4.2.1); what does not fit loses its
  additional section, then goes out empty with TC set (RFC 7766 section 5).
  The rendering is cut into a cache entry.
* **Counting.**  Every answer, hit or not, is counted by one call,
  ``resolver.count(tally)``, with the tally the full path made for it.
* **RRL** (``rrl``): UDP answers per client network are rate limited before
  any work is done; a refused answer is dropped or slipped (TC).
* **TCP** (RFC 7766): two-byte framing, pipelined queries answered in order
  from the read callback, reading paused while the client does not read its
  answers.  At most `tcp_max_per_network` connections per client /24 or
  /56 (a further one is closed at once), at most `tcp_max_connections` in
  all, and when that many are open a new client takes the place of the one
  that has waited longest since its last query, so connections kept open
  with a query every few seconds cannot lock new clients out.  A connection
  with no query for `tcp_idle_timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from edge.scheduler import rrl as rrl_
from edge.scheduler.answer import UDP_PAYLOAD
from edge.scheduler.cache import AnswerCache, answer_key, assemble, repeat_key, template
from edge.scheduler.geo import IPAddress
from edge.scheduler.wire import HEADER, QueryView, parse_query, truncated_reply

log = logging.getLogger("edge.dns")

HEADER_SIZE = HEADER
NO_EDNS_LIMIT = 512          # RFC 1035 section 4.2.1
TCP_LIMIT = 65535            # the two-byte length prefix
TCP_SWEEP_EVERY = 0.5        # seconds between checks of idle TCP connections


@dataclass(frozen=True)
class Resolved:
    """A response, and what was decided for it (handed back to the resolver's ``tally``)."""

    response: dns.message.Message
    decision: Hashable = None


class Resolver(Protocol):
    """What the transport needs from the deciding side."""

    generation: int                     # moves whenever an answer could change (health)

    def resolve(self, query: dns.message.Message, client: IPAddress) -> Resolved: ...

    def place(self, version: int, value: int, ecs_family: int, ecs_srclen: int, ecs_address: bytes) -> Hashable:
        """What the answer depends on about where the client is (see Answerer.place)."""

    def tally(self, qtype: int | None, rcode: int, decision: Hashable) -> object:
        """The counter of one kind of answer (the same object for equal arguments)."""

    def count(self, tally: object) -> None:
        """Count one answer sent: called once per answer on every path."""


def udp_limit(query: dns.message.Message, our_payload: int) -> int:
    """Largest UDP response for `query`: its EDNS payload within [512, ours], else 512."""
    if query.edns < 0:
        return NO_EDNS_LIMIT
    return max(NO_EDNS_LIMIT, min(query.payload, our_payload))


def view_limit(view: QueryView, our_payload: int) -> int:
    """:func:`udp_limit` from the pre-parser's view (the same numbers)."""
    if not view.edns:
        return NO_EDNS_LIMIT
    return max(NO_EDNS_LIMIT, min(view.payload, our_payload))


def render(response: dns.message.Message, limit: int) -> bytes:
    """Wire format within `limit` bytes: drop additional records, then truncate (TC).

    Records go out in the order the resolver put them in their RRset:
    dnspython shuffles an RRset's records by default, but the scheduler's
    order is the client's failover order (nearest edge first).
    """
    try:
        return _wire(response, limit)
    except dns.exception.TooBig:
        pass
    if response.additional:
        # RFC 2181 section 9: leaving out additional data needs no TC bit.
        response.additional = []
        try:
            return _wire(response, limit)
        except dns.exception.TooBig:
            pass
    response.answer, response.authority = [], []
    response.flags |= dns.flags.TC
    return _wire(response, limit)


def _wire(response: dns.message.Message, limit: int) -> bytes:
    return response.to_wire(max_size=limit, want_shuffle=False)


def error_response(wire: bytes, rcode: dns.rcode.Rcode) -> dns.message.Message | None:
    """A header-only response to an unparseable query, or None if it claims to be a response."""
    header = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    flags = int.from_bytes(wire[2:4], "big")
    if flags & dns.flags.QR:
        return None
    header.flags = dns.flags.QR | (flags & dns.flags.RD)
    header.set_opcode(dns.opcode.from_flags(flags))
    header.set_rcode(rcode)
    return header


def client_value(host: str) -> tuple[int, int]:
    """(IP version, address as an integer) of a peer address string, without ipaddress objects."""
    if ":" in host:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")


class Source(NamedTuple):
    """What the hit path needs about a peer address."""

    version: int
    value: int            # the address as an integer
    network: int          # its /24 or /56, for rate limiting
    place: Hashable       # the resolver's place for it when the query has no client subnet


class Sources:
    """Peer address string -> :class:`Source`, the most recent `size` of them.

    A resolver asks again and again from the same few addresses; working its
    place out once (address parsing, the coverage lookup) instead of per
    query is a good part of a hit's cost.  The place of an address depends on
    the topology alone, so an entry never goes stale.  Bounded in entries,
    least recently used out first, like every per-query table here.
    """

    def __init__(self, place: Callable[..., Hashable], size: int = 8192):
        self.place = place
        self.size = size
        self._by_host: OrderedDict[str, Source] = OrderedDict()

    def get(self, host: str) -> Source:
        found = self._by_host.get(host)
        if found is not None:
            self._by_host.move_to_end(host)
            return found
        version, value = client_value(host)
        found = self._by_host[host] = Source(version, value, rrl_.network_key(version, value),
                                             self.place(version, value, 0, 0, b""))
        if len(self._by_host) > self.size:
            self._by_host.popitem(last=False)
        return found

    def __len__(self) -> int:
        return len(self._by_host)


class DnsServer:
    """UDP and TCP listeners on one address answering through `resolver`."""

    def __init__(self, resolver: Resolver, *, our_payload: int = UDP_PAYLOAD, cache_size: int = 32 * 2**20,
                 rate_limiter: rrl_.RateLimiter | None = None, tcp_idle_timeout: float = 10.0,
                 max_tcp_connections: int = 512, max_tcp_per_network: int = 32,
                 clock: Callable[[], float] = time.monotonic):
        self.resolver = resolver
        self.our_payload = our_payload
        self.cache = AnswerCache(cache_size)
        self.sources = Sources(resolver.place)
        self.rrl = rate_limiter
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_per_network = max_tcp_per_network
        self.clock = clock
        self.uncacheable = 0                               # full-path answers whose shape a hit cannot rebuild
        self.tcp_refused = 0                               # connections closed at once (network over its cap)
        self.tcp_replaced = 0                              # idle connections closed to admit a new client
        self.tcp_timed_out = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._connections: dict[_TcpConnection, None] = {}  # insertion-ordered set
        self._per_network: dict[int, int] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.address: tuple[str, int] | None = None

    # ----------------------------------------------------------------- one packet

    def handle_udp(self, wire: bytes, host: str) -> bytes | None:
        """The answer to one datagram from `host`; None means send nothing."""
        source = self.sources.get(host)
        # Only what will be answered counts against the limit (short packets and responses are dropped).
        if self.rrl is not None and len(wire) >= HEADER_SIZE and not wire[2] & 0x80:
            verdict = self.rrl.check(source.network, self.clock())
            if verdict != rrl_.ANSWER:
                # A slip needs the question to echo; a packet without a plain one is only dropped.
                view = parse_query(wire) if verdict == rrl_.SLIP else None
                return truncated_reply(wire, view) if view is not None else None
        resolver = self.resolver
        repeated = repeat_key(wire, source.place, resolver.generation)
        entry = self.cache.repeat(repeated)
        if entry is not None:
            resolver.count(entry.tally)
            return wire[:2] + entry.head
        view = parse_query(wire)
        if view is None:
            self.cache.bypass()
            return self._full(wire, host, NO_EDNS_LIMIT, None, None)
        return self.handle(wire, host, source, view, view_limit(view, self.our_payload), repeated)

    def handle_tcp(self, wire: bytes, host: str, source: Source) -> bytes | None:
        """The answer to one framed TCP message (no rate limit: TCP proves the address)."""
        view = parse_query(wire)
        if view is None:
            self.cache.bypass()
            return self._full(wire, host, TCP_LIMIT, None, None)
        return self.handle(wire, host, source, view, TCP_LIMIT)

    def handle(self, wire: bytes, host: str, source: Source, view: QueryView, limit: int,
               repeated: tuple | None = None) -> bytes | None:
        """Answer a plain query from the cache, or through the full path and fill the cache.

        `repeated` (UDP only) is the query's :func:`repeat_key`: a hit here
        keeps the whole answer under it too, for the packet's next repeat,
        if its name is in lower case: a resolver that randomises the case
        (0x20) never repeats a packet, and its entries would only push out
        answers that are asked for.
        """
        resolver = self.resolver
        if view.ecs_family:
            place = resolver.place(source.version, source.value, view.ecs_family, view.ecs_srclen, view.ecs_address)
        else:
            place = source.place
        key = answer_key(view, limit, place, resolver.generation)
        entry = self.cache.get(key)
        if entry is None:
            return self._full(wire, host, limit, view, key)
        resolver.count(entry.tally)
        reply = assemble(wire, view, entry)
        if repeated is not None and wire.startswith(view.qkey[:-4], HEADER):
            self.cache.put(repeated, reply[2:], b"", entry.tally)
        return reply

    def _full(self, wire: bytes, host: str, limit: int, view: QueryView | None, key: tuple | None) -> bytes | None:
        if len(wire) < HEADER_SIZE:
            return None                                   # not even a header: nobody to answer
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:                           # any parse failure is the sender's
            log.debug("FORMERR for %s: %s", host, exc)
            response = error_response(wire, dns.rcode.FORMERR)
            return self._send(None, response, NO_EDNS_LIMIT, None)[0] if response else None
        if query.flags & dns.flags.QR:
            return None                                   # a response: answering could loop
        if limit != TCP_LIMIT:
            limit = udp_limit(query, self.our_payload)    # the view's limit, or the query's own
        try:
            resolved = self.resolver.resolve(query, ipaddress.ip_address(host))
        except Exception:
            log.exception("resolver failed for %s from %s", query.question[:1], host)
            response = dns.message.make_response(query, our_payload=self.our_payload)
            response.set_rcode(dns.rcode.SERVFAIL)
            return self._send(query, response, limit, None)[0]
        reply, tally, rendered = self._send(query, resolved.response, limit, resolved.decision)
        if rendered and reply is not None and key is not None and view is not None:
            parts = template(reply, wire, view)
            if parts is None:
                self.uncacheable += 1
            else:
                self.cache.put(key, *parts, tally)
        return reply

    def _send(self, query: dns.message.Message | None, response: dns.message.Message,
              limit: int, decision: Hashable) -> tuple[bytes | None, object, bool]:
        """Render and count one answer: (wire, its tally, False if rendering failed and SERVFAIL went instead)."""
        rendered = True
        try:
            reply = render(response, limit)
        except Exception:
            log.exception("cannot render the response to %s", query.question[:1] if query else "?")
            if query is None:
                return None, None, False
            response = dns.message.make_response(query, our_payload=self.our_payload)
            response.set_rcode(dns.rcode.SERVFAIL)
            reply = render(response, limit)
            decision, rendered = None, False
        qtype = query.question[0].rdtype if query is not None and query.question else None
        tally = self.resolver.tally(qtype, response.rcode(), decision)
        self.resolver.count(tally)
        return reply, tally, rendered

    # ----------------------------------------------------------------- transports

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind UDP then TCP on the same address; OSError if either bind fails.

        Port 0 picks a free UDP port and binds TCP to the same number,
        retrying a few times if TCP happens to be taken there.
        """
        loop = asyncio.get_running_loop()
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(lambda: _TcpConnection(self), host, bound,
                                                     reuse_address=True, backlog=1024)
            except OSError as exc:
                transport.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp = transport
            self.address = (host, bound)
            self._sweep = loop.call_later(TCP_SWEEP_EVERY, self._sweep_idle)
            return self.address
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")  # pragma: no cover

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self._connections):
                connection.abort()
            # Bounded: a connection we did not track (shed at connect) must not hold the stop.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 5)
            self._tcp = None

    @property
    def tcp_connections(self) -> int:
        return len(self._connections)

    def _admit(self, connection: _TcpConnection) -> bool:
        """Make room for a new TCP connection, or refuse it (its network is at its cap)."""
        if self._per_network.get(connection.network, 0) >= self.max_tcp_per_network:
            self.tcp_refused += 1
            return False
        if len(self._connections) >= self.max_tcp_connections:
            # RFC 7766 section 6.2.3: a busy server may close idle connections.  The one
            # whose last query is oldest goes, however often it has asked before.
            oldest = min(self._connections, key=lambda c: c.last_query)
            self.tcp_replaced += 1
            oldest.close()
        self._connections[connection] = None
        self._per_network[connection.network] = self._per_network.get(connection.network, 0) + 1
        return True

    def _forget(self, connection: _TcpConnection) -> None:
        if connection in self._connections:
            del self._connections[connection]
            left = self._per_network[connection.network] - 1
            if left:
                self._per_network[connection.network] = left
            else:
                del self._per_network[connection.network]

    def _sweep_idle(self) -> None:
        """Close connections without a query for tcp_idle_timeout: one timer for all of them."""
        deadline = self.clock() - self.tcp_idle_timeout
        for connection in [c for c in self._connections if c.last_query < deadline]:
            self.tcp_timed_out += 1
            connection.close()
        self._sweep = asyncio.get_running_loop().call_later(TCP_SWEEP_EVERY, self._sweep_idle)


class _UdpProtocol(asyncio.DatagramProtocol):
    """Answers each datagram inside the callback: the hit path is a few dict lookups, so no task per packet."""

    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            reply = self.server.handle_udp(data, addr[0])
        except Exception:                                 # never let one packet stop the listener
            log.exception("dropped a packet from %s", addr[0])
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _TcpConnection(asyncio.Protocol):
    """One client's TCP connection: framed queries answered in order inside the read callback."""

    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.host = ""
        self.source: Source | None = None
        self.network = 0
        self.last_query = server.clock()                  # the connection's start counts as a query
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        try:
            self.host = peer[0]
            self.source = self.server.sources.get(self.host)
        except (TypeError, OSError, ValueError):
            transport.close()
            return
        self.network = self.source.network
        self.admitted = self.server._admit(self)
        if not self.admitted:
            transport.abort()                             # RFC 7766 section 6.2.2: shed, don't queue

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        server = self.server
        while len(buffer) >= 2 and self.transport is not None and not self.transport.is_closing():
            length = buffer[0] << 8 | buffer[1]
            if len(buffer) < 2 + length:
                break
            wire = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            self.last_query = server.clock()
            try:
                reply = server.handle_tcp(wire, self.host, self.source)  # type: ignore[arg-type]
            except Exception:                             # never let one message kill the listener
                log.exception("dropped a TCP message from %s", self.host)
                reply = None
            if reply is None:
                self.close()                              # nothing sensible to say: hang up
                return
            self.transport.write(len(reply).to_bytes(2, "big") + reply)

    def eof_received(self) -> bool:
        return False                                      # answered all whole messages; close

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()                # the client is not reading its answers

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, unsent answers dropped (the server is stopping)."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:
            self.admitted = False
            self.server._forget(self)
        self.transport = None
