"""The traffic listener of a cache node: accepts connections within limits and drains on stop.

* **max_connections** (nginx ``worker_connections``): at the limit the
  front stops calling accept, so new connections wait in the kernel's listen
  backlog (and are refused once it is full) while existing ones keep working.
* **timeouts**: each connection keeps one deadline (head, keep-alive idle);
  a sweep twice a second closes the expired ones, so the hit path sets an
  attribute instead of arming a timer per request (from the sweep's clock,
  not even a clock call).
* **drain** (SIGTERM): the listening socket closes (new connections are
  refused), idle keep-alive connections close at once, busy ones close after
  their response, and whatever is still running after ``drain_timeout`` is
  cut off.
* **TLS** (``start(..., tls=context)``): a second listener whose connections
  are handed to the same :class:`HttpConnection` once the transport has done
  the handshake.  Handshakes run as their own small tasks so a slow client
  never holds up accept, and they count against ``max_connections`` as open
  connections do; a handshake must finish within ``client_header_timeout``.
  ``tls_context`` is read at every accept: a reload swaps it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from edge.config import FrontLimits
from edge.http.accesslog import AccessLog
from edge.http.connection import ClientConnection
from edge.http.message import Reply, Request
from edge.http.protocol import HttpConnection

log = logging.getLogger("edge.http")

SWEEP_INTERVAL = 0.5


class App(Protocol):
    """What the front needs of the pipeline."""

    def hit_now(self, method: str, target: str, host: bytes | None,
                via: bytes | None) -> tuple[bytes, bytes, str] | None:
        """A fresh memory hit answered at once: (header block up to the last field line, body, X-Cache).

        None sends the request down the general path.  Counts the request itself.
        """

    async def handle(self, request: Request) -> Reply: ...

    def done(self, request: Request, reply: Reply, sent: int, duration: float) -> None:
        """Called once for every handle(), after the reply was written (or abandoned)."""


class Front:
    def __init__(self, app: App, limits: FrontLimits, access_log: AccessLog,
                 count_refusal: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.limits = limits
        self.access_log = access_log
        self.count_refusal = count_refusal
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()     # HTTP/1.1 and HTTP/2 alike
        self.draining = False
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[tuple[socket.socket, asyncio.Task]] = []
        self._handshakes: set[asyncio.Task] = set()
        # Set by the node: the server context (SNI picks the site's), and the hosts whose
        # plain-HTTP requests the pipeline redirects (the hit path must not answer them).
        self.tls_context: ssl.SSLContext | None = None
        self.redirect_hosts: frozenset[bytes] = frozenset()
        self.h2c = False                # plain-listener connections may start with the HTTP/2 preface
        self._room: asyncio.Future[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Future[None] | None = None
        self.port = 0                   # the bound port (useful when started on port 0)
        self.tls_port = 0               # the HTTPS listener's
        # The loop's clock as of the last sweep: what the hit path sets deadlines from
        # (a keep-alive deadline may be up to one sweep late; it is 75 s by default).
        self.now = self.loop.time()

    async def start(self, host: str, port: int, backlog: int = 1024, tls: bool = False,
                    reuse_port: bool = False) -> None:
        """Bind and listen (an OSError here is a bind failure), then accept in the background.

        With `tls`, connections are TLS, with ``tls_context`` as it is at each accept.
        With `reuse_port`, other workers of the node bind the same address and the
        kernel spreads new connections over them (edge.workers).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        if tls:
            self.tls_port = sock.getsockname()[1]
        else:
            self.port = sock.getsockname()[1]
        self._listeners.append((sock, self.loop.create_task(self._accept_loop(sock, tls))))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _accept_loop(self, sock: socket.socket, tls: bool) -> None:
        while True:
            if len(self.connections) + len(self._handshakes) >= self.limits.max_connections:
                # One future for every listener waiting (HTTP and HTTPS): a second one
                # must not replace the first's, or that listener never wakes again.
                if self._room is None or self._room.done():
                    self._room = self.loop.create_future()
                await asyncio.shield(self._room)
                continue
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError as exc:      # EMFILE and friends: wait a little, keep serving the others
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                task = self.loop.create_task(self._handshake(conn))
                self._handshakes.add(task)
                task.add_done_callback(self._handshake_done)
                continue
            try:
                await self.loop.connect_accepted_socket(lambda: HttpConnection(self), conn)
            except OSError as exc:
                log.info("accepted connection failed at once: %s", exc)
                conn.close()

    async def _handshake(self, conn: socket.socket) -> None:
        # The protocol's connection_made runs once the handshake is done; a failed one
        # (bad client, TLS 1.1, timeout) is the client's business: logged at debug.
        try:
            await self.loop.connect_accepted_socket(
                lambda: HttpConnection(self), conn, ssl=self.tls_context,
                ssl_handshake_timeout=self.limits.client_header_timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.count_refusal("tls_handshake")
            log.debug("TLS handshake failed: %s", exc)
            conn.close()
        except asyncio.CancelledError:      # drain: a handshake still going is cut off
            conn.close()
            raise

    def _handshake_done(self, task: asyncio.Task) -> None:
        self._handshakes.discard(task)
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def reload(self, limits: FrontLimits, access_log: AccessLog) -> AccessLog:
        """New limits and access log (a reload); returns the old log, for the caller to close.

        Connections opened from now on take the new limits, open ones keep
        those they were opened with (as nginx's old workers do); every
        request logged from now on goes to the new log.
        """
        old, self.limits, self.access_log = self.access_log, limits, access_log
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)      # max_connections may have risen: look again
        return old

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self.draining:
            conn.drain_now()

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)
        if self._all_closed is not None and not self.connections and not self._all_closed.done():
            self._all_closed.set_result(None)

    def track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sweep(self) -> None:
        self.now = now = self.loop.time()
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.expire()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    @property
    def busy(self) -> int:
        """Requests being answered on the general path now."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout, then close everything."""
        self.draining = True
        for _, accepting in self._listeners:
            accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*(t for _, t in self._listeners), *self._handshakes, return_exceptions=True)
        for sock, _ in self._listeners:
            sock.close()                # new connections are refused from here on
        for conn in list(self.connections):
            conn.drain_now()
        if self.connections:
            self._all_closed = self.loop.create_future()
            try:
                await asyncio.wait_for(self._all_closed, self.limits.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain: %d connections still busy after %gs; closing them",
                            len(self.connections), self.limits.drain_timeout)
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
