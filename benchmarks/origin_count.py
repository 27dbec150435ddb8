"""Count origin requests for one URL, from the origin's own X-Origin-Hits header.

The origin answers every request with ``X-Origin-Hits: N``, the number of
requests it has received for that URL (path plus raw query).  Asking the
origin directly for the URL returns that count including the question
itself, so requests that reached the origin between two questions are
``after - before - 1``.  Only headers are read: for a 1 GiB object the
connection is dropped before the body.
"""

from __future__ import annotations

import http.client

from benchmarks.layout import ORIGIN, Endpoint


def origin_serves(path_and_query: str, host: str, origin: Endpoint = ORIGIN, timeout_s: float = 30.0) -> int:
    """The origin's count for this URL, including this request."""
    connection = http.client.HTTPConnection(origin.host, origin.port, timeout=timeout_s)
    try:
        connection.request("GET", path_and_query, headers={"Host": host})
        response = connection.getresponse()
        value = response.getheader("X-Origin-Hits")
        if value is None:
            raise RuntimeError(f"origin gave no X-Origin-Hits for {path_and_query}")
        return int(value)
    finally:
        connection.close()


class OriginCounter:
    """Origin requests for one URL between calls to :meth:`take`."""

    def __init__(self, path_and_query: str, host: str, origin: Endpoint = ORIGIN):
        self.path = path_and_query
        self.host = host
        self.origin = origin
        self._last = origin_serves(path_and_query, host, origin)

    def take(self) -> int:
        """Requests that reached the origin since the last call (our probes excluded)."""
        now = origin_serves(self.path, self.host, self.origin)
        served, self._last = now - self._last - 1, now
        return served
