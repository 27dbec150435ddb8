"""One HTTP/2 client connection: the sans-IO ``h2`` library framed onto the same pipeline as HTTP/1.1.

Reached two ways: ALPN ``h2`` on the HTTPS listener (``HttpConnection`` hands
the transport over once the handshake is done), or ``h2c`` prior knowledge on
the plain listener when the node allows it.  Each stream becomes the same
:class:`Request` view the HTTP/1.1 connection makes, answered by the same
``App``: fresh memory hits at once from the stored header block
(``App.hit_now``), everything else by ``App.handle`` in a task per stream.

Limits and defences, each with nginx's default where nginx has one:

* **concurrent streams** (``http2_max_concurrent_streams``, 128): advertised in
  SETTINGS, and enforced on the work itself: a stream whose client reset it
  still holds its place until its pipeline task ends, and a request beyond
  the limit is refused with ``REFUSED_STREAM`` before any work starts;
* **rapid reset** (CVE-2023-44487): streams the client resets (or that are
  refused) count against the connection; past ``RESET_ALLOWANCE`` of them,
  and once they are more than half of its streams, it gets ``GOAWAY
  ENHANCE_YOUR_CALM`` and is closed, while other connections go on;
* **CONTINUATION flood** (CVE-2024-27316 and kin): ``h2`` buffers at most 64
  CONTINUATION frames of at most ``MAX_FRAME_SIZE`` before failing the
  connection, and the decoded field section is capped by
  ``SETTINGS_MAX_HEADER_LIST_SIZE`` (the node's ``max_header_bytes``); a
  field section that never ends is cut off with the connection's deadline;
* **flow control**: request bodies are acknowledged (WINDOW_UPDATE) only as
  the pipeline reads them, so a stream buffers at most its window and the
  connection at most ``CONNECTION_WINDOW``; responses wait for the client's
  window and for the transport to drain (``send_timeout``);
* **control-frame floods** (PING, SETTINGS): their answers are writes, and
  reading stops while the client does not read what we write;
* **deadlines** as on HTTP/1.1: the first request within
  ``client_header_timeout``, then ``keepalive_timeout`` with no stream open.
  Frames alone (PING, PRIORITY) do not keep an idle connection open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack.table
import hyperframe.frame
from h2.errors import ErrorCodes

from edge.http import rules
from edge.http.connection import FOREVER, ClientConnection
from edge.http.message import ArrivingBody, BodyAborted, ClientGone, Reply, Request, close_body, error_reply
from edge.http.rules import Reject

if TYPE_CHECKING:
    from edge.http.server import Front

log = logging.getLogger("edge.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
VERSION = "2.0"                      # what the access log writes after HTTP/, as nginx does
RESET_ALLOWANCE = 100                # client resets (or refusals) a connection may cause before the ratio counts
CONNECTION_WINDOW = 1 << 20          # request-body bytes a connection may have unread, all streams together

# RFC 9113 8.2.2: connection-specific fields never appear in HTTP/2 (the
# pipeline may have put them in a reply meant for HTTP/1.1).
_CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                b"upgrade"})
# Request fields that take a request off the hit path (as in the HTTP/1.1 front).
_SLOW_FIELDS = frozenset({b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since",
                          b"if-unmodified-since"})
_STATUS = {code: str(code).encode() for code in range(100, 600)}
_STATUS_200 = [(b":status", b"200")]       # what h2 sees of a hit's fields (the block is encoded already)
_METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"     # RFC 9113 8.2.1: lower case
_BLANK = (b" ", b"\t")


class _Stream:
    __slots__ = ("id", "request", "body", "window", "reset", "finished")

    def __init__(self, stream_id: int):
        self.id = stream_id
        self.request: Request | None = None
        self.body: StreamBody | None = None
        self.window: asyncio.Future[None] | None = None   # waiting for the client's flow-control window
        self.reset = False                   # the client reset it: write nothing more
        self.finished = False                # its answer is complete (or abandoned)


def _gone(timeout: float) -> Exception:
    return ClientGone(f"no request body bytes for {timeout:g}s")


class StreamBody(ArrivingBody):
    """A request body on one stream: read bytes are given back to the client's window as they are read."""

    def __init__(self, conn: H2Connection, stream_id: int, timeout: float):
        super().__init__(_nothing, _nothing, timeout, _gone, high_water=1 << 62)   # flow control bounds it
        self._conn, self._stream_id = conn, stream_id

    async def read(self) -> bytes:
        chunk = await super().read()
        if chunk:
            self._conn.acknowledge(self._stream_id, len(chunk))
        return chunk


