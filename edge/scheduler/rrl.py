"""Response rate limiting per client network, as Knot's and NSD's RRL do it.

A reflection attack sends small queries with a victim's source address
and lets the server send the victim its answers.  RRL bounds the answers
one client network (a /24 of IPv4, a /56 of IPv6) gets over UDP: a token
bucket per network refilled at `rate` tokens a second, holding at most one
second's worth (a burst of `rate`).  A query that finds the bucket empty is
not answered, except that every `slip`-th of them gets an empty answer
with TC set (Knot's and NSD's "slip"), so a real client behind a limited
network retries over TCP, where its address is proven and no limit applies.
`slip` 0 drops them all, 1 truncates them all.

Buckets live in a fixed table, like Knot's ``rate-limit-table-size``: a
network takes the slot its number hashes to, and a newcomer replaces
whoever was there.  Memory does not grow with the number of networks, and a
replaced network starts with a full bucket, which errs towards answering.

Pure: the caller passes the clock.
"""

from __future__ import annotations

ANSWER, SLIP, DROP = 0, 1, 2
IPV4_PREFIX, IPV6_PREFIX = 24, 56          # Knot's and BIND's defaults
_IPV6_TAG = 1 << IPV6_PREFIX              # above any /56 number: IPv6 networks never equal IPv4 ones


def network_key(version: int, value: int) -> int:
    """The client network of an address (given as an integer): its /24 or /56, as a number."""
    if version == 4:
        return value >> (32 - IPV4_PREFIX)
    return (value >> (128 - IPV6_PREFIX)) | _IPV6_TAG


class RateLimiter:
    """Token buckets per client network in a fixed table; :meth:`check` says what to do with one answer."""

    def __init__(self, rate: float, slip: int, table_size: int):
        if rate <= 0 or slip < 0 or table_size < 1:
            raise ValueError("rate must be positive, slip at least 0, table_size at least 1")
        self.rate = float(rate)
        self.slip = slip
        self.size = table_size
        # slot -> [network, tokens, last refill time, answers refused since the bucket was made]
        self._slots: list[list | None] = [None] * table_size
        self.slipped = 0
        self.dropped = 0

    def check(self, network: int, now: float) -> int:
        """ANSWER, SLIP (send a truncated answer) or DROP for one answer to `network` at `now`."""
        index = network % self.size
        bucket = self._slots[index]
        if bucket is None or bucket[0] != network:
            self._slots[index] = [network, self.rate - 1.0, now, 0]
            return ANSWER
        tokens = bucket[1] + (now - bucket[2]) * self.rate
        if tokens > self.rate:
            tokens = self.rate
        bucket[2] = now
        if tokens >= 1.0:
            bucket[1] = tokens - 1.0
            return ANSWER
        bucket[1] = tokens
        bucket[3] += 1
        if self.slip and bucket[3] % self.slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP

    def networks(self) -> int:
        """Slots in use (for tests and status)."""
        return sum(1 for bucket in self._slots if bucket is not None)
