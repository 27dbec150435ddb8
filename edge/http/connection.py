"""What the front keeps of every client connection, whatever protocol it speaks.

:class:`~edge.http.server.Front` holds HTTP/1.1 (:mod:`edge.http.protocol`) and HTTP/2
(:mod:`edge.http.h2`) connections in one set: its sweep closes those whose
``deadline`` passed (``expire``), and a drain asks each to finish (``drain_now``)
and then cuts off what is left (``abort``).
"""

from __future__ import annotations

import asyncio

FOREVER = float("inf")


class ClientConnection(asyncio.Protocol):
    transport: asyncio.Transport | None = None
    closed = False
    deadline = FOREVER

    def close(self) -> None:
        """Close after what was written is sent."""
        if not self.closed:
            self.closed = True
            self.deadline = FOREVER
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what was not sent."""
        self.closed = True
        self.deadline = FOREVER
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        """The front's sweep: `deadline` passed."""
        raise NotImplementedError

    def drain_now(self) -> None:
        """The node is stopping: finish what is in progress, then close."""
        raise NotImplementedError
