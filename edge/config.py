"""Load and validate the topology file into frozen dataclasses.

One TOML file describes the whole CDN (sites, regions, coverage, nodes, dns)
and every process reads it, taking its own node's section.  Every user
mistake raises :class:`ConfigError` naming the file, the key and the problem;
the command line prints that one line and exits non-zero.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.policy import SiteDefaults

# Slice sizes a site may set (edge.slices): smaller slices cost more in per-entry
# overhead than they save; a slice is read whole into memory, so keep it bounded.
MIN_SLICE = 64 * 1024
MAX_SLICE = 64 * 2**20

ROLES = ("origin", "l2", "l1")
DEFAULT_TOPOLOGY = "<built-in deploy/local.toml>"

# Every method the HTTP front's parser (llhttp) knows; any other gets 405 before a site is chosen.
PARSER_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PURGE", "QUERY",
    "COPY", "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND",
    "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE",
    "MKCALENDAR", "LINK", "UNLINK", "SOURCE",
})
# RFC 9110's methods but CONNECT (a tunnel, which a reverse proxy does not open) and TRACE
# (it echoes the request, with the fields this CDN added, back to the client; nginx refuses
# it too).  Like CloudFront's allowed methods, anything else must be listed by the site.
DEFAULT_ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A problem with the topology file, phrased for the operator."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


@dataclass(frozen=True)
class Site:
    name: str
    hosts: tuple[str, ...]          # customer host names, lower case, no port
    origin: str                     # base URL of the origin, e.g. http://127.0.0.10:8080
    cdn_name: str                   # the name in the CDN zone the hosts are CNAMEd to
    default: bool = False           # serves Hosts that match no other site
    stale_if_unreachable: float = 86400.0   # serve a copy this stale when the upstream cannot be reached
    aliases: bool = False           # hosts share objects, and the origin sees hosts[0] as Host
    ignore_query: bool = False      # the query string is not part of the cache key
    ignore_query_params: tuple[str, ...] = ()   # these query parameters are not part of the key
    set_cookie: str = "never"       # responses with Set-Cookie: "never" stored, or "strip" it and store
    defaults: SiteDefaults = SiteDefaults()     # default_ttl, max_ttl and stale windows, all off
    allowed_methods: tuple[str, ...] = DEFAULT_ALLOWED_METHODS   # others get 405, never forwarded
    tls_cert: Path | None = None    # PEM certificate chain served for the hosts on listen_tls (SNI)
    tls_key: Path | None = None     # its PEM private key
    https_redirect: bool = False    # plain-HTTP requests get a 308 to https:// (on nodes with listen_tls)
    origin_ca: Path | None = None   # CA bundle an https:// origin is verified against; None: the system's
    origin_client_cert: Path | None = None   # PEM chain presented to an https:// origin (mutual TLS)
    origin_client_key: Path | None = None    # its PEM private key
    slice_size: int = 0             # >0: GETs are fetched and stored in slices of this size (edge.slices)

    @property
    def allow_field(self) -> str:
        """The value of the Allow field a 405 must carry (RFC 9110 15.5.6)."""
        return ", ".join(self.allowed_methods)


@dataclass(frozen=True)
class Region:
    name: str
    lat: float
    lon: float


@dataclass(frozen=True)
class ParentPolicy:
    """How an L1 treats its parents (ATS parent.config / nginx upstream vocabulary)."""

    fall: int = 3                   # consecutive failures that mark a parent down
    rise: int = 2                   # consecutive good probes that bring it back
    probe_interval: float = 1.0     # seconds between active probes of every parent
    timeout: float = 10.0           # connect + first byte, seconds
    go_direct: bool = True          # all parents down: go to the origin (ATS go_direct)
    # One client request's fetch, across every attempt (nginx proxy_next_upstream_timeout).
    deadline: float = 20.0
    max_conns: int = 512            # open connections per upstream (nginx max_conns)
    queue: int = 1024               # requests waiting for one of them; beyond: 503 at once


@dataclass(frozen=True)
class FrontLimits:
    """Limits and timeouts of a cache node's HTTP front (nginx's names where nginx has one)."""

    client_header_timeout: float = 10.0   # a whole request head must arrive within this (then 408)
    keepalive_timeout: float = 75.0       # an idle keep-alive connection is closed after this
    client_body_timeout: float = 60.0     # longest wait between two reads of a request body
    send_timeout: float = 60.0            # longest wait for a client to read a response
    max_request_line: int = 8 * 2**10     # longer request targets get 414
    max_header_bytes: int = 32 * 2**10    # header field lines in total; more gets 431
    max_headers: int = 100                # header fields; more gets 431
    max_connections: int = 10_000         # beyond this, new connections wait in the backlog
    drain_timeout: float = 30.0           # on SIGTERM, in-flight requests get this long to finish
    http2_max_concurrent_streams: int = 128   # streams with work in progress per HTTP/2 connection


ACCESS_LOG_FORMATS = ("combined", "json")


@dataclass(frozen=True)
class Node:
    name: str
    role: str                       # origin | l2 | l1
    listen: Address
    admin: Address
    region: str | None = None
    listen_tls: Address | None = None    # HTTPS listener (cache nodes): TLS ends here, same front
    http2: bool = True              # ALPN offers h2 on listen_tls (nginx: listen ... ssl http2)
    h2c: bool = False               # HTTP/2 with prior knowledge on the plain listener too
    lat: float | None = None
    lon: float | None = None
    parents: tuple[str, ...] = ()   # L1 only: names of L2 nodes, in no particular order
    parent_weights: tuple[tuple[str, float], ...] = ()
    parent_policy: ParentPolicy = ParentPolicy()
    parent_tls: bool = False        # L1 only: reach parents on their listen_tls, verifying the site's certificate
    parent_ca: Path | None = None   # CA bundle parents are verified against with parent_tls; None: the system's
    memory_size: int = 64 * 2**20
    memory_object_max: int = 1 * 2**20   # bigger objects skip the memory tier
    disk_size: int = 1 * 2**30
    stream_threshold: int = 1 * 2**20    # bigger bodies stream to client and disk at once
    cache_dir: Path | None = None
    content_dir: Path | None = None      # origin only: None serves the built-in demo site
    content_cache_control: str = "public, max-age=60"
    max_inflight: int = 1000              # over this the health endpoint reports overload
    limits: FrontLimits = FrontLimits()
    access_log: str = "-"                 # "-" (stdout), "off", or a file path
    access_log_format: str = "combined"
    admin_allow: tuple[Network, ...] | None = None   # who may read the admin listener; None: anyone
    # Worker processes of a cache node (edge.workers): None when the file does not say (`edge run`
    # then takes the CPUs it may use, `edge up` one), 0 for "auto" (the CPUs), else the number.
    workers: int | None = None


@dataclass(frozen=True)
class HealthCheck:
    interval: float = 1.0
    timeout: float = 1.0
    fall: int = 2
    rise: int = 2


@dataclass(frozen=True)
class Rrl:
    """Response rate limiting of the scheduler's UDP answers, per client network (Knot's RRL)."""

    rate: int = 1000                  # answers a second per /24 or /56; 0 turns RRL off
    slip: int = 2                     # every slip-th refused answer goes out truncated (TC); 0: drop all
    table_size: int = 65536           # buckets (networks tracked at once)


@dataclass(frozen=True)
class Dns:
    listen: Address
    admin: Address
    customer_zones: tuple[str, ...]   # zones holding the sites' customer names (CNAMEs)
    cdn_zone: str                     # zone holding the CDN names (A/AAAA of edges)
    ttl: int = 30
    answers: int = 2                  # the nearest healthy edge, then the next nearest: the client's fallback
    default_region: str | None = None
    health: HealthCheck = HealthCheck()
    nameserver: str = ""              # NS target at each apex; defaults to ns1.<cdn_zone>
    hostmaster: str = ""
    admin_allow: tuple[Network, ...] | None = None   # who may read the admin listener; None: anyone
    cache_size: int = 32 * 2**20      # the answer cache's bound in bytes; 0 turns it off
    tcp_idle_timeout: float = 10.0    # seconds a TCP connection may wait between queries
    tcp_max_connections: int = 512    # open TCP connections; a new one then replaces the longest idle
    tcp_max_per_network: int = 32     # open TCP connections per client /24 or /56
    rrl: Rrl = Rrl()


@dataclass(frozen=True)
class Topology:
    source: str
    sites: tuple[Site, ...]
    nodes: tuple[Node, ...]
    regions: tuple[Region, ...] = ()
    coverage: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = ()
    dns: Dns | None = None
    state_dir: Path = Path("var")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        if self.dns is not None:
            names += ", dns"
        raise ConfigError(self.source, "nodes", f"no node named {name!r} (have: {names})")

    def by_role(self, role: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def cache_dir(self, node: Node) -> Path:
        return node.cache_dir if node.cache_dir is not None else self.state_dir / "cache" / node.name

    def site_for_host(self, host: str | None) -> Site | None:
        """The site serving a request's Host header (port and case ignored)."""
        name = normalise_host(host) if host else ""
        default = None
        for site in self.sites:
            if name in site.hosts:
                return site
            if site.default:
                default = site
        return default


