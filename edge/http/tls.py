"""TLS for a cache node: the HTTPS listener's contexts (one per site, chosen by SNI), and the
client contexts for its upstreams: https:// origins (verified against the system's CA store or
the site's ``origin_ca``, presenting the site's ``origin_client_cert`` if it has one) and, with
``parent_tls``, parents (verified against the node's ``parent_ca`` or the system's store).

Everything here reads files (certificates, keys, CA bundles): call :func:`load` at start
or through ``asyncio.to_thread`` on a reload, never on the running event loop.  The
handshakes themselves happen in the transport.

Which client context an upstream uses is its :class:`TlsProfile` (CA bundle, client
certificate): :func:`origin_profile` and :func:`parent_profile` say which, for the upstream
pool and for :func:`load`, which builds one context per distinct profile.

Server defaults, as a modern nginx/Mozilla "intermediate" profile would have them:

* TLS 1.2 and 1.3 only (``minimum_version``); OpenSSL's default cipher list.
* ALPN offers ``h2`` then ``http/1.1`` (only ``http/1.1`` with ``http2 = false``).
* Session resumption: OpenSSL's stateless tickets with keys made per context, so a
  reload (new contexts) or a restart costs returning clients one full handshake.
* No client-initiated renegotiation (a cheap way to make a server do expensive work).
* SNI picks the site's certificate; a client without SNI, or naming a host no site
  has, gets the default certificate: the ``default = true`` site's if it has one,
  else the first site (in file order) with ``tls_cert``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edge.config import ConfigError, Node, Site, Topology
from edge.upstream.http1 import TlsProfile

ALPN = ["h2", "http/1.1"]
ALPN_HTTP1 = ["http/1.1"]


@dataclass(frozen=True)
class TlsSetup:
    server: ssl.SSLContext | None                   # the HTTPS listener's; None without listen_tls
    default_site: str | None = None                 # whose certificate a client without SNI gets
    upstream: dict[TlsProfile, ssl.SSLContext] = field(default_factory=dict)   # profile -> client context


def origin_profile(site: Site) -> TlsProfile | None:
    """How `site`'s origin is reached over TLS; None for an http:// origin."""
    if urlsplit(site.origin).scheme != "https":
        return None
    return TlsProfile(site.origin_ca, site.origin_client_cert, site.origin_client_key)


def parent_profile(node: Node) -> TlsProfile | None:
    """How `node` reaches its parents over TLS; None without parent_tls."""
    return TlsProfile(node.parent_ca) if node.parent_tls else None


def load(topology: Topology, node: Node) -> TlsSetup:
    """Build every context `node` needs from `topology`; ConfigError naming the file if one cannot load."""
    upstream: dict[TlsProfile, ssl.SSLContext] = {}
    for site in topology.sites:
        profile = origin_profile(site)
        if profile is not None and profile not in upstream:
            upstream[profile] = client_context(topology, profile, f"sites.{site.name}.origin_ca",
                                               f"sites.{site.name}.origin_client_cert",
                                               f"sites.{site.name}.origin_client_key")
    profile = parent_profile(node)
    if profile is not None and profile not in upstream:
        upstream[profile] = client_context(topology, profile, f"nodes.{node.name}.parent_ca")
    if node.listen_tls is None:
        return TlsSetup(None, None, upstream)
    with_cert = [site for site in topology.sites if site.tls_cert is not None]
    default = next((site for site in with_cert if site.default), with_cert[0])
    alpn = ALPN if node.http2 else ALPN_HTTP1
    contexts = {site.name: site_context(topology, site, alpn) for site in with_cert}
    by_host = {host: contexts[site.name] for site in with_cert for host in site.hosts}
    server = contexts[default.name]

    def pick(ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        # Runs inside the handshake.  Unknown or absent names keep the default certificate
        # (as nginx's default_server does) rather than failing the handshake.
        chosen = by_host.get(server_name.lower().rstrip(".")) if server_name else None
        if chosen is not None and chosen is not ssl_object.context:
            ssl_object.context = chosen

    server.sni_callback = pick
    return TlsSetup(server, default.name, upstream)


def site_context(topology: Topology, site: Site, alpn: list[str] = ALPN) -> ssl.SSLContext:
    assert site.tls_cert is not None and site.tls_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(alpn)
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(site.tls_cert, site.tls_key)
    except OSError as exc:       # ssl.SSLError is an OSError too
        raise ConfigError(topology.source, f"sites.{site.name}.tls_cert",
                          f"{site.tls_cert} with key {site.tls_key}: {_reason(exc)}") from None
    return context


def client_context(topology: Topology, profile: TlsProfile, ca_key: str, cert_key: str = "",
                   key_key: str = "") -> ssl.SSLContext:
    """Verifies the upstream's certificate and host name against the profile's CA bundle only
    (or the system's store), and presents its client certificate if it has one.  The keys
    name where each file was configured, for the ConfigError."""
    try:
        context = ssl.create_default_context(cafile=str(profile.ca) if profile.ca is not None else None)
    except OSError as exc:
        raise ConfigError(topology.source, ca_key, f"{profile.ca}: {_reason(exc)}") from None
    if profile.cert is not None:
        try:
            context.load_cert_chain(profile.cert, profile.key)
        except OSError as exc:
            mismatch = isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH"
            raise ConfigError(topology.source, key_key if mismatch else cert_key,
                              f"{profile.cert} with key {profile.key}: {_reason(exc)}") from None
    return context


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the private key does not belong to the certificate"
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
