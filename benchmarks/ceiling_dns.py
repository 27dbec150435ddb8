"""Python's ceiling for a DNS answer: a bare DatagramProtocol on uvloop.

Every datagram is answered inside the callback with its own ID and
question, flags QR AA RD, and one A record whose owner points at the
question (``0xC00C``): one slice and one concatenation, no parsing, no
lookup, nothing counted.  Any name gets the same address, so it is only a
benchmark peer: the scheduler's hit path cannot do less work per query than
this in Python, and the row shows how much of the gap to knotd is the
language and the event loop rather than the scheduler.

    python -m benchmarks.ceiling_dns HOST PORT
"""

from __future__ import annotations

import asyncio
import signal
import struct
import sys

import uvloop

from benchmarks.ceiling import loopback_address

# QR AA RD, NOERROR; one question, one answer, nothing else.
FLAGS_AND_COUNTS = struct.pack("!HHHHH", 0x8500, 1, 1, 0, 0)
ANSWER = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([127, 0, 62, 1])


class DnsCeiling(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        # The question is everything after the header for dnsperf's queries (no EDNS).
        self.transport.sendto(data[:2] + FLAGS_AND_COUNTS + data[12:] + ANSWER, addr)  # type: ignore[attr-defined]


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    transport, _ = await loop.create_datagram_endpoint(DnsCeiling, local_addr=(host, port))
    try:
        await stop.wait()
    finally:
        transport.close()


def main(argv: list[str]) -> int:
    address = loopback_address(argv, "benchmarks.ceiling_dns")
    if address is None:
        return 2
    uvloop.run(serve(*address))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