def normalise_host(host: str) -> str:
    """Lower-case a Host header value and drop its port (also for [v6]:port)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


# --------------------------------------------------------------------------- parsing

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_size(value: Any) -> int | None:
    """Bytes from a size as the topology writes it (`64MiB`, `1GB`, `1048576`); None if it is none."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        return None
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


class _Reader:
    """Reads typed values out of the parsed TOML, naming the key on failure."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def table(self, data: dict, key: str, path: str, required: bool = False) -> dict:
        value = data.get(key)
        if value is None:
            if required:
                raise self.fail(path, "missing table")
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {type(value).__name__}")
        return value

    def unknown(self, data: dict, allowed: set[str], path: str) -> None:
        extra = sorted(set(data) - allowed)
        if extra:
            raise self.fail(f"{path}.{extra[0]}" if path else extra[0],
                            f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def str(self, data: dict, key: str, path: str, default: Any = ..., ) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(path, "missing")
            return default
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def number(self, data: dict, key: str, path: str, default: float,
               minimum: float = 0.0, integer: bool = False) -> Any:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {value!r}")
        if integer and not isinstance(value, int):
            raise self.fail(path, f"expected a whole number, got {value!r}")
        if value < minimum:
            raise self.fail(path, f"must be at least {minimum:g}, got {value!r}")
        return value

    def bool(self, data: dict, key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def size(self, data: dict, key: str, path: str, default: int) -> int:
        if key not in data:
            return default
        size = parse_size(data[key])
        if size is None:
            raise self.fail(path, f"expected a size such as 64MiB or 1048576, got {data[key]!r}")
        return size

    def address(self, data: dict, key: str, path: str, ip_only: str = "") -> Address:
        """`HOST:PORT`, HOST an IP address or a host name (`[v6]:port` for IPv6).

        A name lets other nodes reach a node whose address is not known in
        advance (a Kubernetes Service's DNS name); that node binds its own
        sockets with `edge run --listen-host`.  `ip_only` says why this key
        must be an address instead.
        """
        text = self.str(data, key, path)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise self.fail(path, f"expected HOST:PORT, got {text!r}")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if ip_only:
                raise self.fail(path, f"expected an IP address ({ip_only}), got {host!r}") from None
            name = host.lower().rstrip(".")
            if bracketed or not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
                raise self.fail(path, f"expected an IP address or a host name, got {host!r}") from None
            host = name
        return Address(host, int(port))

    def networks(self, value: Any, path: str) -> tuple[Network, ...]:
        """An nginx-style allow list: addresses and CIDR blocks, at least one."""
        if not isinstance(value, list) or not value:
            raise self.fail(path, 'expected a non-empty list of addresses or CIDR blocks such as ["10.0.0.0/8"] '
                                  f"(leave the key out to allow every client), got {value!r}")
        out = []
        for item in value:
            if not isinstance(item, str):
                raise self.fail(path, f"expected an address or CIDR block, got {item!r}")
            try:
                out.append(ipaddress.ip_network(item.strip()))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    raise self.fail(path, f"not an address or CIDR block: {item!r}") from None
                # nginx only warns here; an allow list that is not what it says is refused.
                raise self.fail(path, f"{item!r} has bits set past its prefix length "
                                      f"(did you mean {str(loose)!r}?)") from None
        return tuple(out)

    def dns_name(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a DNS name, got {value!r}")
        name = value.strip().lower().rstrip(".")
        if not name or not all(_LABEL.match(label) for label in name.split(".")):
            raise self.fail(path, f"not a valid DNS name: {value!r}")
        return name


def default_text() -> str:
    """The built-in topology's text (deploy/local.toml, shipped as edge/default_topology.toml)."""
    return resources.files("edge").joinpath("default_topology.toml").read_text()


def load(path: str | Path | None = None) -> Topology:
    """Load a topology file; with no path, the built-in default (deploy/local.toml)."""
    if path is None:
        return parse(default_text(), DEFAULT_TOPOLOGY, base_dir=Path.cwd())
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), "(file)", exc.strerror or str(exc)) from None
    return parse(text, str(path), base_dir=path.parent)


