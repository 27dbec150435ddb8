"""Where a client is: coverage-zone lookup and great-circle distance.

Pure functions and a read-only table, built once at start so that the
per-query path is a handful of dict lookups.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EARTH_RADIUS_KM = 6371.0088   # IUGG mean radius


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km between two points (haversine formula).

    Haversine rather than the spherical law of cosines because it stays
    accurate for the short distances that decide between neighbouring edges.
    """
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class CoverageMatch:
    """The coverage block a client address fell into."""

    network: IPNetwork
    region: str


class _FamilyTable:
    """Longest-prefix match for one address family.

    One dict per prefix length present (network int -> match), probed from the
    longest length down: a coverage file has few distinct lengths, so a lookup
    is a few masks and dict probes whatever the number of blocks.
    """

    def __init__(self, bits: int, blocks: list[CoverageMatch]):
        self.bits = bits
        self.by_length: dict[int, dict[int, CoverageMatch]] = {}
        for block in blocks:
            self.by_length.setdefault(block.network.prefixlen, {})[int(block.network.network_address)] = block
        self.lengths = sorted(self.by_length, reverse=True)
        self.masks = {n: ((1 << bits) - 1) ^ ((1 << (bits - n)) - 1) for n in self.lengths}
        self._probes = [(self.masks[n], self.by_length[n]) for n in self.lengths]
        # Direct children of each block (None: the root), for the ECS scope.
        self.children: dict[IPNetwork | None, list[IPNetwork]] = {}
        for block in blocks:
            parent = self._longest(int(block.network.network_address), below=block.network.prefixlen)
            key = parent.network if parent else None
            self.children.setdefault(key, []).append(block.network)

    def _longest(self, value: int, below: int | None = None) -> CoverageMatch | None:
        for length in self.lengths:
            if below is not None and length >= below:
                continue
            match = self.by_length[length].get(value & self.masks[length])
            if match is not None:
                return match
        return None

    def lookup(self, value: int) -> CoverageMatch | None:
        """:meth:`_longest` without the `below` bound: the per-query lookup, kept to one loop."""
        for mask, blocks in self._probes:
            match = blocks.get(value & mask)
            if match is not None:
                return match
        return None

    def scope(self, value: int, match: CoverageMatch | None) -> int:
        """The shortest prefix of `value` whose every address gets the same block.

        That is the ECS scope prefix length of RFC 7871 section 7.2.1: the
        answer holds for the matched block except where a more specific block
        nested in it (a direct child) carves out a piece; the prefix must be
        long enough to leave every such child out.
        """
        scope = match.network.prefixlen if match else 0
        for child in self.children.get(match.network if match else None, ()):
            common = self.bits - (value ^ int(child.network_address)).bit_length()
            scope = max(scope, min(common, child.prefixlen - 1) + 1)
        return scope


class CoverageMap:
    """Client CIDR block -> region, longest prefix wins (Traffic Control's coverage zone)."""

    def __init__(self, blocks: Iterable[tuple[IPNetwork, str]]):
        v4: list[CoverageMatch] = []
        v6: list[CoverageMatch] = []
        for network, region in blocks:
            (v4 if network.version == 4 else v6).append(CoverageMatch(network, region))
        self._tables = {4: _FamilyTable(32, v4), 6: _FamilyTable(128, v6)}
        # version -> lookup of an address given as an integer (the answer cache's hit path).
        self.lookups = {version: table.lookup for version, table in self._tables.items()}

    def lookup(self, address: IPAddress) -> CoverageMatch | None:
        """The most specific block holding `address`, or None."""
        return self._tables[address.version].lookup(int(address))

    def lookup_value(self, version: int, value: int) -> CoverageMatch | None:
        """:meth:`lookup` for an address given as an integer (the cache's hit path builds no objects)."""
        return self._tables[version].lookup(value)

    def scope(self, address: IPAddress, match: CoverageMatch | None) -> int:
        """ECS scope prefix length for an answer located by `match` (RFC 7871 section 7.2.1)."""
        return self._tables[address.version].scope(int(address), match)

    def scope_value(self, version: int, value: int, match: CoverageMatch | None) -> int:
        """:meth:`scope` for an address given as an integer."""
        return self._tables[version].scope(value, match)
