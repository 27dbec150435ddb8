"""The cache key, by hand: site, Host (unless the site's hosts are aliases), normalised target."""

from __future__ import annotations

import pytest

from edge.cachekey import cache_key, normalise_target
from edge.config import Site

SITE = Site("shop", ("www.example.com", "static.example.com"), "http://origin", "")
ALIASED = Site("blog", ("a.example.com", "b.example.com"), "http://origin", "", aliases=True)
NO_QUERY = Site("docs", ("docs.example.com",), "http://origin", "", ignore_query=True)
NO_UTM = Site("ads", ("ads.example.com",), "http://origin", "", ignore_query_params=("utm_source", "fbclid"))


@pytest.mark.parametrize(("site", "target", "host", "key"), [
    (SITE, "/a.js", "www.example.com", "shop|www.example.com|/a.js"),
    (SITE, "/a.js", "WWW.Example.COM:8080", "shop|www.example.com|/a.js"),     # case and port ignored
    (SITE, "/a.js", "www.example.com.", "shop|www.example.com|/a.js"),         # trailing dot
    (SITE, "/a.js", "static.example.com", "shop|static.example.com|/a.js"),    # another host: another object
    (ALIASED, "/a.js", "a.example.com", "blog|/a.js"),                         # aliases share one object
    (ALIASED, "/a.js", "B.example.com", "blog|/a.js"),
    (SITE, "/%7euser?q=%2f", "www.example.com", "shop|www.example.com|/~user?q=%2F"),   # RFC 3986 6.2.2
    (NO_QUERY, "/a?b=1&c=2", "docs.example.com", "docs|docs.example.com|/a"),
    (NO_UTM, "/a?utm_source=x&page=2&fbclid=abc", "ads.example.com", "ads|ads.example.com|/a?page=2"),
    (NO_UTM, "/a?utm_source=x", "ads.example.com", "ads|ads.example.com|/a"),
    (NO_UTM, "/a?utm_sourcex=1", "ads.example.com", "ads|ads.example.com|/a?utm_sourcex=1"),   # names exact
])
def test_cache_key(site, target, host, key):
    assert cache_key(site, target, host) == key


@pytest.mark.parametrize(("raw", "normal"), [
    ("/plain", "/plain"),
    ("/%41%42", "/AB"),              # unreserved decoded
    ("/%2f%3F", "/%2F%3F"),          # reserved kept, upper-cased
    ("/a?b=%7e", "/a?b=~"),
])
def test_normalise_target(raw, normal):
    assert normalise_target(raw) == normal
