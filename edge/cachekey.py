"""The cache key: which stored object a request maps to.

The key is the site name, the Host (unless the site declares its hosts
aliases of one another) and the normalised request target: a response is
never served for a Host it was not fetched for, as Varnish's default hash
does; a site with ``aliases = true`` shares one object across its hosts and
sends its origin one canonical Host, as nginx's default does.  L1 and L2 use
the same function, so the consistent-hash ring sends a URL to the same parent
from every edge.  GET and HEAD share a key (a HEAD is answered from a stored
GET).  Normalisation follows RFC 3986 section 6.2.2: percent-encodings of
unreserved characters are decoded and the others upper-cased, so `/%7Euser`
and `/~user` are one object.  The query string is kept as sent (its order is
significant to many origins; nginx and Varnish do the same by default).
"""

from __future__ import annotations

import re

from edge.config import Site, Topology, normalise_host

_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
VARIANT_SEPARATOR = "\n"   # never appears in a request target, so keys cannot collide


def _normalise_escape(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()


def normalise_target(raw_target: str) -> str:
    """RFC 3986 6.2.2.1/6.2.2.2 normalisation of an origin-form request target."""
    if "%" not in raw_target:
        return raw_target
    return _PERCENT.sub(_normalise_escape, raw_target)


def key_prefix(site: Site, host: str) -> str:
    """The part of the key fixed by site and Host (`host` as the client sent it)."""
    if site.aliases:
        return f"{site.name}|"
    return f"{site.name}|{normalise_host(host)}|"


def cache_key(site: Site, raw_target: str, host: str) -> str:
    """The primary cache key of a request for `raw_target` (path and query) on `site` with Host `host`."""
    return key_prefix(site, host) + normalise_target(keyed_target(site, raw_target))


def keyed_target(site: Site, raw_target: str) -> str:
    """The part of the target the key keeps: without the query, or without the site's ignored
    parameters (as nginx keys on a rewritten ``$args``); the upstream still gets the whole target."""
    if "?" not in raw_target or not (site.ignore_query or site.ignore_query_params):
        return raw_target
    path, _, query = raw_target.partition("?")
    if site.ignore_query:
        return path
    kept = [pair for pair in query.split("&") if pair.partition("=")[0] not in site.ignore_query_params]
    return f"{path}?{'&'.join(kept)}" if kept else path


def variant_store_key(primary: str, variant: str) -> str:
    """Where one Vary variant of `primary` is stored (RFC 9111 4.1 secondary key)."""
    return f"{primary}{VARIANT_SEPARATOR}{variant}"


class NotServed(ValueError):
    """No site of the topology serves the URL's host."""


def split_url(topology: Topology, url: str) -> tuple[Site, str, str]:
    """The site, Host and request target of an absolute ``http(s)://HOST/PATH?QUERY`` URL, for
    operators' commands (purge, inspect, preload); ValueError (NotServed for an unknown host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError(f"expected an absolute URL like http://www.example.com/path, got {url!r}")
    rest = rest.split("#", 1)[0]
    host, slash, path = rest.partition("/")
    host, query_mark, query = host.partition("?")       # http://host?x: target "/?x"
    if not host:
        raise ValueError(f"no host in {url!r}")
    site = topology.site_for_host(host)
    if site is None:
        raise NotServed(f"no site serves {host!r}")
    target = "/" + path if slash else "/"
    if query_mark:
        target += "?" + query
    return site, host, target
