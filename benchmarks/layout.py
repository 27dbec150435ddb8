"""Where everything listens and which CPU it runs on.

All addresses are on loopback, in 127.0.60.0-127.0.69.255 (the memory
scenario's own origin and L1 in 127.0.88.x), so a benchmark run collides
with no other test or topology on the machine.  The server
under test is pinned to one CPU and the load generator to the other, as the
issue asks; helper processes (origin, L2, the idle edges the DNS scheduler
checks) share the server's CPU so that the client's CPU reading stays clean.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVER_CPU = 0
CLIENT_CPU = 1

SITE_HOST = "bench.example.com"        # through the origin with delay/size knobs
FAST_SITE_HOST = "fast.example.com"     # through the fast static origin (miss path)
SITE_CDN_NAME = "bench.example.com.cdn.example.net"   # what the DNS benchmark asks for
FAST_CDN_NAME = "fast.example.com.cdn.example.net"
MEM_SITE_HOST = "mem.example.com"       # the memory scenario's site (topology-memory.toml)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.host}:{self.port}"


ORIGIN = Endpoint("127.0.60.1", 8080)
ORIGIN_ADMIN = Endpoint("127.0.60.1", 8091)
FAST_ORIGIN = Endpoint("127.0.60.2", 8080)
L2 = Endpoint("127.0.61.1", 8080)
L2_ADMIN = Endpoint("127.0.61.1", 8091)
L1 = Endpoint("127.0.62.1", 8080)               # the edge under test, region east
L1_ADMIN = Endpoint("127.0.62.1", 8091)
L1_WEST = Endpoint("127.0.62.2", 8080)          # a second edge, so DNS has a choice
L1_WEST_ADMIN = Endpoint("127.0.62.2", 8091)
L1_LOGS = Endpoint("127.0.62.3", 8080)          # the L1 of the hit scenario's "logs on" rows
L1_LOGS_ADMIN = Endpoint("127.0.62.3", 8091)
L1_TLS = Endpoint("127.0.62.1", 8443)           # the L1's HTTPS listener (listen_tls)
DNS = Endpoint("127.0.63.1", 8053)
DNS_ADMIN = Endpoint("127.0.63.1", 8091)
NGINX_L1 = Endpoint("127.0.64.1", 8080)
NGINX_L2 = Endpoint("127.0.64.2", 8080)
NGINX_L1_LOGS = Endpoint("127.0.64.3", 8080)    # nginx.conf again, with a buffered access log
NGINX_L1_TLS = Endpoint("127.0.64.1", 8443)     # nginx-l1's HTTPS server, HTTP/1.1 only
NGINX_L1_H2 = Endpoint("127.0.64.1", 8444)      # the same server on a port with http2
NGINX_L1_LOGS_TLS = Endpoint("127.0.64.3", 8443)  # nginx-l1-logs renders them too (unused)
NGINX_L1_LOGS_H2 = Endpoint("127.0.64.3", 8444)
VARNISH = Endpoint("127.0.65.1", 8080)
ATS = Endpoint("127.0.66.1", 8080)
KNOT = Endpoint("127.0.67.1", 8053)
CEILING = Endpoint("127.0.68.1", 8080)          # bare aiohttp handler
CEILING_HTTPTOOLS = Endpoint("127.0.68.2", 8080)  # bare asyncio.Protocol + httptools on uvloop
MEM_L1 = Endpoint("127.0.88.1", 8080)           # the memory scenario's L1 (its own topology)
MEM_L1_ADMIN = Endpoint("127.0.88.1", 8091)
MEM_ORIGIN = Endpoint("127.0.88.2", 8080)       # fast-origin.conf again, for the memory scenario
CEILING_DNS = Endpoint("127.0.68.3", 8053)      # bare DatagramProtocol on uvloop answering any name
DNS_CLIENT_EAST = "127.0.69.1"                  # inside the east coverage block
DNS_CLIENT_WEST = "127.0.69.129"                # inside the west coverage block
DNS_CLIENT_FLOOD = "127.0.69.2"                 # the flood's source (east block), apart from dnsperf's