def _nothing() -> None:
    pass


class H2Connection(ClientConnection):
    """Owns one HTTP/2 connection.  Implements what :class:`Front` calls on its connections."""

    def __init__(self, front: Front, tls: bool):
        self.front = front
        self.app = front.app
        self.limits = limits = front.limits
        self.loop = front.loop
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.closed = False
        self.deadline = FOREVER
        self._max_streams = limits.http2_max_concurrent_streams
        # Fields are checked by _request_view (inbound) and made by us (outbound).
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False, normalize_inbound_headers=False,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.encoder = self._encoder = _BlockEncoder(self.h2.encoder)
        # HPACK stops decoding past twice the limit (GOAWAY ENHANCE_YOUR_CALM): a block between
        # the two decodes, and its stream gets a 431 that says why.
        self.h2.decoder.max_header_list_size = 2 * limits.max_header_bytes
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        })
        self.streams: dict[int, _Stream] = {}     # streams with work in progress (a task, or a body arriving)
        self._opened = 0                          # streams the client opened
        self._abusive = 0                         # streams it reset, or that were refused
        self._goaway = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport, data: bytes = b"") -> None:
        """Also called by the HTTP/1.1 connection that hands over, with any bytes it already read."""
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        self.deadline = self.loop.time() + self.limits.client_header_timeout
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        self.front.connection_opened(self)
        if data:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = FOREVER
        for stream in self.streams.values():
            self._abandon(stream)
        self._wake_writers()
        self.front.connection_closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than we write: read nothing more (no new streams, no
        # PINGs to answer) until it catches up.
        self._write_paused = True
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self.closed:
            self.transport.resume_reading()
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code; the connection is over.
            log.info("HTTP/2 protocol error from %s: %s", self.remote, exc)
            self.front.count_refusal("h2_protocol_error")
            self._flush()
            self.close()
            return
        try:
            self._events(events)
        except Exception:       # our own bug, not the client's: say so, and end only this connection
            log.exception("HTTP/2 connection from %s failed", self.remote)
            self.abort()
            return
        self._flush()

    def _events(self, events: list[h2.events.Event]) -> None:
        if self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
            # The client sent GOAWAY: it reads nothing more, whatever else came with it.
            self.close()
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.RequestReceived:
                self._request(event)
            elif kind is h2.events.DataReceived:
                self._data(event)
            elif kind is h2.events.StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.body is not None:
                    stream.body.finish()
            elif kind is h2.events.StreamReset:
                self._client_reset(event.stream_id)
            elif kind is h2.events.WindowUpdated:
                self._window_opened(event.stream_id)
            elif kind is h2.events.RemoteSettingsChanged:
                self._window_opened(0)          # INITIAL_WINDOW_SIZE may have grown every stream's
            elif kind is h2.events.TrailersReceived:
                stream = self.streams.get(event.stream_id)       # request trailers are not forwarded
                if stream is not None and stream.body is not None and event.stream_ended:
                    stream.body.finish()
            elif kind is h2.events.ConnectionTerminated:
                self.close()
                return
            if self.closed:
                return

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def expire(self) -> None:
        """The front's sweep: the deadline passed with no stream in progress."""
        if self.closed:
            return
        if self.streams:
            self.deadline = FOREVER
            return
        if self._opened == 0:
            self.front.count_refusal("header_timeout")
        self._send_goaway(ErrorCodes.NO_ERROR)
        self.close()

    def drain_now(self) -> None:
        """The node is stopping: GOAWAY now (streams already open are answered), close when idle."""
        if self.closed:
            return
        self._send_goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self.close()

    def _send_goaway(self, code: ErrorCodes) -> None:
        """GOAWAY naming the last stream we will answer.  With NO_ERROR it is graceful: the
        streams already open are still answered, so the frame is written past h2, whose
        own close_connection would refuse to send anything more."""
        if self._goaway or self.closed:
            return
        self._goaway = True
        last = self.h2.highest_inbound_stream_id
        if code != ErrorCodes.NO_ERROR:
            self.h2.close_connection(error_code=code, last_stream_id=last)
            self._flush()
            return
        self._flush()
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id, frame.error_code = last, code
        self.transport.write(frame.serialize())

    # -------------------------------------------------------------- streams

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        self._opened += 1
        if self._goaway:
            self._refuse_stream(stream_id)
            return
        if len(self.streams) >= self._max_streams:
            # Streams the client reset still hold their place until their work ends.
            self._refuse_stream(stream_id)
            self._abused()
            return
        stream = self.streams[stream_id] = _Stream(stream_id)
        self.deadline = FOREVER
        try:
            request, slow = self._request_view(event.headers)
        except Reject as reject:
            log.info("malformed HTTP/2 request (%d) from %s: %s", reject.status, self.remote, reject)
            self.front.count_refusal(_REFUSAL_REASONS.get(reject.status, "bad_request"))
            # Its body, if any, is read by nobody: _data gives its window back as it arrives.
            stream.request = Request("GET", "/", VERSION, [], self.remote, None, True, self.tls)
            self._start(stream, error_reply(reject.status, str(reject), reject.fields))
            return
        stream.request = request
        if not event.stream_ended:
            stream.body = request.body = StreamBody(self, stream_id, self.limits.client_body_timeout)
        elif not slow and not self._write_paused:
            hit = self._hit_now(request)
            if hit is not None:
                self._write_hit(stream, request, hit)
                return
        self._start(stream, None)

    def _request_view(self, headers: list[tuple[bytes, bytes]]) -> tuple[Request, bool]:
        """The Request of a decoded HEADERS block, and whether it needs the pipeline.

        The field section is checked here in one pass (RFC 9113 8.2 and 8.3), rather than by
        h2's own validation, which costs more than the rest of a hit: a malformed request
        gets a 400 on its stream, and the connection goes on.
        """
        method = path = authority = scheme = None
        fields: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        host = None
        size, slow = 0, False
        for name, value in headers:
            size += len(name) + len(value) + 32          # RFC 9113 6.5.2's accounting
            if name[:1] == b":":
                if fields or cookies:
                    raise Reject(400, f"pseudo-header {name.decode('latin-1')} after the fields")
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":authority" and authority is None:
                    authority = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                else:
                    raise Reject(400, f"unknown or repeated pseudo-header {name.decode('latin-1')}")
                continue
            if not name or name.translate(None, _NAME_BYTES):
                raise Reject(400, "header field name is not a lower-case token")
            if value.translate(None, rules.FIELD_VALUE_BYTES) or value[:1] in _BLANK or value[-1:] in _BLANK:
                raise Reject(400, "header field value has bytes outside visible ASCII, or leading or trailing space")
            if name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
                raise Reject(400, f"connection-specific field {name.decode()} in HTTP/2")
            if name == b"cookie":
                cookies.append(value)                    # RFC 9113 8.2.3: crumbs are joined again
                continue
            if name == b"host":
                if host is not None:
                    raise Reject(400, "more than one Host")
                host = value
            elif name in _SLOW_FIELDS:
                slow = True
            fields.append((name, value))
        if size > self.limits.max_header_bytes:
            raise Reject(431, f"header fields larger than {self.limits.max_header_bytes} bytes")
        if len(fields) + len(cookies) > self.limits.max_headers:
            raise Reject(431, f"more than {self.limits.max_headers} header fields")
        if method is None or not method or method.translate(None, _TOKEN_BYTES):
            raise Reject(400, "no valid :method")
        if method == b"CONNECT":
            raise Reject(405, "method not allowed", (("Allow", "GET, HEAD"),))
        if scheme is None or not path:
            raise Reject(400, "no :scheme or no :path")
        if len(path) > self.limits.max_request_line:
            raise Reject(414, f"request target longer than {self.limits.max_request_line} bytes")
        if path.translate(None, rules.TARGET_BYTES):
            rules.check_target(path)
        if authority is not None:
            # RFC 9113 8.3.1: :authority is the target's authority; a Host that says otherwise
            # makes the request malformed (two views of one request is how smuggling starts).
            if host is not None and host.lower() != authority.lower():
                raise Reject(400, ":authority and Host differ")
            if authority.translate(None, rules.TARGET_BYTES):
                raise Reject(400, ":authority has bytes outside visible ASCII")
            if host is None:
                fields.insert(0, (b"host", authority))
        elif host is None:
            raise Reject(400, "no :authority and no Host")
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        request = Request(_METHOD_NAMES.get(method) or method.decode("ascii"), path.decode("ascii"), VERSION,
                          fields, self.remote, None, True, self.tls)
        return request, slow

    def _hit_now(self, request: Request):
        host = via = None
        for name, value in request.raw_headers:
            if name == b"host":
                host = value
            elif name == b"via":
                via = value
        if self.front.redirect_hosts and not self.tls:
            return None         # h2c to a site that wants HTTPS: the pipeline redirects it
        return self.app.hit_now(request.method, request.target, host, via)

    def _write_hit(self, stream: _Stream, request: Request, hit) -> None:
        head, body, cache_status = hit
        head_only = request.method == "HEAD" or not body
        self._encoder.block = _hit_block(head)
        self.h2.send_headers(stream.id, _STATUS_200, end_stream=head_only)
        sent = 0
        if not head_only and len(body) <= min(self.h2.local_flow_control_window(stream.id),
                                              self.h2.max_outbound_frame_size):
            self.h2.send_data(stream.id, body, end_stream=True)
            sent = len(body)
        elif not head_only:
            # Larger than one frame or the window: the general writer waits for windows.
            self._flush()
            self.front.track(self.loop.create_task(self._stream_hit(stream, request, body, cache_status)))
            return
        # No flush: data_received writes what all the streams it read produced at once.
        self._log(request, 200, sent, cache_status, "", 0.0)
        self._finished(stream)

    async def _stream_hit(self, stream: _Stream, request: Request, body: bytes, cache_status: str) -> None:
        sent = 0
        try:
            sent = await self._send_data(stream, body, True)
        except ClientGone:
            pass
        self._log(request, 200, sent, cache_status, "", 0.0)
        self._finished(stream)

    def _start(self, stream: _Stream, reply: Reply | None) -> None:
        self.front.track(self.loop.create_task(self._serve(stream, reply)))

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.body is None or stream.body.complete:
            # Nobody reads it (a refused or finished stream): give the window back at once.
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        padding = event.flow_controlled_length - len(event.data)
        if padding:
            self.h2.acknowledge_received_data(padding, event.stream_id)
        if event.data:
            stream.body.feed(event.data)
        if event.stream_ended:
            stream.body.finish()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The pipeline read `size` body bytes of `stream_id`: open the client's window again."""
        if self.closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self._flush()

    def _client_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.finished:
            return
        stream.reset = True
        if stream.body is not None:
            stream.body.fail(ClientGone("client reset the stream"))
        _wake(stream)
        self._abused()

    def _abused(self) -> None:
        self._abusive += 1
        if self._abusive > RESET_ALLOWANCE and self._abusive * 2 > self._opened:
            log.warning("HTTP/2 client %s reset or overran %d of its %d streams: closing the connection",
                        self.remote, self._abusive, self._opened)
            self.front.count_refusal("h2_rapid_reset")
            self._send_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            self.abort()
            for stream in self.streams.values():
                self._abandon(stream)

    def _refuse_stream(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        except h2.exceptions.StreamClosedError:
            pass

    def _abandon(self, stream: _Stream) -> None:
        stream.reset = True
        if stream.body is not None:
            stream.body.fail(ClientGone("client closed the connection"))
        _wake(stream)

    def _window_opened(self, stream_id: int) -> None:
        if stream_id == 0:
            for stream in self.streams.values():
                _wake(stream)
        else:
            stream = self.streams.get(stream_id)
            if stream is not None:
                _wake(stream)

    def _finished(self, stream: _Stream) -> None:
        stream.finished = True
        self.streams.pop(stream.id, None)
        if self.streams or self.closed:
            return
        if self._goaway:
            self.close()
        else:
            self.deadline = self.loop.time() + self.limits.keepalive_timeout

    # ---------------------------------------------------------- answering

    async def _serve(self, stream: _Stream, reply: Reply | None) -> None:
        request = stream.request
        started = self.loop.time()
        sent = 0
        handled = reply is None
        try:
            if reply is None:
                try:
                    reply = await self.app.handle(request)
                except Exception:
                    log.exception("pipeline failed on %s %s", request.method, request.target)
                    reply = error_reply(500, "internal error")
            sent = await self._write_reply(stream, request, reply)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("writing the answer to %s %s failed", request.method, request.target)
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)
        finally:
            duration = self.loop.time() - started
            if reply is not None:
                if handled:
                    self.app.done(request, reply, sent, duration)
                self._log(request, reply.status, sent, reply.cache_status, reply.upstream, duration)
            if stream.body is not None and not stream.body.complete and not stream.reset:
                # Answered without reading the whole body: the client need not send the rest.
                self._reset(stream, ErrorCodes.NO_ERROR)
            self._finished(stream)

    async def _write_reply(self, stream: _Stream, request: Request, reply: Reply) -> int:
        if reply.head is not None:
            _, fields = _parse_head(reply.head)
        else:
            fields = [(b":status", _STATUS.get(reply.status) or str(reply.status).encode())]
            for name, value in reply.headers:
                lower = name.lower().encode("latin-1")
                if lower not in _CONNECTION_FIELDS:
                    fields.append((lower, value.encode("latin-1")))
            if reply.length is not None and reply.status not in (204, 304):
                fields.append((b"content-length", b"%d" % reply.length))
        bodyless = reply.bodyless or request.method == "HEAD" or reply.status in (204, 304)
        body = reply.body
        if stream.reset or self.closed:
            await close_body(reply)
            return 0
        if self._write_paused:
            await self._drain()
        if isinstance(body, bytes):
            self.h2.send_headers(stream.id, fields, end_stream=bodyless or not body)
            self._flush()
            if bodyless or not body:
                return 0
            return await self._send_data(stream, body, True)
        self.h2.send_headers(stream.id, fields, end_stream=bodyless)
        self._flush()
        if bodyless:
            await close_body(reply)
            return 0
        sent = 0
        try:
            async for chunk in body:
                if stream.reset or self.closed:
                    break
                if chunk:
                    sent += await self._send_data(stream, chunk, False)
            else:
                if reply.length is not None and sent != reply.length:
                    raise BodyAborted(f"{sent} of {reply.length} bytes")
                self.h2.end_stream(stream.id)
                self._flush()
        except BodyAborted as exc:
            # Never a complete-looking short response: the stream is reset, not ended.
            log.warning("%s %s: response aborted after %d bytes: %s", request.method, request.target, sent, exc)
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)
        finally:
            await close_body(reply)
        return sent

    async def _send_data(self, stream: _Stream, data: bytes, end: bool) -> int:
        """Send `data` on `stream` as the client's windows allow; ClientGone if it goes away."""
        view = memoryview(data)
        sent = 0
        while True:
            if stream.reset or self.closed:
                raise ClientGone("stream reset or connection closed")
            window = min(self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size)
            if window <= 0:
                await self._wait_window(stream)
                continue
            chunk = view[sent:sent + window]
            sent += len(chunk)
            last = sent >= len(data)
            self.h2.send_data(stream.id, chunk.tobytes() if len(chunk) < len(data) else data, end_stream=end and last)
            self._flush()
            if self._write_paused:
                await self._drain()
            if last:
                return sent

    async def _wait_window(self, stream: _Stream) -> None:
        stream.window = self.loop.create_future()
        try:
            await asyncio.wait_for(stream.window, self.limits.send_timeout)
        except asyncio.TimeoutError:
            self.front.count_refusal("send_timeout")
            self._reset(stream, ErrorCodes.FLOW_CONTROL_ERROR)
            raise ClientGone(f"client opened no window for {self.limits.send_timeout:g}s") from None

    async def _drain(self) -> None:
        while self._write_paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, self.limits.send_timeout)
            except asyncio.TimeoutError:
                self.front.count_refusal("send_timeout")
                self.abort()
                raise ClientGone(f"client read nothing for {self.limits.send_timeout:g}s") from None

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        stream.reset = True
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.ProtocolError:     # the stream (or the connection) is already closed
            return
        self._flush()

    def _log(self, request: Request, status: int, sent: int, cache_status: str, upstream: str,
             duration: float) -> None:
        access = self.front.access_log
        if access.enabled:
            host = referer = agent = b""
            for name, value in request.raw_headers:         # a multidict per hit would cost more
                if name == b"host":
                    host = value
                elif name == b"referer":
                    referer = value
                elif name == b"user-agent":
                    agent = value
            access.log(self.remote, request.method, request.target, VERSION, status, sent,
                       host.decode("latin-1"), referer.decode("latin-1"), agent.decode("latin-1"),
                       cache_status, upstream, duration)