def parse(text: str, source: str, base_dir: Path) -> Topology:
    r = _Reader(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", str(exc)) from None
    r.unknown(data, {"state_dir", "admin_allow", "sites", "regions", "coverage", "nodes", "dns"}, "")

    state_dir = Path(r.str(data, "state_dir", "state_dir", "var"))
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir if source != DEFAULT_TOPOLOGY else Path.cwd() / state_dir

    regions = _regions(r, r.table(data, "regions", "regions"))
    region_names = {reg.name for reg in regions}
    coverage = _coverage(r, r.table(data, "coverage", "coverage"), region_names)
    dns_table = r.table(data, "dns", "dns")
    cdn_zone = r.dns_name(dns_table["cdn_zone"], "dns.cdn_zone") if "cdn_zone" in dns_table else ""
    # Topology-wide default of every admin listener's allow list; a node or [dns] may set its own.
    admin_allow = r.networks(data["admin_allow"], "admin_allow") if "admin_allow" in data else None
    sites = _sites(r, r.table(data, "sites", "sites", required=True), cdn_zone, base_dir)
    nodes = _nodes(r, r.table(data, "nodes", "nodes", required=True), region_names, base_dir, admin_allow, sites)
    dns = _dns(r, dns_table, sites, region_names, admin_allow) if dns_table else None
    return Topology(source=source, sites=sites, nodes=nodes, regions=regions,
                    coverage=coverage, dns=dns, state_dir=state_dir)


def _regions(r: _Reader, table: dict) -> tuple[Region, ...]:
    out = []
    for name, body in table.items():
        path = f"regions.{name}"
        if not isinstance(body, dict):
            raise r.fail(path, "expected a table with lat and lon")
        r.unknown(body, {"lat", "lon"}, path)
        lat = r.number(body, "lat", f"{path}.lat", default=None, minimum=-90)
        lon = r.number(body, "lon", f"{path}.lon", default=None, minimum=-180)
        if lat is None or lon is None:
            raise r.fail(path, "needs both lat and lon")
        if lat > 90 or lon > 180:
            raise r.fail(path, "lat must be within [-90, 90] and lon within [-180, 180]")
        out.append(Region(name, float(lat), float(lon)))
    return tuple(out)


def _coverage(r: _Reader, table: dict, regions: set[str]) -> tuple:
    out = []
    for cidr, region in table.items():
        path = f'coverage."{cidr}"'
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise r.fail(path, f"not a CIDR block: {cidr!r}") from None
        if region not in regions:
            raise r.fail(path, f"unknown region {region!r} (have: {', '.join(sorted(regions)) or 'none'})")
        out.append((net, region))
    return tuple(out)


def _sites(r: _Reader, table: dict, cdn_zone: str, base_dir: Path) -> tuple[Site, ...]:
    if not table:
        raise r.fail("sites", "at least one site is needed")
    out, seen_hosts, defaults = [], {}, []
    for name, body in table.items():
        path = f"sites.{name}"
        if not isinstance(body, dict):
            raise r.fail(path, "expected a table")
        r.unknown(body, {"hosts", "origin", "cdn_name", "default", "stale_if_unreachable", "aliases",
                         "ignore_query", "ignore_query_params", "set_cookie", "default_ttl", "max_ttl",
                         "stale_while_revalidate", "stale_if_error", "allowed_methods", "tls_cert", "tls_key",
                         "https_redirect", "origin_ca", "origin_client_cert", "origin_client_key",
                         "slice_size"}, path)
        hosts_value = body.get("hosts")
        if not isinstance(hosts_value, list) or not hosts_value:
            raise r.fail(f"{path}.hosts", "expected a non-empty list of host names")
        hosts = tuple(r.dns_name(h, f"{path}.hosts") for h in hosts_value)
        for host in hosts:
            if host in seen_hosts:
                raise r.fail(f"{path}.hosts", f"{host!r} is already served by site {seen_hosts[host]!r}")
            seen_hosts[host] = name
        origin = r.str(body, "origin", f"{path}.origin")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r.fail(f"{path}.origin", f"expected an http:// or https:// URL, got {origin!r}")
        if "cdn_name" in body:
            cdn_name = r.dns_name(body["cdn_name"], f"{path}.cdn_name")
        else:
            cdn_name = f"{hosts[0]}.{cdn_zone}" if cdn_zone else ""
        default = r.bool(body, "default", f"{path}.default", False)
        if default:
            defaults.append(name)
        stale_if_unreachable = float(r.number(body, "stale_if_unreachable", f"{path}.stale_if_unreachable",
                                              Site.stale_if_unreachable, 0))
        aliases = r.bool(body, "aliases", f"{path}.aliases", False)
        ignore_query = r.bool(body, "ignore_query", f"{path}.ignore_query", False)
        params = body.get("ignore_query_params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) and p for p in params):
            raise r.fail(f"{path}.ignore_query_params", f"expected a list of parameter names, got {params!r}")
        set_cookie = r.str(body, "set_cookie", f"{path}.set_cookie", "never")
        if set_cookie not in ("never", "strip"):
            raise r.fail(f"{path}.set_cookie", f"expected never or strip, got {set_cookie!r}")
        def seconds(key: str, integer: bool = False) -> Any:
            return r.number(body, key, f"{path}.{key}", None, 0, integer=integer)

        site_defaults = SiteDefaults(default_ttl=seconds("default_ttl"), max_ttl=seconds("max_ttl"),
                                     stale_while_revalidate=seconds("stale_while_revalidate", integer=True),
                                     stale_if_error=seconds("stale_if_error", integer=True))
        def file(key: str) -> Path | None:
            if key not in body:
                return None
            value = Path(r.str(body, key, f"{path}.{key}"))
            return value if value.is_absolute() else base_dir / value

        tls_cert, tls_key = file("tls_cert"), file("tls_key")
        if (tls_cert is None) != (tls_key is None):
            missing = "tls_key" if tls_key is None else "tls_cert"
            raise r.fail(f"{path}.{missing}", "tls_cert and tls_key go together: one is set, this one is missing")
        https_redirect = r.bool(body, "https_redirect", f"{path}.https_redirect", False)
        if https_redirect and tls_cert is None:
            raise r.fail(f"{path}.https_redirect", "redirecting to https:// needs this site's tls_cert and tls_key")
        origin_ca = file("origin_ca")
        if origin_ca is not None and parts.scheme != "https":
            raise r.fail(f"{path}.origin_ca", f"only an https:// origin is verified against a CA (origin is {origin!r})")
        client_cert, client_key = file("origin_client_cert"), file("origin_client_key")
        if (client_cert is None) != (client_key is None):
            missing = "origin_client_key" if client_key is None else "origin_client_cert"
            raise r.fail(f"{path}.{missing}", "origin_client_cert and origin_client_key go together: "
                                              "one is set, this one is missing")
        if client_cert is not None and parts.scheme != "https":
            raise r.fail(f"{path}.origin_client_cert", "a client certificate is presented only to an https:// "
                                                       f"origin (origin is {origin!r})")
        slice_size = r.size(body, "slice_size", f"{path}.slice_size", 0)
        if slice_size and not MIN_SLICE <= slice_size <= MAX_SLICE:
            raise r.fail(f"{path}.slice_size", f"expected 0 (off) or a size from 64KiB to 64MiB, got {body['slice_size']!r}")
        out.append(Site(name, hosts, origin.rstrip("/"), cdn_name, default, stale_if_unreachable, aliases,
                        ignore_query, tuple(params), set_cookie, site_defaults,
                        _allowed_methods(r, body, f"{path}.allowed_methods"),
                        tls_cert, tls_key, https_redirect, origin_ca, client_cert, client_key, slice_size))
    if len(defaults) > 1:
        raise r.fail(f"sites.{defaults[1]}.default", f"only one site may be the default (also {defaults[0]!r})")
    return tuple(out)


def _allowed_methods(r: _Reader, body: dict, path: str) -> tuple[str, ...]:
    """The methods a site forwards (CloudFront's allowed methods): tokens the front's parser
    knows, GET and HEAD always among them, CONNECT never."""
    if "allowed_methods" not in body:
        return DEFAULT_ALLOWED_METHODS
    value = body["allowed_methods"]
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise r.fail(path, f'expected a list of methods such as ["GET", "HEAD", "POST"], got {value!r}')
    for method in value:
        if method in PARSER_METHODS:
            continue
        if method.strip().upper() in PARSER_METHODS:
            raise r.fail(path, f"{method!r} is not a method; did you mean {method.strip().upper()!r}? "
                               "(methods are case-sensitive, RFC 9110 9.1)")
        raise r.fail(path, f"{method!r} is not a method the HTTP front knows (it answers those 405 "
                           f"whatever the site says); known: {', '.join(sorted(PARSER_METHODS))}")
    if "CONNECT" in value:
        raise r.fail(path, "CONNECT asks for a tunnel, which this reverse proxy does not open")
    for needed in ("GET", "HEAD"):
        if needed not in value:
            raise r.fail(path, f"{needed} must be allowed: every HTTP server supports GET and HEAD "
                               "(RFC 9110 9.1), and fresh hits of both are answered before any site check")
    if len(set(value)) != len(value):
        raise r.fail(path, "a method is listed twice")
    return tuple(value)


_NODE_KEYS = {"role", "listen", "admin", "region", "lat", "lon", "parents", "parent_weights",
              "memory_size", "memory_object_max", "disk_size", "stream_threshold", "cache_dir",
              "content_dir", "content_cache_control", "max_inflight", "parent_fall",
              "parent_rise", "parent_probe_interval", "parent_timeout", "go_direct",
              "upstream_deadline", "upstream_max_conns", "upstream_queue", "access_log", "access_log_format",
              "admin_allow", "listen_tls", "http2", "h2c", "parent_tls", "parent_ca", "workers",
              *FrontLimits.__dataclass_fields__}


MAX_WORKERS = 256


def _workers(r: _Reader, body: dict, path: str, role: str) -> int | None:
    """`workers`: a whole number of processes, or "auto" (0: the CPUs the process may use)."""
    if "workers" not in body:
        return None
    if role == "origin":
        raise r.fail(path, "only a cache node (l1, l2) runs workers")
    value = body["workers"]
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise r.fail(path, f'expected a whole number of processes or "auto", got {value!r}')
    if not 1 <= value <= MAX_WORKERS:
        raise r.fail(path, f"expected 1 to {MAX_WORKERS} processes, got {value}")
    return value


def _nodes(r: _Reader, table: dict, regions: set[str], base_dir: Path,
           admin_allow: tuple[Network, ...] | None, sites: tuple[Site, ...] = ()) -> tuple[Node, ...]:
    out: list[Node] = []
    addresses: dict[Address, str] = {}
    for name, body in table.items():
        path = f"nodes.{name}"
        if not _NODE_NAME.match(name) or name == "dns":
            raise r.fail(path, "a node name is letters, digits, '-', '_' or '.', and not 'dns'")
        if not isinstance(body, dict):
            raise r.fail(path, "expected a table")
        r.unknown(body, _NODE_KEYS, path)
        role = r.str(body, "role", f"{path}.role")
        if role not in ROLES:
            raise r.fail(f"{path}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        listen = r.address(body, "listen", f"{path}.listen")
        admin = r.address(body, "admin", f"{path}.admin")
        listen_tls = r.address(body, "listen_tls", f"{path}.listen_tls") if "listen_tls" in body else None
        if listen_tls is not None:
            if role == "origin":
                raise r.fail(f"{path}.listen_tls", "only a cache node (l1, l2) terminates TLS")
            if not any(site.tls_cert for site in sites):
                raise r.fail(f"{path}.listen_tls", "no site has tls_cert and tls_key: nothing to serve on it")
        h2c = r.bool(body, "h2c", f"{path}.h2c", False)
        if h2c and role not in ("l1", "l2"):
            raise r.fail(f"{path}.h2c", "only a cache node (l1, l2) speaks HTTP/2")
        for key, addr in (("listen", listen), ("admin", admin), ("listen_tls", listen_tls)):
            if addr is None:
                continue
            if addr.port and addr in addresses:
                raise r.fail(f"{path}.{key}", f"{addr} is already used by {addresses[addr]}")
            addresses[addr] = f"{path}.{key}"
        region = body.get("region")
        if region is not None and region not in regions:
            raise r.fail(f"{path}.region", f"unknown region {region!r} (have: {', '.join(sorted(regions)) or 'none'})")
        if role == "l1" and regions and region is None:
            raise r.fail(f"{path}.region", "an L1 edge needs a region for the DNS scheduler")
        lat = r.number(body, "lat", f"{path}.lat", None, minimum=-90)
        lon = r.number(body, "lon", f"{path}.lon", None, minimum=-180)
        parents_value = body.get("parents", "all" if role == "l1" else [])
        if role != "l1" and parents_value:
            raise r.fail(f"{path}.parents", f"only an l1 node has parents (this one is {role})")
        weights_table = r.table(body, "parent_weights", f"{path}.parent_weights")
        weights = []
        for parent, weight in weights_table.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise r.fail(f"{path}.parent_weights.{parent}", f"expected a positive number, got {weight!r}")
            weights.append((parent, float(weight)))
        policy = ParentPolicy(
            fall=r.number(body, "parent_fall", f"{path}.parent_fall", 3, 1, integer=True),
            rise=r.number(body, "parent_rise", f"{path}.parent_rise", 2, 1, integer=True),
            probe_interval=float(r.number(body, "parent_probe_interval", f"{path}.parent_probe_interval", 1.0, 0.01)),
            timeout=float(r.number(body, "parent_timeout", f"{path}.parent_timeout", 10.0, 0.01)),
            go_direct=r.bool(body, "go_direct", f"{path}.go_direct", True),
            deadline=float(r.number(body, "upstream_deadline", f"{path}.upstream_deadline",
                                    ParentPolicy.deadline, 0.01)),
            max_conns=r.number(body, "upstream_max_conns", f"{path}.upstream_max_conns", ParentPolicy.max_conns, 1,
                               integer=True),
            queue=r.number(body, "upstream_queue", f"{path}.upstream_queue", ParentPolicy.queue, 0, integer=True),
        )

        def directory(key: str) -> Path | None:
            if key not in body:
                return None
            value = Path(r.str(body, key, f"{path}.{key}"))
            return value if value.is_absolute() else base_dir / value

        content_dir = directory("content_dir")
        parent_tls = r.bool(body, "parent_tls", f"{path}.parent_tls", False)
        if parent_tls and role != "l1":
            raise r.fail(f"{path}.parent_tls", f"only an l1 node has parents (this one is {role})")
        parent_ca = directory("parent_ca")
        if parent_ca is not None and not parent_tls:
            raise r.fail(f"{path}.parent_ca", "parents are verified against a CA only with parent_tls = true")
        limits = _limits(r, body, path)
        access_log = r.str(body, "access_log", f"{path}.access_log", "-")
        if access_log not in ("-", "off") and not Path(access_log).is_absolute():
            access_log = str(base_dir / access_log)
        access_log_format = r.str(body, "access_log_format", f"{path}.access_log_format", "combined")
        if access_log_format not in ACCESS_LOG_FORMATS:
            raise r.fail(f"{path}.access_log_format",
                         f"expected one of {', '.join(ACCESS_LOG_FORMATS)}, got {access_log_format!r}")
        if content_dir is not None and role != "origin":
            raise r.fail(f"{path}.content_dir", "only an origin node serves a content directory")
        workers = _workers(r, body, f"{path}.workers", role)
        node = Node(
            name=name, role=role, listen=listen, admin=admin, region=region, listen_tls=listen_tls,
            http2=r.bool(body, "http2", f"{path}.http2", True), h2c=h2c,
            lat=None if lat is None else float(lat), lon=None if lon is None else float(lon),
            parents=(), parent_weights=tuple(weights), parent_policy=policy,
            parent_tls=parent_tls, parent_ca=parent_ca,
            memory_size=r.size(body, "memory_size", f"{path}.memory_size", Node.memory_size),
            memory_object_max=r.size(body, "memory_object_max", f"{path}.memory_object_max", Node.memory_object_max),
            disk_size=r.size(body, "disk_size", f"{path}.disk_size", Node.disk_size),
            stream_threshold=r.size(body, "stream_threshold", f"{path}.stream_threshold", Node.stream_threshold),
            cache_dir=directory("cache_dir"), content_dir=content_dir,
            content_cache_control=r.str(body, "content_cache_control", f"{path}.content_cache_control",
                                        Node.content_cache_control),
            max_inflight=r.number(body, "max_inflight", f"{path}.max_inflight", 1000, 1, integer=True),
            limits=limits, access_log=access_log, access_log_format=access_log_format,
            admin_allow=r.networks(body["admin_allow"], f"{path}.admin_allow") if "admin_allow" in body
            else admin_allow, workers=workers,
        )
        out.append((node, parents_value))

    l2_names = [n.name for n, _ in out if n.role == "l2"]
    nodes = []
    for node, parents_value in out:
        path = f"nodes.{node.name}"
        if node.role == "l1":
            if parents_value == "all":
                parents = tuple(l2_names)
            elif isinstance(parents_value, list) and all(isinstance(p, str) for p in parents_value):
                parents = tuple(parents_value)
                for parent in parents:
                    if parent not in l2_names:
                        raise r.fail(f"{path}.parents", f"{parent!r} is not an l2 node (have: {', '.join(l2_names) or 'none'})")
                if len(set(parents)) != len(parents):
                    raise r.fail(f"{path}.parents", "a parent is listed twice")
            else:
                raise r.fail(f"{path}.parents", f'expected "all" or a list of l2 node names, got {parents_value!r}')
            for parent, _ in node.parent_weights:
                if parent not in parents:
                    raise r.fail(f"{path}.parent_weights.{parent}", "not one of this node's parents")
            if node.parent_tls:
                _check_parent_tls(r, path, parents, {n.name: n for n, _ in out}, sites)
            node = replace(node, parents=parents)
        nodes.append(node)
    return tuple(nodes)


def _check_parent_tls(r: _Reader, path: str, parents: tuple[str, ...], nodes: dict[str, Node],
                      sites: tuple[Site, ...]) -> None:
    """parent_tls connects to each parent's listen_tls and verifies the certificate the parent
    serves for the site's first host (its own SNI pick, as for a client): both must exist."""
    if not parents:
        return
    for parent in parents:
        if nodes[parent].listen_tls is None:
            raise r.fail(f"{path}.parent_tls", f"parent {parent!r} has no listen_tls to connect to")
    for site in sites:
        if site.tls_cert is None:
            raise r.fail(f"{path}.parent_tls", f"site {site.name!r} has no tls_cert: a parent could not prove "
                                               f"it serves {site.hosts[0]!r} (parents are verified by the "
                                               "certificate of each request's site)")


def _limits(r: _Reader, body: dict, path: str) -> FrontLimits:
    d = FrontLimits()

    def seconds(key: str) -> float:
        return float(r.number(body, key, f"{path}.{key}", getattr(d, key), 0.001))

    def size(key: str, minimum: int) -> int:
        value = r.size(body, key, f"{path}.{key}", getattr(d, key))
        if value < minimum:
            raise r.fail(f"{path}.{key}", f"must be at least {minimum} bytes, got {value}")
        return value

    return FrontLimits(
        client_header_timeout=seconds("client_header_timeout"),
        keepalive_timeout=seconds("keepalive_timeout"),
        client_body_timeout=seconds("client_body_timeout"),
        send_timeout=seconds("send_timeout"),
        max_request_line=size("max_request_line", 256),
        max_header_bytes=size("max_header_bytes", 1024),
        max_headers=r.number(body, "max_headers", f"{path}.max_headers", d.max_headers, 8, integer=True),
        max_connections=r.number(body, "max_connections", f"{path}.max_connections", d.max_connections, 1,
                                 integer=True),
        drain_timeout=float(r.number(body, "drain_timeout", f"{path}.drain_timeout", d.drain_timeout, 0)),
        http2_max_concurrent_streams=r.number(body, "http2_max_concurrent_streams",
                                              f"{path}.http2_max_concurrent_streams",
                                              d.http2_max_concurrent_streams, 1, integer=True),
    )


def _dns(r: _Reader, table: dict, sites: tuple[Site, ...], regions: set[str],
         admin_allow: tuple[Network, ...] | None) -> Dns:
    r.unknown(table, {"listen", "admin", "zones", "cdn_zone", "ttl", "answers", "default_region",
                      "health", "nameserver", "hostmaster", "admin_allow", "cache_size", "tcp_idle_timeout",
                      "tcp_max_connections", "tcp_max_per_network", "rrl"}, "dns")
    if "cdn_zone" not in table:
        raise r.fail("dns.cdn_zone", "missing (the zone of the CDN names, e.g. cdn.example.net)")
    cdn_zone = r.dns_name(table["cdn_zone"], "dns.cdn_zone")
    zones_value = table.get("zones")
    if not isinstance(zones_value, list) or not zones_value:
        raise r.fail("dns.zones", "expected a non-empty list of customer zones, e.g. [\"example.com\"]")
    zones = tuple(r.dns_name(z, "dns.zones") for z in zones_value)
    for site in sites:
        for host in site.hosts:
            if not any(host == z or host.endswith("." + z) for z in zones):
                raise r.fail(f"sites.{site.name}.hosts", f"{host!r} is in none of dns.zones ({', '.join(zones)})")
        if not site.cdn_name.endswith("." + cdn_zone):
            raise r.fail(f"sites.{site.name}.cdn_name", f"{site.cdn_name!r} is not inside dns.cdn_zone {cdn_zone!r}")
    default_region = table.get("default_region")
    if default_region is not None and default_region not in regions:
        raise r.fail("dns.default_region", f"unknown region {default_region!r}")
    health_table = r.table(table, "health", "dns.health")
    r.unknown(health_table, {"interval", "timeout", "fall", "rise"}, "dns.health")
    health = HealthCheck(
        interval=float(r.number(health_table, "interval", "dns.health.interval", 1.0, 0.01)),
        timeout=float(r.number(health_table, "timeout", "dns.health.timeout", 1.0, 0.01)),
        fall=r.number(health_table, "fall", "dns.health.fall", 2, 1, integer=True),
        rise=r.number(health_table, "rise", "dns.health.rise", 2, 1, integer=True),
    )
    d = Dns(Address("", 0), Address("", 0), (), "")
    rrl_table = r.table(table, "rrl", "dns.rrl")
    r.unknown(rrl_table, {"rate", "slip", "table_size"}, "dns.rrl")
    rrl = Rrl(
        rate=r.number(rrl_table, "rate", "dns.rrl.rate", d.rrl.rate, 0, integer=True),
        slip=r.number(rrl_table, "slip", "dns.rrl.slip", d.rrl.slip, 0, integer=True),
        table_size=r.number(rrl_table, "table_size", "dns.rrl.table_size", d.rrl.table_size, 1, integer=True),
    )
    tcp_max = r.number(table, "tcp_max_connections", "dns.tcp_max_connections", d.tcp_max_connections, 1,
                       integer=True)
    tcp_per_network = r.number(table, "tcp_max_per_network", "dns.tcp_max_per_network", d.tcp_max_per_network,
                               1, integer=True)
    if tcp_per_network > tcp_max:
        raise r.fail("dns.tcp_max_per_network", f"{tcp_per_network} is more than dns.tcp_max_connections "
                                                f"({tcp_max}): one network could take every connection")
    return Dns(
        listen=r.address(table, "listen", "dns.listen", ip_only="the NS record's glue carries it"),
        admin=r.address(table, "admin", "dns.admin"),
        customer_zones=zones, cdn_zone=cdn_zone,
        ttl=r.number(table, "ttl", "dns.ttl", 30, 0, integer=True),
        answers=r.number(table, "answers", "dns.answers", 2, 1, integer=True),
        default_region=default_region, health=health,
        nameserver=r.dns_name(table["nameserver"], "dns.nameserver") if "nameserver" in table else f"ns1.{cdn_zone}",
        hostmaster=r.dns_name(table["hostmaster"], "dns.hostmaster") if "hostmaster" in table else f"hostmaster.{cdn_zone}",
        admin_allow=r.networks(table["admin_allow"], "dns.admin_allow") if "admin_allow" in table else admin_allow,
        cache_size=r.size(table, "cache_size", "dns.cache_size", d.cache_size),
        tcp_idle_timeout=float(r.number(table, "tcp_idle_timeout", "dns.tcp_idle_timeout", d.tcp_idle_timeout,
                                        0.1)),
        tcp_max_connections=tcp_max, tcp_max_per_network=tcp_per_network, rrl=rrl,
    )
