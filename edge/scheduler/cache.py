"""The answer cache: rendered answers in wire format, keyed by what they depend on, bounded in bytes.

An answer depends on the query only through the lower-cased question
(name, type, class), the flags that change it (RD is echoed; CD and DO are
kept apart as well), whether EDNS was present and the size limit the
answer was rendered for; on the client only through its place (the region,
or with a client subnet the subnet's family, length and scope, see
``Answerer.place``); and on health only through the generation, which
moves when an edge goes up or down or becomes overloaded or not.  Those
make the key (:func:`answer_key`).

An entry is a rendered answer cut around what differs between queries
with one key: the ID, the question as sent (its 0x20 case; owner names
compressed to it show that case too) and the client subnet's address bytes,
which end the answer's OPT record.  A hit is the query's ID, the entry's
head (flags and counts), the query's question, the entry's tail and the
query's subnet address: no dnspython.  :func:`template` cuts an answer
only if it has exactly that shape, so a hit is byte for byte what the
full path would have sent.

In front of that, for UDP, answers are also kept by the whole query packet
after its ID (with the client's place and the generation), the way
PowerDNS's packet cache keys: a resolver repeating a query byte for byte
gets the answer without the query being read at all, which is most of what
a hit costs.  Such an entry is made only when the key above has already
been hit (so a flood of new names makes none) and the name is in lower
case (a resolver randomising case never repeats a packet), and lives in
the same bound.

Bounded in bytes, least recently used out first (never a wholesale
clear): a flood of new names, cases or subnets only pushes out the coldest
entries.  The LRU is an OrderedDict (a lookup and a move, both in C)
rather than cachetools' LRUCache, which keeps three dicts per entry (data,
sizes, order: about 60 bytes more an entry, measured) and takes three
Python-level calls a lookup (0.23 against 0.15 us, measured).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

from edge.scheduler.wire import CD, HEADER, OPTION_ECS, RD, QueryView

# What an entry costs besides its bytes: the key tuple and its name, the entry
# tuple, two bytes objects' headers, and the OrderedDict's slot and link.
# Measured with tracemalloc at about 400 bytes (tests check it).
ENTRY_OVERHEAD = 512


class CachedAnswer(NamedTuple):
    head: bytes           # the answer's header after the ID: flags and section counts
    tail: bytes           # everything after the question, less the client subnet address at the end
    tally: object         # what the answer counts as (the resolver's, counted on every hit)
    size: int             # bytes charged against the cache's bound


def answer_key(view: QueryView, limit: int, place: Hashable, generation: int) -> tuple:
    """The cache key of a query answered within `limit` bytes, from a client at `place`."""
    shape = (view.flags & (RD | CD)) | view.do << 16 | view.edns << 17 | limit << 18
    return (view.qkey, shape, place, generation)


def template(reply: bytes, wire: bytes, view: QueryView) -> tuple[bytes, bytes] | None:
    """`reply` to `wire` cut into head and tail, or None if it is not of the shape a hit rebuilds.

    The reply must carry the query's ID and its question byte for byte, and
    with a client subnet end with the echo of it (RFC 7871 section 7.2.1:
    family, source length, a scope, the query's address bytes).
    """
    end = view.question_end
    if reply[:2] != wire[:2] or reply[HEADER:end] != wire[HEADER:end]:
        return None
    cut = len(reply)
    if view.ecs_family:
        address = view.ecs_address
        cut -= len(address)
        option = (OPTION_ECS.to_bytes(2, "big") + (4 + len(address)).to_bytes(2, "big")
                  + view.ecs_family.to_bytes(2, "big") + bytes([view.ecs_srclen]))
        if reply[cut - 8:cut - 1] != option or reply[cut:] != address:
            return None
    return reply[2:HEADER], reply[end:cut]


def assemble(wire: bytes, view: QueryView, entry: CachedAnswer) -> bytes:
    """The answer to `wire` from a cached entry of its key."""
    return b"".join((wire[:2], entry.head, wire[HEADER:view.question_end], entry.tail, view.ecs_address))


def repeat_key(wire: bytes, place: Hashable, generation: int) -> tuple:
    """The key of a UDP query packet repeated byte for byte after its ID (three items: never an answer_key)."""
    return (wire[2:], place, generation)


class AnswerCache:
    """Answers by key, at most `max_bytes` of them (0: nothing is kept), with hit and miss counts.

    Entries under an :func:`answer_key` are templates (head, tail); under a
    :func:`repeat_key`, the whole answer after its ID is the head.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, CachedAnswer] = OrderedDict()   # least recently used first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple) -> CachedAnswer | None:
        """The entry for `key` (now the most recently used), counting a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def repeat(self, key: tuple) -> CachedAnswer | None:
        """The entry for a repeated packet: a hit if there is one, nothing counted if not (a lookup by
        :func:`answer_key` follows and counts)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def bypass(self) -> None:
        """Count a query that could not use the cache (the pre-parser handed it on): a miss."""
        self.misses += 1

    def put(self, key: tuple, head: bytes, tail: bytes, tally: object) -> bool:
        """Keep an answer under `key`, pushing out the least recently used as needed; False if too big."""
        size = len(key[0]) + len(head) + len(tail) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        while self.bytes + size > self.max_bytes:
            _, evicted = entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1
        entries[key] = CachedAnswer(head, tail, tally, size)
        self.bytes += size
        return True

    @property
    def entries(self) -> int:
        return len(self._entries)
