"""One client connection: an asyncio Protocol that parses with httptools and answers in order.

Shape borrowed from uvicorn's httptools protocol: llhttp calls back per URL
fragment, header and body chunk; timeouts are deadlines checked by the
front's sweep (no timer per request); pipelined requests wait in a queue and
are answered strictly in order.  Two ways to answer:

* **the hit path**: a bodyless GET/HEAD that is a fresh memory hit is
  answered inside ``on_headers_complete`` with one ``writelines`` of the
  stored object's pre-serialised header block and its body: no task, no
  coroutine, no multidict (``App.hit_now``);
* **the general path**: a task runs ``App.handle`` (the pipeline) and writes
  the :class:`Reply` it returns, streaming with backpressure
  (``pause_writing``/``resume_writing``) so a slow reader never grows the
  node's memory.

Anything malformed gets its 4xx here (never a 5xx or a traceback) and the
connection is closed: a request the front refuses is never forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import httptools

from edge.http import rules
from edge.http.connection import FOREVER, ClientConnection
from edge.http.h2 import PREFACE, H2Connection
from edge.http.message import BodyAborted, ClientGone, Reply, Request, RequestBody, close_body, error_reply
from edge.http.rules import Reject

if TYPE_CHECKING:
    from edge.http.server import Front

log = logging.getLogger("edge.http")

MAX_QUEUED = 32                  # pipelined requests parsed ahead before reading pauses
CHUNKED_END = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
KEEP_ALIVE_LINE = b"Connection: keep-alive\r\n\r\n"
CLOSE_LINE = b"Connection: close\r\n\r\n"
END_OF_HEAD = b"\r\n"

# Request fields the connection layer looks at while parsing (lower-case).
_HOST, _CL, _TE, _CONN, _EXPECT, _VIA, _REFERER, _UA, _SLOW = range(9)
_NOTED = {
    b"host": _HOST, b"content-length": _CL, b"transfer-encoding": _TE, b"connection": _CONN,
    b"expect": _EXPECT, b"via": _VIA, b"referer": _REFERER, b"user-agent": _UA,
    # The hit path answers only plain requests: these need the pipeline.
    b"range": _SLOW, b"if-range": _SLOW, b"if-match": _SLOW, b"if-none-match": _SLOW,
    b"if-modified-since": _SLOW, b"if-unmodified-since": _SLOW,
}


# Requests with only these fields need no framing, keep-alive or expectation checks.
_PLAIN_KINDS = frozenset({_HOST, _VIA, _REFERER, _UA})
_METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


def _bare_host(host: bytes | None) -> bytes:
    """A Host value lower-cased, without port or trailing dot (enough to compare with site hosts)."""
    if not host:
        return b""
    return host.rsplit(b":", 1)[0].lower().rstrip(b".") if not host.startswith(b"[") else host.lower()


class _Stop(Exception):
    """Raised from a parser callback after the connection was closed: parse nothing more."""


class HttpConnection(ClientConnection):
    def __init__(self, front: Front):
        self.front = front
        self.app = front.app
        self.limits = limits = front.limits
        self.loop = front.loop
        # Read on every request: kept here rather than looked up through limits.
        self._max_request_line = limits.max_request_line
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._keepalive = limits.keepalive_timeout
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.tls = False                      # the client came over the HTTPS listener
        self._sniff_h2c = False               # the first bytes may be the HTTP/2 preface (h2c)
        self._sniffed = b""
        self.closed = False
        # Timeouts: the front's sweep closes the connection once `deadline` passes.
        self.deadline = FOREVER
        self._idle = True                     # no request in progress: expiry closes quietly
        # The request being parsed.
        self._head_started = False
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._field_bytes = 0
        self._noted: dict[int, list[bytes]] = {}
        self._body: RequestBody | None = None
        # Requests parsed and not yet answered, and the one being answered.
        self._queue: deque[Request] = deque()
        self._busy = False
        self._read_paused: set[str] = set()     # why reading is paused: queue, body, write, refused
        self._reject_after: Reject | None = None   # answered once the queue ahead is done
        # Writing.
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls = ssl_object is not None
        if self.tls and ssl_object.selected_alpn_protocol() == "h2":
            self._hand_over(b"")
            return
        self._sniff_h2c = not self.tls and self.front.h2c
        self.deadline = self.loop.time() + self.limits.client_header_timeout
        self.front.connection_opened(self)

    def _hand_over(self, data: bytes) -> None:
        """This connection speaks HTTP/2 (ALPN h2, or the h2c preface): its own protocol takes over."""
        self.closed = True
        self.deadline = FOREVER
        self.front.connections.discard(self)
        conn = H2Connection(self.front, self.tls)
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = FOREVER
        if self._body is not None:
            self._body.fail(ClientGone("client closed the connection"))
        for request in self._queue:
            if request.body is not None:
                request.body.fail(ClientGone("client closed the connection"))
        self._queue.clear()
        self._wake_writer()
        self.front.connection_closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than we answer: read no more requests until it catches up.
        self._write_paused = True
        self._pause_reading("write")

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_reading("write")
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._sniff_h2c:
            # h2c with prior knowledge (RFC 9113 3.3): the first bytes are the preface.
            data = self._sniffed + data
            if PREFACE.startswith(data[:len(PREFACE)]):
                if len(data) < len(PREFACE):
                    self._sniffed = data
                    return
                self._hand_over(data)
                return
            self._sniff_h2c, self._sniffed = False, b""
        try:
            self.parser.feed_data(data)
        except Reject as reject:
            self._refuse(reject)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__         # what our callback raised; httptools wraps it
            if isinstance(cause, _Stop):
                return
            if isinstance(cause, Reject):
                self._refuse(cause)
            else:       # our own bug, not the client's: say so, with the traceback
                log.error("internal error while answering %s", self.remote, exc_info=cause or exc)
                self._refuse(Reject(500, "internal error"))
        except httptools.HttpParserInvalidMethodError:
            self._refuse(_unknown_method(data))
        except httptools.HttpParserUpgrade:
            # Upgrade is hop-by-hop and not offered: the request is answered as a
            # plain one (without the Upgrade field), and the connection closes after.
            self._reject_after = Reject(0, "upgrade")
        except httptools.HttpParserError as exc:
            self._refuse(Reject(400, str(exc) or "malformed request"))
        if self.closed:
            return
        if self._head_started and self._idle:
            # A head that did not arrive whole must arrive within client_header_timeout.
            self.deadline = self.loop.time() + self.limits.client_header_timeout
            self._idle = False
        if not self._busy and (self._queue or self._reject_after is not None):
            self._next()

    def expire(self) -> None:
        """Called by the front's sweep when `deadline` passed."""
        if self.closed:
            return
        if self._idle:
            self.close()
        else:
            self.front.count_refusal("header_timeout")
            self._write_error(Reject(408, "request head not received in time"))

    def drain_now(self) -> None:
        """The node is stopping: an idle connection closes at once, a busy one after its response."""
        if not self._busy and not self._queue and not self._head_started:
            self.close()

    # --------------------------------------------------------------- parser

    # No on_message_begin: every callback costs the hit path; on_url marks the start of a head.

    def on_url(self, fragment: bytes) -> None:
        if self.closed:
            raise _Stop
        self._head_started = True
        self._url += fragment
        if len(self._url) > self._max_request_line:
            raise Reject(414, f"request target longer than {self._max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        fields.append((name, value))
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > self._max_header_bytes:
            raise Reject(431, f"header fields larger than {self._max_header_bytes} bytes")
        if len(fields) > self._max_headers:
            raise Reject(431, f"more than {self._max_headers} header fields")
        if value.translate(None, rules.FIELD_VALUE_BYTES):
            rules.check_field_value(value)          # raises the 400
        kind = _NOTED.get(name.lower())
        if kind is not None:
            self._noted.setdefault(kind, []).append(value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            rules.check_version(version)
        url = self._url
        if url.translate(None, rules.TARGET_BYTES):
            rules.check_target(url)
        noted, fields = self._noted, self._fields
        self._url, self._fields, self._field_bytes, self._noted = b"", [], 0, {}
        self._head_started = False
        self.deadline = FOREVER
        self._idle = False
        raw_method = parser.get_method()
        method = _METHOD_NAMES.get(raw_method) or raw_method.decode("ascii")
        target = url.decode("ascii")
        body = None
        if _PLAIN_KINDS.issuperset(noted):
            # The common request: no body, no Connection, nothing for the pipeline to decide.
            keep = version == "1.1"
        else:
            rules.check_framing(noted.get(_TE, ()), noted.get(_CL, ()))
            keep = rules.keep_alive(version, noted.get(_CONN, ()))
            expect = noted.get(_EXPECT)
            wants_continue = rules.expects_continue(expect[0] if expect else None)   # 417 if unknown
            if _TE in noted or (_CL in noted and noted[_CL][0].strip() not in (b"0", b"")):
                body = self._body = RequestBody(lambda: self._pause_reading("body"),
                                                lambda: self._resume_reading("body"),
                                                self.limits.client_body_timeout,
                                                self._send_continue if wants_continue and version == "1.1" else None)
        if body is None and _SLOW not in noted and not (self._busy or self._queue or self._write_paused) \
                and self._reject_after is None:
            hosts, via = noted.get(_HOST), noted.get(_VIA)      # inline: this is the hit path
            hit = self._hit_now(method, target, hosts[0] if hosts and len(hosts) == 1 else None,
                                via[0] if via else None)
            if hit is not None:
                self._write_hit(method, target, version, keep, hit, noted)
                return
        request = Request(method, target, version, fields, self.remote, body, keep, self.tls)
        self._queue.append(request)
        if len(self._queue) >= MAX_QUEUED:
            self._pause_reading("queue")

    def on_body(self, chunk: bytes) -> None:
        if self._body is not None:
            self._body.feed(chunk)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.finish()
            self._body = None

    # ---------------------------------------------------------- answering

    def _write_hit(self, method: str, target: str, version: str, keep: bool, hit,
                   noted: dict[int, list[bytes]]) -> None:
        """Answer a fresh memory hit now: one writelines, no task."""
        head, body, cache_status = hit
        keep = keep and not self.front.draining
        ending = (KEEP_ALIVE_LINE if version == "1.0" else END_OF_HEAD) if keep else CLOSE_LINE
        if method == "HEAD":
            self.transport.writelines((head, ending))
            sent = 0
        else:
            self.transport.writelines((head, ending, body))
            sent = len(body)
        access = self.front.access_log
        if access.enabled:
            access.log(self.remote, method, target, version, 200, sent, _first(noted, _HOST),
                       _first(noted, _REFERER), _first(noted, _UA), cache_status, "", 0.0)
        if not keep:
            self.close()
            raise _Stop
        self._idle = True
        self.deadline = self.front.now + self._keepalive

    def _hit_now(self, method: str, target: str, host: bytes | None, via: bytes | None):
        if self.front.redirect_hosts and not self.tls and _bare_host(host) in self.front.redirect_hosts:
            return None         # plain HTTP to a site that wants HTTPS: the pipeline redirects it
        return self.app.hit_now(method, target, host, via)

    def _next(self) -> None:
        """Start answering the next queued request, if any (and nothing is being answered)."""
        while self._queue and not self.closed:
            request = self._queue.popleft()
            if len(self._queue) < MAX_QUEUED // 2:
                self._resume_reading("queue")
            if request.body is None and not self._write_paused:
                noted = _noted_of(request)
                if _SLOW not in noted:
                    hit = self._hit_now(request.method, request.target, _only(noted, _HOST), _first_raw(noted, _VIA))
                    if hit is not None:
                        try:
                            self._write_hit(request.method, request.target, request.version, request.keep_alive,
                                            hit, noted)
                        except _Stop:
                            return
                        continue
            self._busy = True
            self.front.track(self.loop.create_task(self._serve(request)))
            return
        if self._reject_after is not None and not self.closed:
            reject, self._reject_after = self._reject_after, None
            if reject.status:
                self._write_error(reject)
            else:
                self.close()

    async def _serve(self, request: Request) -> None:
        started = self.loop.time()
        reply: Reply | None = None
        sent, keep = 0, False
        try:
            try:
                reply = await self.app.handle(request)
            except Exception:
                log.exception("pipeline failed on %s %s", request.method, request.target)
                reply = error_reply(500, "internal error")
            if self._reject_after is not None and self._reject_after.status and request.body is not None \
                    and not request.body.complete:
                # Its own body was malformed: the refusal replaces whatever the pipeline said.
                await close_body(reply)
                reply = error_reply(self._reject_after.status, str(self._reject_after))
                self._reject_after = None
                request.keep_alive = False
            keep = request.keep_alive and not self.front.draining
            if request.body is not None and not request.body.complete:
                keep = False      # the rest of its body is still on the wire
            sent, keep = await self._write_reply(request, reply, keep)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("writing the answer to %s %s failed", request.method, request.target)
            self.abort()
        finally:
            duration = self.loop.time() - started
            if reply is not None:
                self.app.done(request, reply, sent, duration)
                access = self.front.access_log
                if access.enabled:
                    headers = request.headers
                    access.log(self.remote, request.method, request.target, request.version, reply.status, sent,
                               headers.get("Host", ""), headers.get("Referer", ""), headers.get("User-Agent", ""),
                               reply.cache_status, reply.upstream, duration)
        self._busy = False
        if self.closed:
            return
        if not keep or self.front.draining:
            # A drain that began while this reply streamed (drain_now saw us busy)
            # closes the connection now that the reply is out.
            self.close()
            return
        if self._head_started:
            self.deadline = self.loop.time() + self.limits.client_header_timeout
        elif not self._queue:
            self._idle = True
            self.deadline = self.loop.time() + self.limits.keepalive_timeout
        self._next()

    async def _write_reply(self, request: Request, reply: Reply, keep: bool) -> tuple[int, bool]:
        """Put a reply on the wire; the body bytes sent, and whether the connection stays open."""
        transport = self.transport
        body = reply.body
        bodyless = reply.bodyless or request.method == "HEAD" or reply.status in (204, 304)
        if reply.head is not None:
            head = [reply.head]
        else:
            head = [rules.status_line(reply.status), rules.serialise_fields(reply.headers)]
        chunked = False
        if reply.head is not None:
            pass                        # the block carries its own Content-Length
        elif reply.length is not None:
            if reply.status not in (204, 304):
                head.append(b"Content-Length: %d\r\n" % reply.length)
        elif not bodyless:
            if request.version == "1.1":
                chunked = True
                head.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False          # HTTP/1.0: the end of the body is the end of the connection
        head.append((KEEP_ALIVE_LINE if request.version == "1.0" else END_OF_HEAD) if keep else CLOSE_LINE)
        if self._write_paused:
            try:
                await self._drain()
            except ClientGone:
                pass
        if self.closed:
            await close_body(reply)
            return 0, False
        if isinstance(body, bytes):
            if bodyless or not body:
                transport.writelines(head)
                return 0, keep
            head.append(body)
            transport.writelines(head)
            return len(body), keep
        transport.writelines(head)
        if bodyless:
            await close_body(reply)
            return 0, keep
        sent = 0
        try:
            async for chunk in body:
                if self.closed:
                    break
                if not chunk:
                    continue            # an empty chunk would end a chunked body early
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                sent += len(chunk)
                if self._write_paused:
                    await self._drain()
            else:
                if chunked and not self.closed:
                    transport.write(CHUNKED_END)
        except BodyAborted as exc:
            log.warning("%s %s: response aborted after %d bytes: %s", request.method, request.target, sent, exc)
            self.abort()
            keep = False
        except ClientGone:
            keep = False
        finally:
            await close_body(reply)
        if reply.length is not None and sent != reply.length and not self.closed:
            self.abort()          # never a complete-looking short response
            keep = False
        return sent, keep

    async def _drain(self) -> None:
        """Wait until the client has read enough (at most send_timeout)."""
        while self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(self._drain_waiter, self.limits.send_timeout)
            except asyncio.TimeoutError:
                self.front.count_refusal("send_timeout")
                self.abort()
                raise ClientGone(f"client read nothing for {self.limits.send_timeout:g}s") from None

    def _send_continue(self) -> None:
        if not self.closed:
            self.transport.write(CONTINUE)

    # ------------------------------------------------------------- errors

    def _refuse(self, reject: Reject) -> None:
        """A request the parser or the rules refused: answer after the requests ahead of it, then close."""
        if reject.status < 500:
            log.info("malformed request (%d) from %s: %s", reject.status, self.remote, reject)
        self.front.count_refusal(_REFUSAL_REASONS.get(reject.status, "bad_request"))
        if self._body is not None:
            self._body.fail(ClientGone(str(reject)))
            self._body = None
        if self._queue and self._queue[-1].body is not None and not self._queue[-1].body.complete:
            self._queue.pop()           # its body was malformed: it is never forwarded
        self._reject_after = reject
        self._pause_reading("refused")
        if not self._busy:
            self._next()

    def _write_error(self, reject: Reject) -> None:
        reply = error_reply(reject.status, str(reject), reject.fields)
        head = b"".join((rules.status_line(reply.status), rules.serialise_fields(reply.headers),
                         b"Content-Length: %d\r\n" % len(reply.body), CLOSE_LINE))
        self.transport.write(head + reply.body)
        self.close()

    # ------------------------------------------------------ flow control

    def _pause_reading(self, why: str) -> None:
        if not self._read_paused and not self.closed:
            self.transport.pause_reading()
        self._read_paused.add(why)

    def _resume_reading(self, why: str) -> None:
        if why in self._read_paused:
            self._read_paused.discard(why)
            if not self._read_paused and not self.closed:
                self.transport.resume_reading()


_REFUSAL_REASONS = {400: "bad_request", 405: "unknown_method", 408: "header_timeout", 414: "uri_too_long",
                    417: "expectation", 431: "header_too_large", 500: "internal_error"}


def _unknown_method(data: bytes) -> Reject:
    """A token followed by a space is a method llhttp does not know; anything else is not HTTP.

    No site can allow such a method (only methods llhttp knows can be
    forwarded), so it gets 405 like any method a site does not allow, not a
    5xx: the fault is in the request.  The Host is never read, so `Allow`
    names what every site allows.
    """
    method, space, _ = data.partition(b" ")
    if space and method and not method.translate(None, _TOKEN_BYTES):
        return Reject(405, "method not allowed", (("Allow", "GET, HEAD"),))
    return Reject(400, "not an HTTP request")


_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _first(noted: dict[int, list[bytes]], kind: int) -> str:
    values = noted.get(kind)
    return values[0].decode("latin-1") if values else ""


def _noted_of(request: Request) -> dict[int, list[bytes]]:
    """The fields the hit path and the access log look at, for a request that waited in the queue."""
    noted: dict[int, list[bytes]] = {}
    for name, value in request.raw_headers:
        kind = _NOTED.get(name.lower())
        if kind is not None:
            noted.setdefault(kind, []).append(value)
    return noted


def _only(noted: dict[int, list[bytes]], kind: int) -> bytes | None:
    values = noted.get(kind)
    return values[0] if values is not None and len(values) == 1 else None


def _first_raw(noted: dict[int, list[bytes]], kind: int) -> bytes | None:
    values = noted.get(kind)
    return values[0] if values else None
