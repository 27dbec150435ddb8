"""Our HTTP/1.1 client for parents and origins: httptools (llhttp) on a keep-alive pool.

Why not aiohttp's client, which this replaced:

* a complete response followed by more bytes than its Content-Length says
  (RFC 9112 6.3) made aiohttp's parser fail the whole response ("Bad status
  line"), so the client got a 502 for an answer that had arrived whole.  Here
  the Content-Length bytes are delivered, and that connection is closed and
  counted (`on_excess`);
* on a miss it was the largest single cost of an L1's event loop (about 40%
  in `benchmarks/profile.py`): a request here is one write of a pre-joined
  head and one parser per response.

One request at a time per connection (no pipelining upstream, like nginx and
Varnish).  A request that finds its pooled connection closed by the server
before any byte of the response (the keep-alive race) is sent once more on a
new connection, if it is idempotent and none of its body was sent.

Errors are :class:`UpstreamIOError` carrying an RFC 9209 Proxy-Status error
type.  A TLS failure is never passed over: a certificate that does not verify
is `tls_certificate_error`, an alert from the upstream (say, it wants a client
certificate we do not have) `tls_alert_received` with the alert's id and name,
anything else in TLS `tls_protocol_error`.  Every wait is bounded: connecting (`connect_timeout`), the response
head (`read_timeout`), each body read (`read_timeout`), each write.  The
response head is bounded in size; a response body is buffered up to 256 KiB,
then reading from the socket pauses until the consumer takes it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from edge.http.message import ArrivingBody
from edge.http.rules import serialise_fields

log = logging.getLogger("edge.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
MAX_HEAD_BYTES = 64 * 1024          # a response head larger than this is refused (502)
MAX_FIELDS = 256
BODY_HIGH_WATER = 256 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
# The errors that mean "waited too long" (a 504 to the client, not a 502).
TIMEOUT_ERRORS = frozenset({"connection_timeout", "http_response_timeout", "connection_read_timeout",
                            "connection_write_timeout"})


class UpstreamIOError(Exception):
    """A request upstream failed; `error` is an RFC 9209 Proxy-Status error type, `params`
    the extra parameters RFC 9209 defines for it (as (name, value) pairs, in order)."""

    def __init__(self, error: str, detail: str, params: tuple[tuple[str, int | str], ...] = ()):
        super().__init__(f"{error}: {detail}")
        self.error, self.detail, self.params = error, detail, params
        self.body_started = False         # some of the request body was taken: it cannot be sent again


class _Stale(UpstreamIOError):
    """A reused connection was closed before any byte of the response: safe to try again."""


@dataclass(frozen=True)
class TlsProfile:
    """How a TLS connection upstream is verified, and which certificate it presents: one
    client SSLContext each (loaded off the loop by edge.http.tls.load)."""

    ca: Path | None = None          # the CA bundle the peer is verified against; None: the system's
    cert: Path | None = None        # our client certificate chain (mutual TLS), with its key
    key: Path | None = None


SYSTEM_TLS = TlsProfile()


@dataclass(frozen=True)
class Address:
    """Where to connect, and the authority to send as Host when the request has none.

    For https, the whole TLS identity is part of the address, and so of the pool's key: a
    connection verified against one CA bundle, presenting one client certificate or verified
    for one server name is never reused for a request that wants another.
    """

    scheme: str
    host: str
    port: int
    tls: TlsProfile | None = None   # https only (SYSTEM_TLS when not given)
    # https only: the name sent as SNI and verified in the certificate, when it is not `host`
    # (a parent is reached by its IP address but proves the site's name).
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.scheme == "https" and self.tls is None:
            object.__setattr__(self, "tls", SYSTEM_TLS)

    @classmethod
    def from_url(cls, url: str, tls: TlsProfile | None = None, server_name: str | None = None) -> Address:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        https = parts.scheme == "https"
        return cls(parts.scheme, parts.hostname, parts.port or (443 if https else 80),
                   tls if https else None, server_name if https else None)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        sni = f" (SNI {self.server_name})" if self.server_name else ""
        return f"{self.scheme}://{self.authority}{sni}"


class Http1Client:
    """Sends requests to upstreams over pooled HTTP/1.1 connections."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, source_ip: str | None = None,
                 idle_timeout: float = 30.0, max_idle_per_address: int = 64,
                 max_conns: int = 512, queue: int = 1024,
                 on_excess: Callable[[Address], None] | None = None):
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        # At most `max_conns` connections open per address (in use or idle, as
        # nginx's max_conns); up to `queue` requests wait for one, the rest get
        # connection_limit_reached at once.
        self.max_conns, self.queue = max_conns, queue
        self._opened: dict[Address, int] = {}
        self._waiting: dict[Address, deque[asyncio.Future[_Connection | None]]] = {}
        # Connections leave from the node's own address so that parents and
        # origins see which node asked, as they would across hosts.
        self._local_addr = (source_ip, 0) if source_ip and source_ip not in ("0.0.0.0", "::") else None
        self._idle_timeout, self._max_idle = idle_timeout, max_idle_per_address
        self._on_excess = on_excess
        self._idle: dict[Address, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        # TLS profile -> its client context, loaded off the loop (edge.http.tls.load) and
        # replaced on reload.
        self.tls_contexts: dict[TlsProfile, ssl.SSLContext] = {}

    async def request(self, address: Address, method: str, target: str, fields: Iterable[tuple[str, str]],
                      body: AsyncIterator[bytes] | None = None, *,
                      read_timeout: float | None = None, deadline: float | None = None) -> UpstreamResponse:
        """Send one request; returns once the response head has arrived.

        `fields` are sent as given, plus Host (when absent) and the body's
        framing: a body with a Content-Length field is sent as it is, any
        other body chunked.  Waiting for a connection, connecting and waiting
        for the head all end by `deadline` (loop time) when one is given.
        The caller must `release()` the response.
        """
        fields = list(fields)
        names = {name.lower() for name, _ in fields}
        if "host" not in names:
            fields.insert(0, ("Host", address.authority))
        if body is not None and "content-length" not in names:
            fields.append(("Transfer-Encoding", "chunked"))
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + serialise_fields(fields) + b"\r\n"
        timeout = self.read_timeout if read_timeout is None else read_timeout
        chunked = body is not None and "content-length" not in names
        sent = _SentBody(body, chunked) if body is not None else None
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        reuse = True
        while True:
            left = timeout if deadline is None else min(timeout, deadline - loop.time())
            try:
                if left <= 0:
                    raise UpstreamIOError("http_response_timeout", "the request's upstream deadline passed")
                if connection is None:
                    connection = await self._acquire(address, left, reuse)
                if connection is None:
                    connection = await self._connect(address, left)
                response = await connection.exchange(head, sent, method, left, timeout)
            except UpstreamIOError as exc:
                exc.body_started = sent is not None and sent.started
                if isinstance(exc, _Stale) and method in IDEMPOTENT and not exc.body_started:
                    connection, reuse = None, False   # a new connection (the pool may hold more dead ones)
                    continue
                raise
            response.body_started = sent is not None and sent.started
            return response

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()

    def stats(self) -> list[tuple[Address, int, int, int]]:
        """Per address: connections in use, idle, and requests queued for one."""
        return [(address, opened - len(self._idle.get(address, ())), len(self._idle.get(address, ())),
                 len(self._waiting.get(address, ())))
                for address, opened in self._opened.items()]

    # ------------------------------------------------------------------ pool

    async def _acquire(self, address: Address, timeout: float, reuse: bool) -> _Connection | None:
        """A pooled connection, or None with a slot reserved to open one; waits while the address is full."""
        if reuse:
            connection = self._pooled(address)
            if connection is not None:
                return connection
        if self._opened.get(address, 0) < self.max_conns:
            self._opened[address] = self._opened.get(address, 0) + 1
            return None
        waiting = self._waiting.setdefault(address, deque())
        if len(waiting) >= self.queue:
            raise UpstreamIOError("connection_limit_reached",
                                  f"{address}: {self.max_conns} connections busy and {self.queue} requests queued")
        turn: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        try:
            return await asyncio.wait_for(turn, timeout)
        except asyncio.TimeoutError:
            raise UpstreamIOError("connection_limit_reached",
                                  f"{address}: no connection free within {timeout:g}s") from None
        finally:
            if turn in waiting:
                waiting.remove(turn)

    def _hand_over(self, address: Address, connection: _Connection | None) -> bool:
        """Give a released connection (or, with None, a free slot) to the first waiter; False if none waits."""
        waiting = self._waiting.get(address)
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(connection)
                return True
        return False

    def _slot_freed(self, address: Address) -> None:
        if not self._hand_over(address, None):
            left = self._opened.get(address, 1) - 1
            if left:
                self._opened[address] = left
            else:
                self._opened.pop(address, None)

    def _pooled(self, address: Address) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._idle_timeout:
                return connection
            connection.abort()
        return None

    def _put_back(self, connection: _Connection) -> None:
        if self._hand_over(connection.address, connection):
            return
        idle = self._idle.setdefault(connection.address, [])
        if len(idle) >= self._max_idle:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        if connection not in self._open:
            return
        self._open.discard(connection)
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)
        self._slot_freed(connection.address)

    def _excess(self, address: Address, count: int) -> None:
        log.warning("upstream %s sent %d bytes beyond its response; connection closed", address, count)
        if self._on_excess is not None:
            self._on_excess(address)

    async def _connect(self, address: Address, timeout: float) -> _Connection:
        """Open a connection in the slot `_acquire` reserved; the slot is freed again if it fails."""
        loop = asyncio.get_running_loop()
        tls, server_name = None, None
        if address.scheme == "https":
            assert address.tls is not None
            tls = self.tls_contexts.get(address.tls)
            if tls is None and address.tls == SYSTEM_TLS:
                # A client used on its own (not by a node, which loads every context it needs
                # off the loop): the system's CA store, verification and host-name check on.
                tls = self.tls_contexts[SYSTEM_TLS] = ssl.create_default_context()
            if tls is None:         # a bug (the node loads every profile): never fall back to less
                self._slot_freed(address)
                raise UpstreamIOError("tls_certificate_error", f"{address}: TLS settings {address.tls} not loaded")
            server_name = address.server_name      # None: asyncio sends (and verifies) `host`
        timeout = min(timeout, self.connect_timeout)
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(self, address), address.host, address.port, ssl=tls,
                server_hostname=server_name, local_addr=self._local_addr), timeout)
        except BaseException as exc:
            self._slot_freed(address)
            raise _connect_error(exc, address, timeout) from None
        self._open.add(connection)
        return connection


