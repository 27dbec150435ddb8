"""TLS for a cache node: the HTTPS listener's contexts (one per site, chosen by SNI) and the
contexts that verify https:// origins against a site's own CA bundle.

Everything here reads files (certificates, keys, CA bundles): call :func:`load` at start
or through ``asyncio.to_thread`` on a reload, never on the running event loop.  The
handshakes themselves happen in the transport.

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
from pathlib import Path

from edge.config import ConfigError, Node, Site, Topology

ALPN = ["h2", "http/1.1"]
ALPN_HTTP1 = ["http/1.1"]


@dataclass(frozen=True)
class TlsSetup:
    server: ssl.SSLContext | None                   # the HTTPS listener's; None without listen_tls
    default_site: str | None = None                 # whose certificate a client without SNI gets
    origin_ca: dict[Path, ssl.SSLContext] = field(default_factory=dict)   # CA bundle -> client context


def load(topology: Topology, node: Node) -> TlsSetup:
    """Build every context `node` needs from `topology`; ConfigError naming the file if one cannot load."""
    origin_ca: dict[Path, ssl.SSLContext] = {}
    for site in topology.sites:
        if site.origin_ca is not None and site.origin_ca not in origin_ca:
            origin_ca[site.origin_ca] = origin_context(topology, site)
    if node.listen_tls is None:
        return TlsSetup(None, None, origin_ca)
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
    return TlsSetup(server, default.name, origin_ca)


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


def origin_context(topology: Topology, site: Site) -> ssl.SSLContext:
    """Verifies the origin's certificate and host name against the site's CA bundle only."""
    try:
        return ssl.create_default_context(cafile=str(site.origin_ca))
    except OSError as exc:
        raise ConfigError(topology.source, f"sites.{site.name}.origin_ca",
                          f"{site.origin_ca}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the private key does not belong to the certificate"
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
