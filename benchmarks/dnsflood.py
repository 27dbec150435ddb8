"""A flood of distinct DNS queries for the scheduler's memory bound: random names, 0x20 case, client subnets.

Packets are built by hand (seeded, so a run can be repeated) rather than
with dnspython, so that building them costs the client little: every one
asks for a name never asked before (a random label under one of the
scheduler's zones, in random case), half of them with an EDNS Client Subnet
option of a random IPv4 or IPv6 prefix.  :func:`flood` keeps a fixed number
of them in flight, so the flood runs as fast as the server answers rather
than being dropped by its socket buffer; the run is bounded in time and in
packets.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ZONES = (b"\x07example\x03com\x00", b"\x03cdn\x07example\x03net\x00")
_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"


def packet(rng: random.Random, qid: int) -> bytes:
    """One query for a fresh random name, half the time with a random client subnet."""
    label = bytes(rng.choice(_ALPHABET) for _ in range(rng.randint(8, 24)))
    label = bytes(c - 32 if 97 <= c <= 122 and rng.random() < 0.5 else c for c in label)   # 0x20
    name = bytes([len(label)]) + label + rng.choice(ZONES)
    qtype = rng.choice((1, 28))                                  # A or AAAA
    if rng.random() < 0.5:
        header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        return header + name + struct.pack("!HH", qtype, 1)
    if rng.random() < 0.5:
        family, srclen = 1, rng.randint(8, 32)
        address = rng.randbytes(4)
    else:
        family, srclen = 2, rng.randint(16, 64)
        address = rng.randbytes(16)
    size = (srclen + 7) // 8
    prefix = bytearray(address[:size])
    if srclen % 8:
        prefix[-1] &= 0xFF << (8 - srclen % 8) & 0xFF            # RFC 7871: padding bits zero
    option = struct.pack("!HHHBB", 8, 4 + size, family, srclen, 0) + bytes(prefix)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(option)) + option
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    return header + name + struct.pack("!HH", qtype, 1) + opt


@dataclass
class FloodResult:
    sent: int = 0
    answered: int = 0
    seconds: float = 0.0
    probes: int = 0                 # normal queries asked during the flood
    probes_ok: int = 0              # ... answered as they should be
    probe_problems: list[str] = field(default_factory=list)   # what went wrong with the others


def flood(server: tuple[str, int], source: str, seconds: float, seed: int,
          probe: Callable[[], str | None], probe_every: float = 1.0, in_flight: int = 200,
          max_packets: int = 5_000_000) -> FloodResult:
    """Send fresh queries to `server` from `source` for `seconds`; every `probe_every` s, run `probe`.

    `probe` returns None when its normal query was answered as it should
    be, else what was wrong.

    Like dnsperf's ``-q``: at most `in_flight` queries are outstanding, and
    each answer lets another go, so the flood runs as fast as the server
    answers rather than overflowing its socket buffer.  A query unanswered
    for `lost_after` seconds counts as lost and frees its place.
    """
    rng = random.Random(seed)
    result = FloodResult()
    started = time.monotonic()
    next_probe = started + probe_every
    outstanding = 0
    lost_after = 0.2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        while time.monotonic() - started < seconds and result.sent < max_packets:
            while outstanding < in_flight:
                try:
                    sock.sendto(packet(rng, result.sent & 0xFFFF), server)
                except BlockingIOError:
                    break
                result.sent += 1
                outstanding += 1
            if not select.select([sock], [], [], lost_after)[0]:
                outstanding = 0                               # the rest were lost: start a new batch
            try:
                while True:
                    sock.recv(65535)
                    result.answered += 1
                    outstanding = max(0, outstanding - 1)
            except BlockingIOError:
                pass
            if time.monotonic() >= next_probe:
                next_probe += probe_every
                result.probes += 1
                problem = probe()
                if problem is None:
                    result.probes_ok += 1
                else:
                    result.probe_problems.append(problem)
    result.seconds = time.monotonic() - started
    return result