def _connect_error(exc: BaseException, address: Address, timeout: float) -> BaseException:
    """What a failed connect means, as an RFC 9209 error type (anything else passes unchanged)."""
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamIOError("connection_timeout", f"no connection to {address} within {timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamIOError("connection_refused", f"{address}: {exc.strerror or exc}")
    if isinstance(exc, socket.gaierror):
        return UpstreamIOError("dns_error", f"{address.host}: {exc.strerror or exc}")
    if isinstance(exc, ssl.SSLError):
        return tls_error(exc, address)
    if isinstance(exc, OSError):
        return UpstreamIOError("destination_unavailable", f"{address}: {exc.strerror or exc}")
    return exc


# OpenSSL's reason for a fatal alert received from the peer -> the alert's id and its name
# in the IANA TLS Alerts registry (RFC 8446 6.2 and RFC 9209 2.3.15 alert-id/alert-message).
_ALERTS = {
    "SSLV3_ALERT_UNEXPECTED_MESSAGE": (10, "unexpected_message"),
    "SSLV3_ALERT_BAD_RECORD_MAC": (20, "bad_record_mac"),
    "TLSV1_ALERT_DECRYPTION_FAILED": (21, "decryption_failed_RESERVED"),
    "TLSV1_ALERT_RECORD_OVERFLOW": (22, "record_overflow"),
    "SSLV3_ALERT_DECOMPRESSION_FAILURE": (30, "decompression_failure_RESERVED"),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (40, "handshake_failure"),
    "SSLV3_ALERT_NO_CERTIFICATE": (41, "no_certificate_RESERVED"),
    "SSLV3_ALERT_BAD_CERTIFICATE": (42, "bad_certificate"),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (43, "unsupported_certificate"),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": (44, "certificate_revoked"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (45, "certificate_expired"),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (46, "certificate_unknown"),
    "SSLV3_ALERT_ILLEGAL_PARAMETER": (47, "illegal_parameter"),
    "TLSV1_ALERT_UNKNOWN_CA": (48, "unknown_ca"),
    "TLSV1_ALERT_ACCESS_DENIED": (49, "access_denied"),
    "TLSV1_ALERT_DECODE_ERROR": (50, "decode_error"),
    "TLSV1_ALERT_DECRYPT_ERROR": (51, "decrypt_error"),
    "TLSV1_ALERT_EXPORT_RESTRICTION": (60, "export_restriction_RESERVED"),
    "TLSV1_ALERT_PROTOCOL_VERSION": (70, "protocol_version"),
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": (71, "insufficient_security"),
    "TLSV1_ALERT_INTERNAL_ERROR": (80, "internal_error"),
    "TLSV1_ALERT_INAPPROPRIATE_FALLBACK": (86, "inappropriate_fallback"),
    "TLSV1_ALERT_USER_CANCELLED": (90, "user_canceled"),
    "TLSV1_ALERT_NO_RENEGOTIATION": (100, "no_renegotiation"),
    "TLSV13_ALERT_MISSING_EXTENSION": (109, "missing_extension"),
    "TLSV1_UNSUPPORTED_EXTENSION": (110, "unsupported_extension"),
    "TLSV1_CERTIFICATE_UNOBTAINABLE": (111, "certificate_unobtainable_RESERVED"),
    "TLSV1_UNRECOGNIZED_NAME": (112, "unrecognized_name"),
    "TLSV1_BAD_CERTIFICATE_STATUS_RESPONSE": (113, "bad_certificate_status_response"),
    "TLSV1_BAD_CERTIFICATE_HASH_VALUE": (114, "bad_certificate_hash_value_RESERVED"),
    "TLSV1_ALERT_UNKNOWN_PSK_IDENTITY": (115, "unknown_psk_identity"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (116, "certificate_required"),
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": (120, "no_application_protocol"),
}


def tls_error(exc: ssl.SSLError, address: Address | str) -> UpstreamIOError:
    """What a TLS failure with an upstream means, as an RFC 9209 error type (2.3.13 to 2.3.15).

    An alert the upstream sent is told apart from a failure found here: with TLS 1.3 a
    server checks our client certificate only after the handshake has completed on our
    side, so its refusal arrives as an alert on the first read, not on connect.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The upstream's certificate did not verify (and is never accepted anyway).
        return UpstreamIOError("tls_certificate_error", f"{address}: {exc.verify_message or exc.reason}")
    reason = exc.reason or ""
    alert = _ALERTS.get(reason)
    if alert is not None:
        alert_id, name = alert
        return UpstreamIOError("tls_alert_received", f"{address}: the upstream sent TLS alert {name} ({alert_id})",
                               (("alert-id", alert_id), ("alert-message", name)))
    if "_ALERT_" in reason:         # an alert OpenSSL knows and this table does not: no id to give
        name = reason.split("_ALERT_", 1)[1].lower()
        return UpstreamIOError("tls_alert_received", f"{address}: the upstream sent TLS alert {name}",
                               (("alert-message", name),))
    return UpstreamIOError("tls_protocol_error", f"{address}: {exc}")


class _SentBody:
    """A request body on its way out; `started` once any byte has been taken from it."""

    def __init__(self, chunks: AsyncIterator[bytes], chunked: bool):
        self.chunks, self.chunked, self.started = chunks, chunked, False


class _Connection(asyncio.Protocol):
    """One upstream connection: at most one exchange at a time."""

    def __init__(self, client: Http1Client, address: Address):
        self.client, self.address = client, address
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.used = False                 # an exchange ran on it before (it came from the pool)
        self.idle_since = 0.0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- asyncio

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            # Bytes nobody asked for: the stream is out of step; never reuse it.
            self.client._excess(self.address, len(data))
            self.abort()
            return
        response._feed(data)

    def eof_received(self) -> bool:
        return False                      # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._lost(exc)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(UpstreamIOError("connection_terminated", "closed while sending the request"))
        self.client._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -------------------------------------------------------------- exchange

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    async def exchange(self, head: bytes, body: _SentBody | None, method: str,
                       head_timeout: float, read_timeout: float) -> UpstreamResponse:
        """Send a request and wait up to `head_timeout` for its response head; each later
        read of the body (and each write of the request body) waits up to `read_timeout`."""
        reused, self.used = self.used, True
        response = self.response = UpstreamResponse(self, method, read_timeout)
        try:
            self.transport.write(head)
            if body is not None:
                await self._send_body(body, read_timeout)
            return await response._wait_head(head_timeout, reused)
        except BaseException:
            self.abort()
            if response._head.done() and not response._head.cancelled():
                response._head.exception()      # retrieved: the error is the one being raised
            raise

    async def _send_body(self, body: _SentBody, timeout: float) -> None:
        write = self.transport.write
        async for chunk in body.chunks:
            body.started = True
            if not chunk:
                continue
            if body.chunked:
                write(b"%x\r\n" % len(chunk))
                write(chunk)
                write(b"\r\n")
            else:
                write(chunk)
            if self._write_paused:
                await self._drain(timeout)
            if self.closed:
                raise UpstreamIOError("connection_terminated", "closed while sending the request body")
        if body.chunked:
            write(b"0\r\n\r\n")

    async def _drain(self, timeout: float) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._drained, timeout)
        except asyncio.TimeoutError:
            raise UpstreamIOError("connection_write_timeout",
                                  f"request body not taken for {timeout:g}s") from None

    def finished(self, response: UpstreamResponse) -> None:
        """The consumer is done with `response`: pool the connection when it can be reused."""
        if self.response is not response:
            return
        self.response = None
        if self.closed or not response.reusable:
            self.abort()
        else:
            self.transport.resume_reading()   # the body may have paused it, and ended unread
            self.client._put_back(self)


class UpstreamResponse:
    """A response head, and its body as it arrives.

    `headers` decode values with surrogateescape, so serialising them again
    gives back the bytes received.  `content_length` is the field's value
    (None when absent), also for HEAD and 304.
    """

    def __init__(self, connection: _Connection, method: str, timeout: float):
        self._connection = connection
        self._head_only = method == "HEAD"
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._interim = False
        self._until_close = False
        self._received = 0
        self.status = 0
        self.version = "1.1"
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self.complete = False             # the whole response has arrived
        self.body_started = False         # some of the request body was sent
        self.keep_alive = False
        self.excess = False
        self._body = ArrivingBody(connection.transport.pause_reading, connection.transport.resume_reading,
                                  timeout, _body_timeout, BODY_HIGH_WATER)

    # ------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.excess = True            # a second message where none was asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES or len(self._fields) >= MAX_FIELDS:
            raise UpstreamIOError("http_response_header_section_size",
                                  f"response head over {MAX_HEAD_BYTES} bytes or {MAX_FIELDS} fields")
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx interim responses (100, 103) are not forwarded; the final one follows.
            if status == 101:
                raise UpstreamIOError("http_upgrade_failed", "upstream switched protocols unasked")
            self._interim = True
            self._fields, self._head_bytes = [], 0
            return
        self.status = status
        self.version = self._parser.get_http_version()
        self.keep_alive = self._parser.should_keep_alive()
        headers = self.headers
        for name, value in self._fields:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        self._fields = []
        length = headers.get("Content-Length")
        if length is not None:
            self.content_length = int(length)          # llhttp has checked it is one number
        if self._head_only or status in _NO_BODY_STATUSES:
            self._complete()
        elif length is None and not _chunked(headers):
            self._until_close = True                   # RFC 9112 6.3 item 8: the body ends at close
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self.complete:
            self.excess = True            # a body after a HEAD response
            return
        self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete()

    def _complete(self) -> None:
        if not self.complete:
            self.complete = True
            self._body.finish()

    # ------------------------------------------------------- connection side

    def _feed(self, data: bytes) -> None:
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:
                self.excess = True        # bytes after the response that are not a response
            else:
                cause = exc.__context__ if isinstance(exc.__context__, UpstreamIOError) else None
                self._fail(cause or UpstreamIOError("http_protocol_error", f"bad response: {exc}"))
                self._connection.abort()
                return
        if self.excess:
            self._connection.client._excess(self._connection.address, len(data))
            self._connection.abort()
        elif self._received > MAX_HEAD_BYTES and not self._head.done():
            # httptools joins a field's pieces before calling on_header: bound the head here too.
            self._fail(UpstreamIOError("http_response_header_section_size",
                                       f"no complete response head in {MAX_HEAD_BYTES} bytes"))
            self._connection.abort()

    def _lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self._until_close and self._head.done():
            self._complete()
            return
        reason = f": {exc}" if exc else ""
        if not self._head.done() and isinstance(exc, ssl.SSLError):
            self._fail(tls_error(exc, self._connection.address))
        elif not self._head.done():
            self._fail(UpstreamIOError("connection_terminated", f"closed before a response{reason}"))
        else:
            self._fail(UpstreamIOError("http_response_incomplete",
                                       f"closed after {self._body.received} body bytes{reason}"))

    def _fail(self, error: UpstreamIOError) -> None:
        if not self._head.done():
            self._head.set_exception(error)
        self._body.fail(error)

    async def _wait_head(self, timeout: float, reused: bool) -> UpstreamResponse:
        try:
            await asyncio.wait_for(self._head, timeout)
        except asyncio.TimeoutError:
            raise UpstreamIOError("http_response_timeout", f"no response within {timeout:g}s") from None
        except UpstreamIOError as exc:
            if reused and self._received == 0 and exc.error == "connection_terminated":
                raise _Stale(exc.error, exc.detail) from None
            raise
        return self

    # ---------------------------------------------------------- consumer side

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.excess and not self._until_close

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        return await self._body.read()

    async def read(self) -> bytes:
        """The whole body (the caller knows it is small)."""
        return b"".join([chunk async for chunk in self._body])

    def release(self) -> None:
        """Done with this response: the connection goes back to the pool, or is closed
        when the body was not read to its end."""
        self._connection.finished(self)

    def close(self) -> None:
        """Done, and the rest of the body is not wanted: close the connection."""
        self._connection.abort()
        self._connection.finished(self)


def _chunked(headers: CIMultiDict[str]) -> bool:
    codings = ",".join(headers.getall("Transfer-Encoding", ()))
    return codings.rsplit(",", 1)[-1].strip().lower() == "chunked"


def _body_timeout(timeout: float) -> Exception:
    return UpstreamIOError("connection_read_timeout", f"no response body bytes for {timeout:g}s")
