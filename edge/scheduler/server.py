"""The DNS transport: asyncio UDP and TCP on one address, around a resolver.

The resolver decides (``answer``); this module only moves bytes:

* parse with dnspython; a packet shorter than a DNS header, or one that is
  itself a response, is dropped; a parse error gets FORMERR (RFC 1035
  section 4.1.1) and an exception in the resolver gets SERVFAIL, and the
  server keeps answering (as dnspython's tests/nanonameserver.py does);
* size: UDP answers fit the client's EDNS payload (RFC 6891 section 6.2.5),
  capped at our own, and 512 bytes without EDNS (RFC 1035 section 4.2.1);
  what does not fit loses its additional section, then is sent empty with
  TC set so that the client retries over TCP (RFC 7766 section 5);
* TCP: two-byte length framing, several queries per connection, an idle
  timeout (RFC 7766 sections 6.2.3 and 8).

Parsing and rendering with dnspython cost more than deciding, so parsed
queries are kept by their bytes after the ID, and rendered responses by what
they depend on: those bytes, the size limit and the resolver's ``variant``
(for the scheduler: the edges chosen).  Both tables are bounded; a flood of
new names only starts them over.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from edge.scheduler.answer import UDP_PAYLOAD
from edge.scheduler.geo import IPAddress

log = logging.getLogger("edge.dns")

HEADER_SIZE = 12
NO_EDNS_LIMIT = 512          # RFC 1035 section 4.2.1
TCP_LIMIT = 65535            # the two-byte length prefix
RENDER_CACHE_SIZE = 8192     # rendered responses kept; a flood of new names just starts it over


@dataclass(frozen=True)
class Resolved:
    """A response, and what besides the query bytes it depends on.

    `variant` None means "never reuse this rendering"; otherwise two queries
    with the same bytes (after the ID) and the same variant render alike.
    """

    response: dns.message.Message
    variant: Hashable | None = None


class Resolver(Protocol):
    def resolve(self, query: dns.message.Message, client: IPAddress) -> Resolved: ...


# Called once per answered packet: (query or None if unparseable, response, transport).
ResponseHook = Callable[[dns.message.Message | None, dns.message.Message, str], None]


def udp_limit(query: dns.message.Message, our_payload: int) -> int:
    """Largest UDP response for `query`: its EDNS payload within [512, ours], else 512."""
    if query.edns < 0:
        return NO_EDNS_LIMIT
    return max(NO_EDNS_LIMIT, min(query.payload, our_payload))


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


class DnsServer:
    """UDP and TCP listeners on one address answering through `resolver`."""

    def __init__(self, resolver: Resolver, *, our_payload: int = UDP_PAYLOAD,
                 tcp_idle_timeout: float = 10.0, max_tcp_connections: int = 256,
                 on_response: ResponseHook | None = None):
        self.resolver = resolver
        self.our_payload = our_payload
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.on_response = on_response
        self._parsed: dict[bytes, dns.message.Message] = {}
        self._rendered: dict[tuple[bytes, int, Hashable], bytes] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    # ----------------------------------------------------------------- one packet

    def handle(self, wire: bytes, client: IPAddress, transport: str) -> bytes | None:
        """Answer one DNS message; None means send nothing."""
        if len(wire) < HEADER_SIZE:
            return None                                   # not even a header: nobody to answer
        body = wire[2:]
        query = self._parsed.get(body)
        if query is None:
            try:
                query = dns.message.from_wire(wire)
            except Exception as exc:                       # any parse failure is the sender's
                log.debug("FORMERR for %s: %s", client, exc)
                response = error_response(wire, dns.rcode.FORMERR)
                return self._send(None, response, NO_EDNS_LIMIT, transport) if response else None
            if len(self._parsed) >= RENDER_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[body] = query
        else:
            # Parsing is a function of the bytes but for the ID.  Sharing the
            # object is safe: a query is answered start to end without yielding.
            query.id = int.from_bytes(wire[:2], "big")
        if query.flags & dns.flags.QR:
            return None                                   # a response: answering could loop
        limit = TCP_LIMIT if transport == "tcp" else udp_limit(query, self.our_payload)
        try:
            resolved = self.resolver.resolve(query, client)
        except Exception:
            log.exception("resolver failed for %s from %s", query.question[:1], client)
            response = dns.message.make_response(query, our_payload=self.our_payload)
            response.set_rcode(dns.rcode.SERVFAIL)
            return self._send(query, response, limit, transport)
        if resolved.variant is None:
            return self._send(query, resolved.response, limit, transport)
        key = (body, limit, resolved.variant)
        cached = self._rendered.get(key)
        if cached is not None:
            if self.on_response:
                self.on_response(query, resolved.response, transport)
            # The rendering is identical but for the two-byte ID (RFC 1035 section 4.1.1).
            return wire[:2] + cached[2:]
        reply = self._send(query, resolved.response, limit, transport)
        if reply is not None:
            if len(self._rendered) >= RENDER_CACHE_SIZE:
                self._rendered.clear()
            self._rendered[key] = reply
        return reply

    def _send(self, query: dns.message.Message | None, response: dns.message.Message,
              limit: int, transport: str) -> bytes | None:
        try:
            reply = render(response, limit)
        except Exception:
            log.exception("cannot render the response to %s", query.question[:1] if query else "?")
            if query is None:
                return None
            response = dns.message.make_response(query, our_payload=self.our_payload)
            response.set_rcode(dns.rcode.SERVFAIL)
            reply = render(response, limit)
        if self.on_response:
            self.on_response(query, response, transport)
        return reply

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
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound, reuse_address=True)
            except OSError as exc:
                transport.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp = transport
            self.address = (host, bound)
            return self.address
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")  # pragma: no cover

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._connections):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_tcp_connections:
            writer.close()                                # RFC 7766 section 6.2.2: shed, don't queue
            return
        self._connections.add(writer)
        try:
            client = ipaddress.ip_address(writer.get_extra_info("peername")[0])
            while True:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    wire = await reader.readexactly(length)
                try:
                    reply = self.handle(wire, client, "tcp")
                except Exception:                         # never let one message kill the listener
                    log.exception("dropped a TCP message from %s", client)
                    reply = None
                if reply is None:
                    break                                 # nothing sensible to say: hang up
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    """Answers each datagram inline: the resolver is pure and fast, so no task per packet."""

    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            reply = self.server.handle(data, ipaddress.ip_address(addr[0]), "udp")
        except Exception:                                 # never let one packet stop the listener
            log.exception("dropped a packet from %s", addr[0])
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)
