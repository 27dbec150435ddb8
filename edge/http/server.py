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
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from edge.config import FrontLimits
from edge.http.accesslog import AccessLog
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
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self._tasks: set[asyncio.Task] = set()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._room: asyncio.Future[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Future[None] | None = None
        self.port = 0                   # the bound port (useful when started on port 0)
        # The loop's clock as of the last sweep: what the hit path sets deadlines from
        # (a keep-alive deadline may be up to one sweep late; it is 75 s by default).
        self.now = self.loop.time()

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        """Bind and listen (an OSError here is a bind failure), then accept in the background."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = self.loop.create_task(self._accept_loop())
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _accept_loop(self) -> None:
        sock = self._sock
        while True:
            if len(self.connections) >= self.limits.max_connections:
                self._room = self.loop.create_future()
                await self._room
                continue
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError as exc:      # EMFILE and friends: wait a little, keep serving the others
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await self.loop.connect_accepted_socket(lambda: HttpConnection(self), conn)
            except OSError as exc:
                log.info("accepted connection failed at once: %s", exc)
                conn.close()

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

    def connection_opened(self, conn: HttpConnection) -> None:
        self.connections.add(conn)
        if self.draining:
            conn.drain_now()

    def connection_closed(self, conn: HttpConnection) -> None:
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
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()          # new connections are refused from here on
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