_REFUSAL_REASONS = {400: "bad_request", 405: "unknown_method", 414: "uri_too_long", 431: "header_too_large"}


class _BlockEncoder:
    """h2's HPACK encoder, which can also send a header block encoded beforehand.

    Hit blocks are encoded once per stored object (see :func:`_hit_block`) with
    literals that never touch the dynamic table, so the same bytes are right on
    every connection; h2 is handed them through ``block`` and a one-field list.
    Everything else is encoded by h2's encoder as usual.
    """

    def __init__(self, real):
        self.__dict__["real"] = real
        self.__dict__["block"] = None

    def encode(self, headers, huffman: bool = True) -> bytes:
        block = self.block
        if block is None:
            return self.real.encode(headers, huffman)
        self.__dict__["block"] = None
        if self.real.header_table.resized:
            # A table size change must open the next header block (RFC 7541 4.2).
            return self.real.encode([]) + block
        return block

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "block":
            self.__dict__["block"] = value
        else:
            setattr(self.real, name, value)


_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAMES.setdefault(_name, _index)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` with an N-bit prefix, `first` holding the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """RFC 7541 6.2.2: a literal field without indexing (no dynamic table state, plain strings)."""
    index = _STATIC_NAMES.get(name)
    head = _integer(index, 4, 0x00) if index else b"\x00" + _integer(len(name), 7, 0x00) + name
    return head + _integer(len(value), 7, 0x00) + value


_HIT_BLOCKS: dict[bytes, bytes] = {}
HIT_BLOCKS_MAX = 4096           # distinct stored header blocks remembered encoded; then start again


def _hit_block(head: bytes) -> bytes:
    """The HPACK block of a hit's header block, its unchanging part encoded once.

    The hit path's block is the stored object's fields, then ``Cache-Status``
    (whose ttl changes) and ``Age``: only those two are encoded per hit.
    """
    cut = head.rfind(b"\r\nCache-Status: ")
    if cut < 0:
        return b"".join(_literal(n, v) for n, v in _parse_head(head)[1])
    prefix = head[:cut]
    encoded = _HIT_BLOCKS.get(prefix)
    if encoded is None:
        if len(_HIT_BLOCKS) >= HIT_BLOCKS_MAX:
            _HIT_BLOCKS.clear()
        encoded = _HIT_BLOCKS[prefix] = b"".join(_literal(n, v) for n, v in _parse_head(prefix)[1])
    return encoded + b"".join(_literal(n, v) for n, v in _field_lines(head[cut:]))


def _wake(stream: _Stream) -> None:
    waiter, stream.window = stream.window, None
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """An HTTP/1.1 header block (status line and field lines, as the store keeps it) as HTTP/2 fields."""
    status = head[9:12]
    return int(status), [(b":status", status), *_field_lines(head[head.find(b"\r\n"):])]


def _field_lines(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Field lines ("Name: value" separated by CRLF) as lower-case HTTP/2 fields, without the
    connection-specific ones."""
    fields = []
    for line in lines.split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.lower()
        if name not in _CONNECTION_FIELDS:
            fields.append((name, value.strip()))
    return fields

