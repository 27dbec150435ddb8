"""HTTP caching policy for a shared cache: pure decisions, no I/O, no clock.

Everything the proxy needs to know about RFC 9111 (HTTP Caching), the parts of
RFC 9110 (HTTP Semantics) a cache evaluates, RFC 5861 (stale-while-revalidate,
stale-if-error), RFC 9213 (CDN-Cache-Control) and RFC 9211 (Cache-Status)
lives here as functions of their inputs.  Times (`now`, `request_time`,
`response_time`) are float Unix seconds passed in by the caller, so every rule
is tested with a fixed clock.

Headers may be a ``multidict.CIMultiDict``/``CIMultiDictProxy`` (what aiohttp
hands out; repeated fields are combined), a plain ``dict`` (looked up
case-insensitively) or a sequence of ``(name, value)`` pairs (what
:func:`freshen` returns).

This is a *shared* cache (RFC 9111 section 1: a CDN node), so ``private`` and
``s-maxage`` are read the way a shared cache must read them.  Choices where
the RFCs leave room, and the reason for each:

* HEAD responses are never stored: they have no content, and the proxy can
  answer HEAD from a stored GET response (RFC 9110 section 9.3.2).
* 206 (Partial Content) is never stored: RFC 9111 section 3.3 allows it only
  for a cache that combines ranges (section 3.4); this one stores complete
  responses and cuts ranges out of them.
* ``Vary: *`` is never stored: RFC 9111 section 4.1 says such a response
  always fails to match, so storing it only evicts useful objects.
* ``Set-Cookie`` responses are not stored (Varnish's and nginx's default):
  replaying one visitor's cookie to every other visitor is the classic CDN
  data leak.  Unless ``private="Set-Cookie"``/``no-cache="Set-Cookie"``
  name it, or the site strips it (``strip_set_cookie``): then the response
  is stored without it.
* 401 and 407 are never stored: they depend on credentials that are not part
  of the cache key.
* A response that could never be reused without going to the origin anyway
  (zero freshness, no validator, no stale-while-revalidate/stale-if-error
  window) is not stored (reason ``zero-ttl``).  RFC 9111 section 3 notes that
  caches "will not store a response that has neither a cache validator nor an
  explicit expiration time"; storing it would only cost a write and evict a
  useful object.  A heuristically cacheable status with a validator is stored
  even with zero heuristic lifetime: a 304 is cheaper than a refetch.
* Qualified ``private="..."`` and ``no-cache="..."`` (RFC 9111 sections
  5.2.2.7/5.2.2.4) let the response be stored; the listed fields are left
  out of the stored copy (:func:`hidden_fields`), so they are never served
  from cache.
* The request's own Cache-Control (``no-cache``, ``max-age=0``, ``Pragma``) is
  ignored by :func:`decide`, as nginx and Varnish do, so that clients cannot
  force traffic to the origin.  A request ``no-store`` only stops storing.
* Heuristic freshness is 10% of (Date - Last-Modified), capped at 24 hours:
  RFC 7234 section 4.2.2 required a warning beyond 24 h, so caches settled on
  that bound and RFC 9111 section 4.2.2 keeps "10%" as the typical fraction.
"""

from __future__ import annotations

import calendar
import enum
import functools
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urldefrag, urljoin, urlsplit

import http_sfv

Headers = Mapping[str, str] | Sequence[tuple[str, str]]

__all__ = [
    "Action", "Decision", "HEURISTIC_STATUSES", "UNDERSTOOD_STATUSES",
    "age_value", "cache_status_entry", "client_not_modified", "conditional_headers",
    "current_age", "decide", "effective_cache_control", "freshen", "freshness_lifetime",
    "invalidation_targets", "parse_cache_control", "parse_http_date", "stale_if_error_allowed",
    "stale_when_disconnected", "hidden_fields",
    "storable", "variant_key", "vary_names",
]

# RFC 9110 section 15.1: statuses whose responses are heuristically cacheable.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

# Final statuses this cache "understands" (RFC 9111 section 3: recognises and
# implements all caching-related behaviour): those of RFC 9110 section 15 plus
# RFC 6585 (428, 429, 431, 511) and RFC 7725 (451).  Left out on purpose: 206
# (see module docstring), 304 (updates a stored response, section 4.3.4; it is
# never stored itself), 401 and 407 (credential-specific).
UNDERSTOOD_STATUSES = frozenset({
    200, 201, 202, 203, 204, 205,
    300, 301, 302, 303, 305, 307, 308,
    400, 402, 403, 404, 405, 406, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417,
    421, 422, 426, 428, 429, 431, 451,
    500, 501, 502, 503, 504, 505, 511,
})

# Understood, and never stored: 304 updates a stored response (section 4.3.4);
# 401 and 407 are about credentials.
_NEVER_STORED_STATUSES = frozenset({304, 401, 407})

@dataclass(frozen=True)
class SiteDefaults:
    """An operator's per-site freshness settings (nginx ``proxy_cache_valid``, Varnish ``default_ttl``).

    `default_ttl` stands in for the heuristic when a response has no explicit
    freshness (for the statuses nginx applies it to, and the heuristically
    cacheable ones); `max_ttl` caps every lifetime; the two stale windows
    apply when the response names none.  None leaves each off.  What the
    response forbids (no-store, no-cache, must-revalidate...) still wins.
    """

    default_ttl: float | None = None
    max_ttl: float | None = None
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None


NO_DEFAULTS = SiteDefaults()
DEFAULT_TTL_STATUSES = HEURISTIC_STATUSES | {302}


# RFC 9111 section 1.2.2: delta-seconds overflow is treated as 2^31.
DELTA_SECONDS_MAX = 2**31
HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 24 * 3600.0

# RFC 9110 section 7.6.1 (hop-by-hop) and RFC 9111 section 3.1 (proxy-specific).
_HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "trailer", "proxy-authenticate", "proxy-authentication-info", "proxy-authorization",
})
# RFC 9111 section 3.2: never updated from a 304.  Content-Range is
# "automatically processed and removed", Content-Length describes our stored body.
_NOT_UPDATED = _HOP_BY_HOP | {"content-length", "content-range"}
# RFC 9110 section 9.2.1.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 9110 sections 12.5.2-12.5.4: values compared case-insensitively.
_CASE_INSENSITIVE_FIELDS = frozenset({"accept-encoding", "accept-charset", "accept-language"})
_REVALIDATE_DIRECTIVES = ("must-revalidate", "proxy-revalidate", "s-maxage")

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*\Z")
_WS_AROUND_SEPARATOR = re.compile(r"[ \t]*([,;])[ \t]*")
_WS_RUN = re.compile(r"[ \t]+")


# --------------------------------------------------------------------------- fields


def _field(headers: Headers, name: str) -> str | None:
    """The value of field `name`, repeated lines joined with ", " (RFC 9110 section 5.3).

    None when absent; an empty string when present but empty.
    """
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = getall(name, ())
        if not values:
            return None
        return values[0] if len(values) == 1 else ", ".join(values)
    lname = name.lower()
    if isinstance(headers, Mapping):
        value = headers.get(name)
        if value is not None:
            return value
        for key, value in headers.items():
            if key.lower() == lname:
                return value
        return None
    found = [value for key, value in headers if key.lower() == lname]
    return ", ".join(found) if found else None


def _pairs(headers: Headers) -> Iterable[tuple[str, str]]:
    """Every (name, value) line of a multidict, dict or pair sequence, in order."""
    if isinstance(headers, Mapping) or hasattr(headers, "getall"):
        return headers.items()
    return headers


def _split_list(value: str, quoted_pairs: bool = True) -> list[str]:
    """Split a list-based field at commas outside quoted strings (RFC 9110 section 5.6.1).

    `quoted_pairs` False for entity tags, whose quotes hold no escapes
    (RFC 9110 section 8.8.3: a backslash is an ordinary etagc).
    """
    if '"' not in value:
        return value.split(",")
    members: list[str] = []
    start, in_quotes, escaped = 0, False, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif in_quotes and quoted_pairs and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "," and not in_quotes:
            members.append(value[start:index])
            start = index + 1
    members.append(value[start:])
    return members


def _unquote(value: str) -> str | None:
    """The content of an RFC 9110 section 5.6.4 quoted-string, or None if malformed."""
    if len(value) < 2 or value[-1] != '"':
        return None
    out: list[str] = []
    escaped = False
    for char in value[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


_MONTHS = {name: number for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_DAY_LONG = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 5.6.7, exactly: names are case-insensitive (RFC 5234 strings), GMT is %s"GMT".
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} (GMT)", re.IGNORECASE)
_RFC850_DATE = re.compile(rf"{_DAY_LONG}, (\d\d)-{_MONTH}-(\d\d) {_TIME} (GMT)", re.IGNORECASE)
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} (\d\d| \d) {_TIME} (\d{{4}})", re.IGNORECASE)


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """An HTTP-date as Unix seconds; None when absent or invalid.  RFC 9110 section 5.6.7.

    Recipients "MUST accept all three HTTP-date formats" (IMF-fixdate, the
    obsolete rfc850-date and asctime-date) and nothing else: a date with a
    two-digit year where four are due, another zone than GMT, dashes in an
    IMF-fixdate, dots in the time, a one-digit hour, a missing comma or a
    doubled space is invalid (``email.utils`` reads many of those as valid
    dates decades away).  Day and month names match case-insensitively.  An
    rfc850 two-digit year more than 50 years in the future is the most recent
    past year with those digits (relative to `now`, the clock by default).
    """
    if not value:
        return None
    return _parse_http_date(value, time.gmtime(time.time() if now is None else now).tm_year)


@functools.lru_cache(maxsize=4096)
def _parse_http_date(value: str, this_year: int) -> float | None:
    text = value.strip(" \t")
    match = _IMF_FIXDATE.fullmatch(text)
    if match:
        day, month, year, hour, minute, second, zone = match.groups()
    else:
        match = _RFC850_DATE.fullmatch(text)
        if match:
            day, month, year, hour, minute, second, zone = match.groups()
            year = str(_rfc850_year(int(year), this_year))
        else:
            match = _ASCTIME_DATE.fullmatch(text)
            if not match:
                return None
            month, day, hour, minute, second, year = match.groups()
            zone = "GMT"
    if zone != "GMT":
        return None
    numbers = int(year), _MONTHS[month.lower()], int(day), int(hour), int(minute), int(second)
    year_n, month_n, day_n, hour_n, minute_n, second_n = numbers
    if not (year_n >= 1 and 1 <= day_n <= calendar.monthrange(year_n, month_n)[1] and hour_n <= 23
            and minute_n <= 59
            and second_n <= 60):         # 60: a leap second (RFC 9110 5.6.7 "second = 2DIGIT")
        return None
    return float(calendar.timegm(numbers))


def _rfc850_year(two_digits: int, this_year: int) -> int:
    year = this_year - this_year % 100 + two_digits
    if year > this_year + 50:
        year -= 100
    return year


def _delta_seconds(value: str | None) -> int | None:
    """RFC 9111 section 1.2.2 delta-seconds: 1*DIGIT, overflow reads as 2^31; else None."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    return min(int(value), DELTA_SECONDS_MAX)


# --------------------------------------------------------------------------- Cache-Control


@functools.lru_cache(maxsize=2048)
def _parse_cache_control(value: str) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for member in _split_list(value):
        name, equals, argument = member.partition("=")
        name = name.strip(" \t").lower()
        if not name or not all(char in _TCHAR for char in name):
            continue                                # garbage: ignore this directive
        if name in directives:
            continue                                # RFC 9111 section 4.2.1: first wins
        if not equals:
            directives[name] = None
            continue
        argument = argument.strip(" \t")
        if argument.startswith('"'):
            unquoted = _unquote(argument)
            if unquoted is None:
                continue                            # unterminated quoted-string: ignore
            directives[name] = unquoted
        else:
            # A malformed token is kept as is: `max-age=6 0` then reads as an
            # invalid value (stale), which is safer than ignoring the directive.
            directives[name] = argument
    return directives


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Parse a Cache-Control field value (RFC 9111 section 5.2).

    ``cache-directive = token [ "=" ( token / quoted-string ) ]``.  Names are
    lower-cased, quoted-string arguments unquoted, a directive without an
    argument maps to None.  Duplicates: the first occurrence wins (RFC 9111
    section 4.2.1, "the first occurrence should be used").  Malformed members
    are ignored; this never raises.  Returns a new dict the caller may modify.
    """
    return dict(_parse_cache_control(value)) if value else {}


# Directives whose argument is delta-seconds: an sf-integer in a targeted field.
_INTEGER_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


@functools.lru_cache(maxsize=1024)
def _parse_targeted(value: str) -> dict[str, str | None] | None:
    """A targeted field (RFC 9213 section 2.1) as directives; None when empty or invalid.

    Parsed as an RFC 8941 Dictionary by ``http_sfv`` (which keeps the types):
    Boolean true is a bare directive, false is absent; a directive whose value
    has the wrong type (``max-age="10"``, a String, or ``max-age=1.5``) is
    invalid and ignored; String and Token arguments (``no-cache="a, b"``)
    become their text.  Parameters are ignored.
    """
    dictionary = http_sfv.Dictionary()
    try:
        dictionary.parse(value.strip(" \t").encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    if not dictionary:
        return None
    directives: dict[str, str | None] = {}
    for name, member in dictionary.items():
        argument = getattr(member, "value", None)
        if name in _INTEGER_DIRECTIVES:
            if type(argument) is int and argument >= 0:
                directives[name] = str(argument)
        elif argument is True:
            directives[name] = None
        elif isinstance(argument, str):              # String or Token
            directives[name] = str(argument)
        # Boolean false is absent; Decimals, byte sequences and inner lists fit no directive.
    return directives


def _policy(resp_headers: Headers) -> tuple[dict[str, str | None], bool]:
    """The directives this cache obeys and whether they came from CDN-Cache-Control.

    Shared, cached dicts: callers in this module never modify them.
    """
    targeted = _field(resp_headers, "cdn-cache-control")
    if targeted is not None:
        directives = _parse_targeted(targeted)
        if directives is not None:
            return directives, True
    value = _field(resp_headers, "cache-control")
    return (_parse_cache_control(value) if value else {}), False


def effective_cache_control(resp_headers: Headers) -> dict[str, str | None]:
    """The response directives that govern this (CDN) cache.

    RFC 9213 section 2.2: a cache with CDN-Cache-Control on its target list
    "MUST select the first ... field with a valid, non-empty value and use its
    value to determine the caching policy for the response, and it MUST ignore
    the Cache-Control and Expires header fields in that response".  The field
    is a Structured Fields Dictionary (section 2.1); when empty or unparsable
    it "MUST be ignored", and Cache-Control applies.
    """
    return dict(_policy(resp_headers)[0])


# --------------------------------------------------------------------------- storing


def _has_validator(resp_headers: Headers) -> bool:
    return _field(resp_headers, "etag") is not None or _field(resp_headers, "last-modified") is not None


def _window(directives: Mapping[str, str | None], name: str) -> int | None:
    return _delta_seconds(directives[name]) if name in directives else None


def storable(method: str, status: int, req_headers: Headers, resp_headers: Headers, *,
             strip_set_cookie: bool = False, defaults: SiteDefaults = NO_DEFAULTS) -> tuple[bool, str]:
    """May this shared cache store the response?  RFC 9111 section 3.

    Returns ``(True, basis)`` with basis ``explicit``, ``public`` or
    ``heuristic``, or ``(False, reason)`` with reason one of ``method``,
    ``status``, ``partial``, ``no-store``, ``private``, ``authorization``,
    ``vary-star``, ``set-cookie``, ``no-freshness`` or ``zero-ttl``: short
    tokens for a Cache-Status ``detail``.

    Section 3: "A cache MUST NOT store a response to a request unless: the
    request method is understood by the cache; the response status code is
    final; ... the no-store cache directive is not present in the response;
    if the cache is shared: the private response directive is either not
    present ...; if the cache is shared: the Authorization header field is not
    present in the request ... or a response directive is present that
    explicitly allows shared caching (see Section 3.5); and the response
    contains at least one of: a public response directive; an Expires header
    field; a max-age response directive; if the cache is shared: an s-maxage
    response directive; ... a status code that is defined as heuristically
    cacheable".  Section 3.5 names must-revalidate, public and s-maxage.
    Section 5.2.1.5: a request no-store means "a cache MUST NOT store any part
    of either this request or any response to it".  Section 5.2.2.3: with
    must-understand and a status the cache understands, no-store is ignored.

    Status codes (section 3): a final status the cache does not know may be
    stored when the response says how long it is fresh (or is ``public``),
    unless ``must-understand`` is present; 206 and 304 only when understood,
    which they are not here (see the module docstring).  401 and 407 are
    understood and deliberately never stored: they are about credentials.
    A response with Set-Cookie is not stored unless qualified no-cache or
    private name it, or the site strips it (`strip_set_cookie`).
    The directives come from :func:`effective_cache_control` (RFC 9213).
    """
    if method != "GET":
        return False, "method"
    if status == 206:
        return False, "partial"
    if status < 200 or status > 999 or status in _NEVER_STORED_STATUSES:
        return False, "status"
    request_cache_control = _field(req_headers, "cache-control")
    if request_cache_control and "no-store" in _parse_cache_control(request_cache_control):
        return False, "no-store"
    directives, targeted = _policy(resp_headers)
    understood = status in UNDERSTOOD_STATUSES
    if "must-understand" in directives and not understood:
        return False, "status"
    if "no-store" in directives and "must-understand" not in directives:
        return False, "no-store"
    if _unqualified(directives, "private"):
        return False, "private"
    if (_field(req_headers, "authorization") is not None
            and not any(name in directives for name in ("must-revalidate", "public", "s-maxage"))):
        return False, "authorization"
    if vary_names(resp_headers) is None:
        return False, "vary-star"
    if (_field(resp_headers, "set-cookie") is not None and not strip_set_cookie
            and "set-cookie" not in hidden_fields(resp_headers)):
        return False, "set-cookie"
    if ("max-age" in directives or "s-maxage" in directives
            or (not targeted and _field(resp_headers, "expires") is not None)):
        basis = "explicit"
    elif "public" in directives:
        basis = "public"
    elif defaults.default_ttl is not None and status in DEFAULT_TTL_STATUSES:
        basis = "default-ttl"
    elif status in HEURISTIC_STATUSES:
        basis = "heuristic"
    else:
        return False, "no-freshness"
    lifetime = freshness_lifetime(resp_headers, status=status, defaults=defaults)
    if not _reusable(directives, resp_headers, lifetime, defaults):
        return False, "zero-ttl"
    return True, basis


def _unqualified(directives: Mapping[str, str | None], name: str) -> bool:
    """The directive is present without field names (``no-cache``, not ``no-cache="Set-Cookie"``)."""
    return name in directives and not directives[name]


def hidden_fields(resp_headers: Headers) -> frozenset[str]:
    """Field names (lower case) a stored copy must not keep: those listed by qualified
    ``no-cache="..."`` and ``private="..."`` (RFC 9111 5.2.2.4 and 5.2.2.7).

    The response itself may be stored and reused; the listed fields may not
    be sent from cache without revalidation, and dropping them from the
    stored copy is a correct way to honour that.
    """
    directives, _ = _policy(resp_headers)
    names: set[str] = set()
    for directive in ("no-cache", "private"):
        value = directives.get(directive)
        if value:
            names.update(name.strip().lower() for name in value.split(",") if name.strip())
    return frozenset(names)


def _reusable(directives: Mapping[str, str | None], resp_headers: Headers, lifetime: float,
              defaults: SiteDefaults = NO_DEFAULTS) -> bool:
    """Could a stored copy ever answer a request without a full refetch?"""
    if _has_validator(resp_headers):
        return True                                 # a 304 beats a refetch
    if _unqualified(directives, "no-cache"):
        return False
    if lifetime > 0:
        return True
    if any(name in directives for name in _REVALIDATE_DIRECTIVES):
        return False                                # no stale serving allowed
    return bool(_stale_window(directives, "stale-while-revalidate", defaults)
                or _stale_window(directives, "stale-if-error", defaults))


def _stale_window(directives: Mapping[str, str | None], name: str, defaults: SiteDefaults) -> int | None:
    """The response's own stale window (RFC 5861), or the site's default when it names none."""
    window = _window(directives, name)
    if window is None:
        window = defaults.stale_while_revalidate if name == "stale-while-revalidate" else defaults.stale_if_error
    return window


# --------------------------------------------------------------------------- freshness and age


def freshness_lifetime(resp_headers: Headers, *, status: int | None = None,
                       response_time: float | None = None, defaults: SiteDefaults = NO_DEFAULTS) -> float:
    """:func:`_own_lifetime` under the site's `default_ttl` and `max_ttl`."""
    lifetime = _own_lifetime(resp_headers, status=status, response_time=response_time,
                             default_ttl=defaults.default_ttl)
    return lifetime if defaults.max_ttl is None else min(lifetime, defaults.max_ttl)


def _own_lifetime(resp_headers: Headers, *, status: int | None, response_time: float | None,
                  default_ttl: float | None) -> float:
    """Seconds the response is fresh for, from its own headers.  RFC 9111 section 4.2.1.

    "A cache can calculate the freshness lifetime ... by evaluating the
    following rules and using the first match: If the cache is shared and the
    s-maxage response directive is present, use its value, or If the max-age
    response directive is present, use its value, or If the Expires response
    header field is present, use its value minus the value of the Date
    response header field (using the time the message was received if it is
    not present ...), or Otherwise, no explicit expiration time is present in
    the response.  A heuristic freshness lifetime might be applicable".

    An invalid s-maxage/max-age value or Expires date makes the response stale
    (section 4.2.1: caches "are encouraged to consider responses that have
    invalid freshness information ... to be stale"; section 5.3: "A cache
    recipient MUST interpret invalid date formats, especially the value "0",
    as representing a time in the past").  Directives come from
    :func:`effective_cache_control`; with CDN-Cache-Control, Expires is ignored
    (RFC 9213 section 2.2).

    Heuristic (section 4.2.2), when no explicit time is present and the status
    is heuristically cacheable (RFC 9110 section 15.1) or the response is
    ``public``: 10% of (Date - Last-Modified), at most 24 hours.  `status`
    None means "already known storable" (a stored response).  `response_time`
    stands in for a missing Date; without either, the lifetime is 0.
    """
    directives, targeted = _policy(resp_headers)
    for name in ("s-maxage", "max-age"):
        if name in directives:
            return float(_delta_seconds(directives[name]) or 0)
    date = parse_http_date(_field(resp_headers, "date"))
    if date is None:
        date = response_time
    if not targeted:
        expires_value = _field(resp_headers, "expires")
        if expires_value is not None:
            expires = parse_http_date(expires_value)
            if expires is None or date is None:
                return 0.0
            return max(0.0, expires - date)
    if default_ttl is not None and (status is None or status in DEFAULT_TTL_STATUSES):
        return float(default_ttl)        # the operator's default instead of the heuristic
    if status is not None and status not in HEURISTIC_STATUSES and "public" not in directives:
        return 0.0
    last_modified = parse_http_date(_field(resp_headers, "last-modified"))
    if date is None or last_modified is None or last_modified >= date:
        return 0.0
    return min(HEURISTIC_FRACTION * (date - last_modified), HEURISTIC_CAP)


def _age_header(resp_headers: Headers) -> int:
    """RFC 9111 section 5.1: the first member of Age; an invalid value is ignored (0)."""
    value = _field(resp_headers, "age")
    if value is None:
        return 0
    return _delta_seconds(value.split(",", 1)[0].strip()) or 0


def current_age(resp_headers: Headers, request_time: float, response_time: float, now: float) -> float:
    """The stored response's age in seconds at `now`.  RFC 9111 section 4.2.3, exactly::

        apparent_age = max(0, response_time - date_value);
        response_delay = response_time - request_time;
        corrected_age_value = age_value + response_delay;
        corrected_initial_age = max(apparent_age, corrected_age_value);
        resident_time = now - response_time;
        current_age = corrected_initial_age + resident_time;

    `request_time` is when the request that produced the stored response was
    sent, `response_time` when the response was received.  A missing or
    invalid Date is taken as `response_time` (RFC 9110 section 6.6.1: the
    recipient records the time it received the message); an invalid Age is
    ignored.
    """
    date_value = parse_http_date(_field(resp_headers, "date"))
    if date_value is None:
        date_value = response_time
    apparent_age = max(0.0, response_time - date_value)
    response_delay = response_time - request_time
    corrected_age_value = _age_header(resp_headers) + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - response_time
    return corrected_initial_age + resident_time


class Action(enum.Enum):
    """What the proxy does with a stored response (nginx status in brackets)."""

    FRESH = "fresh"                                  # serve it [HIT]
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"  # serve it, refresh behind [UPDATING]
    REVALIDATE = "revalidate"                        # conditional request first [REVALIDATED/EXPIRED]
    FETCH = "fetch"                                  # unusable: full fetch [EXPIRED]


@dataclass(frozen=True)
class Decision:
    """The verdict of :func:`decide`, with the numbers Age and Cache-Status report."""

    action: Action
    age: float          # current age, seconds (RFC 9111 section 4.2.3)
    ttl: float          # freshness lifetime - age; negative when stale (RFC 9211 section 2.4)
    reason: str         # fresh, stale, no-cache, must-revalidate, proxy-revalidate, s-maxage, swr


@dataclass(frozen=True)
class Assessment:
    """What :func:`decide` needs of a stored response that does not change with time.

    Computed once per stored response (the proxy keeps it with the object),
    so that a hit compares numbers instead of re-parsing header fields.
    """

    lifetime: float             # freshness lifetime, RFC 9111 section 4.2.1
    initial_age: float          # corrected_initial_age, section 4.2.3
    response_time: float
    no_cache: bool
    revalidate: str | None      # must-revalidate, proxy-revalidate or s-maxage, when present
    swr_window: int | None      # stale-while-revalidate seconds, RFC 5861 section 3
    has_validator: bool


def assess(resp_headers: Headers, request_time: float, response_time: float,
           status: int | None = None, defaults: SiteDefaults = NO_DEFAULTS) -> Assessment:
    """The time-independent part of :func:`decide` (and of :func:`current_age`).

    `status` restricts heuristic freshness as in :func:`freshness_lifetime`.
    """
    directives, _ = _policy(resp_headers)
    return Assessment(
        lifetime=freshness_lifetime(resp_headers, status=status, response_time=response_time, defaults=defaults),
        initial_age=current_age(resp_headers, request_time, response_time, response_time),
        response_time=response_time,
        no_cache=_unqualified(directives, "no-cache"),
        revalidate=next((name for name in _REVALIDATE_DIRECTIVES if name in directives), None),
        swr_window=_stale_window(directives, "stale-while-revalidate", defaults),
        has_validator=_has_validator(resp_headers),
    )


def decide(resp_headers: Headers, request_time: float, response_time: float, now: float) -> Decision:
    """What to do with a stored response for a new request.  RFC 9111 section 4.

    In order:

    * ``no-cache`` without field names: REVALIDATE.  Section 5.2.2.4: "the
      response MUST NOT be used to satisfy any other request without
      forwarding it for validation and receiving a successful response".
      With field names only those fields are barred, and the node does not
      store them (:func:`hidden_fields`).
    * fresh: FRESH.  Section 4.2: "response_is_fresh = (freshness_lifetime >
      current_age)".
    * stale with must-revalidate, proxy-revalidate or s-maxage: REVALIDATE.
      Section 4.2.4: "A cache MUST NOT generate a stale response if it is
      prohibited by ... a must-revalidate response directive, or an applicable
      s-maxage or proxy-revalidate response directive"; section 5.2.2.10:
      s-maxage "incorporates the semantics of the proxy-revalidate".
    * stale by at most N seconds with ``stale-while-revalidate=N``:
      STALE_WHILE_REVALIDATE.  RFC 5861 section 3: caches "MAY serve the
      response in which it appears after it becomes stale, up to the
      indicated number of seconds" (the bound is inclusive).
    * otherwise: REVALIDATE.

    REVALIDATE becomes FETCH when the stored response has no validator (ETag
    or Last-Modified, section 4.3.1): there is nothing to make the request
    conditional with.  `reason` still says why it could not be served.  The
    request's own Cache-Control is deliberately not consulted (see module
    docstring).
    """
    return decide_assessed(assess(resp_headers, request_time, response_time), now)


def age_at(stored: Assessment, now: float) -> float:
    """current_age (RFC 9111 section 4.2.3): corrected_initial_age + resident_time."""
    return stored.initial_age + (now - stored.response_time)


def stale_from(stored: Assessment, when: float) -> Assessment:
    """The assessment of a response declared stale at `when` (a soft purge), if it was fresh then.

    Its age is moved on so that its freshness ran out at `when`: from then
    on it is exactly ``now - when`` seconds stale, so revalidation,
    ``stale-while-revalidate`` and ``stale-if-error`` (RFC 5861) apply to it
    as to any stale response, their windows counted from the purge, and the
    ``Age`` it is sent with tells the next cache (an L1, a browser) that it
    is stale too.  A response already stale at `when` is unchanged.
    """
    age_then = age_at(stored, when)
    if age_then >= stored.lifetime:
        return stored
    return replace(stored, initial_age=stored.initial_age + (stored.lifetime - age_then))


def _staleness(resp_headers: Headers, request_time: float, response_time: float, now: float,
               defaults: SiteDefaults, stale_at: float | None) -> float:
    """Seconds past the freshness lifetime at `now`; with `stale_at` (a soft purge), at least ``now - stale_at``."""
    staleness = (current_age(resp_headers, request_time, response_time, now)
                 - freshness_lifetime(resp_headers, response_time=response_time, defaults=defaults))
    return staleness if stale_at is None else max(staleness, now - stale_at)


def decide_assessed(stored: Assessment, now: float) -> Decision:
    """:func:`decide` for a stored response already assessed: arithmetic only."""
    age = age_at(stored, now)
    ttl = stored.lifetime - age
    refetch = Action.REVALIDATE if stored.has_validator else Action.FETCH
    if stored.no_cache:
        return Decision(refetch, age, ttl, "no-cache")
    if ttl > 0:
        return Decision(Action.FRESH, age, ttl, "fresh")
    if stored.revalidate is not None:
        return Decision(refetch, age, ttl, stored.revalidate)
    if stored.swr_window is not None and -ttl <= stored.swr_window:
        return Decision(Action.STALE_WHILE_REVALIDATE, age, ttl, "swr")
    return Decision(refetch, age, ttl, "stale")


def stale_if_error_allowed(resp_headers: Headers, request_time: float, response_time: float,
                           now: float, defaults: SiteDefaults = NO_DEFAULTS, stale_at: float | None = None) -> bool:
    """May the stored response answer a request whose upstream fetch failed?

    RFC 5861 section 4: with ``stale-if-error=N``, "when an error is
    encountered, a cached stale response MAY be used to satisfy the request,
    regardless of other freshness information", while stale by at most N
    seconds (inclusive).  Never with no-cache, must-revalidate,
    proxy-revalidate or s-maxage (RFC 9111 section 4.2.4 forbids generating
    such a stale response; section 5.2.2.10 for s-maxage).  Which failures
    count as errors (500, 502, 503, 504, unreachable) is the caller's call.
    `stale_at` (a soft purge) makes the response stale from then on at the latest.
    """
    directives, _ = _policy(resp_headers)
    if _unqualified(directives, "no-cache") or any(name in directives for name in _REVALIDATE_DIRECTIVES):
        return False
    window = _stale_window(directives, "stale-if-error", defaults)
    if window is None:
        return False
    return _staleness(resp_headers, request_time, response_time, now, defaults, stale_at) <= window


def stale_when_disconnected(resp_headers: Headers, request_time: float, response_time: float, now: float,
                            max_staleness: float, defaults: SiteDefaults = NO_DEFAULTS,
                            stale_at: float | None = None) -> bool:
    """May the stored response answer a request whose upstream could not be reached at all?

    RFC 9111 section 4.2.4: "A cache MUST NOT generate a stale response unless
    it is disconnected or doing so is explicitly permitted"; and never when
    no-cache, must-revalidate, proxy-revalidate or s-maxage forbid it.  An
    unreachable upstream (refused, reset, closed or timed out before
    answering) is a disconnected cache; a 5xx answer is not (that is
    stale-if-error's).  `max_staleness` bounds how stale (per-site setting);
    `stale_at` as for :func:`stale_if_error_allowed`.
    """
    directives, _ = _policy(resp_headers)
    if _unqualified(directives, "no-cache") or any(name in directives for name in _REVALIDATE_DIRECTIVES):
        return False
    return _staleness(resp_headers, request_time, response_time, now, defaults, stale_at) <= max_staleness


# --------------------------------------------------------------------------- validation


def conditional_headers(resp_headers: Headers) -> dict[str, str]:
    """Request fields that revalidate a stored response.  RFC 9111 section 4.3.1.

    "When generating a conditional request for validation, a cache ... MUST
    send the relevant entity tags (using If-Match, If-None-Match, or If-Range)
    if the entity tags were provided in the stored response(s) being
    validated" and "SHOULD send the Last-Modified value (using
    If-Modified-Since) if only a Last-Modified value has been provided"; both
    are sent when both exist (If-None-Match takes precedence at the server).
    An invalid Last-Modified is not echoed.
    """
    headers: dict[str, str] = {}
    etag = _field(resp_headers, "etag")
    if etag:
        headers["If-None-Match"] = etag
    last_modified = _field(resp_headers, "last-modified")
    if last_modified and parse_http_date(last_modified) is not None:
        headers["If-Modified-Since"] = last_modified
    return headers


def freshen(stored_headers: Headers, not_modified_headers: Headers) -> list[tuple[str, str]]:
    """The stored response's header lines updated by a 304.  RFC 9111 sections 4.3.4 and 3.2.

    Section 3.2: "the cache MUST add each header field in the provided
    response to the stored response, replacing field values that are already
    present, with the following exceptions: Header fields excepted from
    storage in Section 3.1 [hop-by-hop, Connection-listed, Proxy-*] ...
    Header fields that are automatically processed and removed by the
    recipient [Content-Range] ... The Content-Length header field."

    Replaced fields take the place of their first stored line; fields new to
    the stored response are appended; every other stored line is kept, in
    order, with repeats.  Date and Age always come from the 304 and are
    dropped when it has none: they describe the old response, and keeping
    them would make the refreshed response look old (RFC 9111 section 4.2.3
    computes age from the response being stored).
    """
    nm_pairs = list(_pairs(not_modified_headers))
    excluded = set(_NOT_UPDATED)
    for name, value in nm_pairs:
        if name.lower() == "connection":
            excluded.update(option.strip(" \t").lower() for option in value.split(","))
    updates: dict[str, list[tuple[str, str]]] = {}
    for name, value in nm_pairs:
        lname = name.lower()
        if lname not in excluded:
            updates.setdefault(lname, []).append((name, value))
    replaced = set(updates) | {"date", "age"}
    freshened: list[tuple[str, str]] = []
    placed: set[str] = set()
    for name, value in _pairs(stored_headers):
        lname = name.lower()
        if lname not in replaced:
            freshened.append((name, value))
        elif lname in updates and lname not in placed:
            freshened.extend(updates[lname])
            placed.add(lname)
    for lname, lines in updates.items():
        if lname not in placed:
            freshened.extend(lines)
    return freshened


def _entity_tags(value: str) -> list[str]:
    """Opaque tags of an entity-tag list (RFC 9110 section 8.8.3), W/ dropped; "*" kept as "*".

    Lenient: an unquoted tag is taken as its own opaque value, so that an
    origin's sloppy ETag still round-trips; empty members are skipped.
    """
    tags: list[str] = []
    for member in _split_list(value, quoted_pairs=False):
        member = member.strip(" \t")
        if member == "*":
            tags.append("*")
            continue
        if member.startswith("W/"):
            member = member[2:]
        if member.startswith('"') and member.endswith('"') and len(member) >= 2:
            tags.append('"' + member[1:-1] + '"')     # keep quotes: distinct from a bare "*"
        elif member:
            tags.append('"' + member + '"')
    return tags


def client_not_modified(method: str, req_headers: Headers, resp_headers: Headers,
                        *, status: int = 200) -> bool:
    """Can the cache answer the client's conditional GET/HEAD with 304?

    RFC 9110 section 13.2.2: "When the method is GET or HEAD, If-None-Match
    is not present, and If-Modified-Since is present, evaluate the
    If-Modified-Since precondition".  Section 13.1.2: If-None-Match uses the
    weak comparison function; "If the field value is "*", the condition is
    false if the origin server has a current representation", which a stored
    response is.  Section 13.1.3: If-Modified-Since is ignored when not a
    valid HTTP-date (or a list); the condition is false when "the selected
    representation's last modification date is earlier or equal to the date
    provided".  Section 13.2.1: preconditions only apply when the response
    would be 2xx (`status` of the stored response).

    Without a Last-Modified the stored Date stands in (RFC 9111 section
    4.3.2: a cache evaluates If-Modified-Since against "the Last-Modified
    value of the stored response, or, if none, its Date"); the node stores
    every response with a valid Date (the time it was received when the
    upstream sent none or an invalid one).
    """
    if method not in ("GET", "HEAD") or not 200 <= status < 300:
        return False
    if_none_match = _field(req_headers, "if-none-match")
    if if_none_match is not None:
        wanted = _entity_tags(if_none_match)
        if "*" in wanted:
            return True
        etag = _field(resp_headers, "etag")
        if etag is None:
            return False
        stored = _entity_tags(etag)
        return bool(stored) and stored[0] in wanted
    since = parse_http_date(_field(req_headers, "if-modified-since"))
    if since is None:
        return False
    last_modified = parse_http_date(_field(resp_headers, "last-modified"))
    if last_modified is None:
        last_modified = parse_http_date(_field(resp_headers, "date"))
    return last_modified is not None and last_modified <= since


# --------------------------------------------------------------------------- ranges


UNSATISFIABLE = "unsatisfiable"


def requested_range(method: str, req_headers: Headers, resp_headers: Headers, status: int,
                    size: int) -> tuple[int, int] | str | None:
    """The byte range to serve from a stored response, RFC 9110 section 14.

    Returns ``(first, last)`` (inclusive) for a satisfiable single range,
    :data:`UNSATISFIABLE` (answer 416), or None to send the whole 200.  Only
    GET of a stored 200 (section 14.2: "A server MUST ignore a Range header
    field received with a request method that is unrecognized or for which
    range handling is not defined"); only the ``bytes`` unit; several ranges
    are answered with the whole representation (a server "MAY ignore the
    Range header field", and multipart/byteranges is not worth its cost
    here); ``If-Range`` (section 13.1.5) must match the stored strong ETag
    exactly, or equal its Last-Modified date, or the range is ignored.
    """
    if method != "GET" or status != 200:
        return None
    value = _field(req_headers, "range")
    if value is None:
        return None
    if_range = _field(req_headers, "if-range")
    if if_range is not None and not _if_range_matches(if_range.strip(), resp_headers):
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not (first_text.isdigit() or (not first_text and last_text.isdigit())):
        return None
    if last_text and not last_text.isdigit():
        return None
    if not first_text:                          # suffix: the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - length), size - 1
    first = int(first_text)
    if first >= size:
        return UNSATISFIABLE
    last = min(int(last_text), size - 1) if last_text else size - 1
    if last < first:
        return None                             # invalid range-spec: ignore the field
    return first, last


def _if_range_matches(if_range: str, resp_headers: Headers) -> bool:
    if if_range.startswith(('"', "W/")):
        etag = _field(resp_headers, "etag")
        # Strong comparison: a weak validator never matches (section 13.1.5).
        return etag is not None and not if_range.startswith("W/") and etag.strip() == if_range
    date = parse_http_date(if_range)
    last_modified = parse_http_date(_field(resp_headers, "last-modified"))
    return date is not None and last_modified is not None and date == last_modified


# --------------------------------------------------------------------------- Vary


def vary_names(resp_headers: Headers) -> tuple[str, ...] | None:
    """The request fields a response varies on.  RFC 9111 section 4.1.

    Lower-cased, de-duplicated and sorted, so that equal Vary values give
    equal tuples; () without Vary; None for "*": "A stored response with a
    Vary header field value containing a member "*" always fails to match".
    """
    value = _field(resp_headers, "vary")
    if value is None:
        return ()
    return _vary_names(value)


@functools.lru_cache(maxsize=512)
def _vary_names(value: str) -> tuple[str, ...] | None:
    names = {member.strip(" \t").lower() for member in value.split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


def _normalise_value(name: str, value: str) -> str:
    if '"' not in value:
        value = _WS_RUN.sub(" ", _WS_AROUND_SEPARATOR.sub(r"\1", value))
    value = value.strip(" \t")
    if name not in _CASE_INSENSITIVE_FIELDS:
        return value
    value = value.lower()
    if ";" not in value and '"' not in value:
        # Without q-values these lists carry no order (RFC 9110 12.5.3-12.5.4:
        # preference is by qvalue): "gzip, br" and "br, gzip" are one variant.
        value = ",".join(sorted(member.strip() for member in value.split(",") if member.strip()))
    return value


def variant_key(names: tuple[str, ...], req_headers: Headers) -> str:
    """A stable string identifying a request's values for the Vary `names`.  RFC 9111 section 4.1.

    Two requests get the same key when their fields match per section 4.1:
    "adding or removing whitespace, where allowed in the header field's
    syntax; combining multiple header field lines with the same field name;
    normalizing both header field values in a way that is known to have
    identical semantics ... (e.g., ... case-normalization, where values are
    defined to be case-insensitive)".  Accept-Encoding, Accept-Charset and
    Accept-Language are lower-cased, and their members sorted when none has
    a q-value (the order then means nothing); whitespace around "," and ";"
    is removed and other runs collapse to one space (not inside quoted
    strings).  An absent field (``name``) is distinct from an empty one
    (``name=``).
    """
    parts: list[str] = []
    for name in names:
        name = name.lower()
        value = _field(req_headers, name)
        parts.append(name if value is None else f"{name}={_normalise_value(name, value)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- invalidation


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """RFC 9110 section 4.3.1 origin (scheme, host, port), or None when unparsable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, parts.hostname.lower(), port


def invalidation_targets(method: str, status: int, request_url: str, resp_headers: Headers) -> list[str]:
    """Absolute URLs whose stored responses an unsafe request invalidates.  RFC 9111 section 4.4.

    "A cache MUST invalidate the target URI ... when it receives a non-error
    status code in response to an unsafe request method (including methods
    whose safety is unknown)"; "the URI(s) in the Location and
    Content-Location response header fields (if present) are candidates for
    invalidation", but "a cache MUST NOT trigger an invalidation under these
    conditions if the origin ... of the URI to be invalidated differs from that
    of the target URI".  Non-error means 2xx and 3xx; safe methods are GET,
    HEAD, OPTIONS and TRACE (RFC 9110 section 9.2.1, method names are case
    sensitive).  Fragments are dropped; duplicates are listed once.
    """
    if method in _SAFE_METHODS or not 200 <= status < 400:
        return []
    targets = [request_url]
    request_origin = _origin(request_url)
    for name in ("location", "content-location"):
        value = _field(resp_headers, name)
        if not value or request_origin is None:
            continue
        target = urldefrag(urljoin(request_url, value.strip()))[0]
        if _origin(target) == request_origin and target not in targets:
            targets.append(target)
    return targets


# --------------------------------------------------------------------------- response fields


def age_value(age: float) -> str:
    """The Age field value.  RFC 9111 section 5.1.

    ``Age = delta-seconds``: whole seconds, never negative; "If a cache
    receives a value larger than the largest positive integer it can
    represent, or if any of its age calculations overflows, it MUST transmit
    an Age header field with a value of 2147483648 (2^31)".
    """
    if age != age or age <= 0:                      # NaN or not positive
        return "0"
    if age >= DELTA_SECONDS_MAX:
        return str(DELTA_SECONDS_MAX)
    return str(int(age))


_SF_INTEGER_MAX = 999_999_999_999_999


def _sf_string(value: str) -> str:
    """An RFC 8941 section 4.1.6 sf-string; characters outside %x20-7E become "?"."""
    out = ['"']
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append("?")
    out.append('"')
    return "".join(out)


def _sf_token_or_string(value: str) -> str:
    return value if _SF_TOKEN.match(value) else _sf_string(value)


def _sf_integer(value: float) -> int:
    """RFC 8941 section 3.3.1: at most 15 digits; floored, clamped (inf included)."""
    if not math.isfinite(value):
        return _SF_INTEGER_MAX if value > 0 else -_SF_INTEGER_MAX
    return max(-_SF_INTEGER_MAX, min(_SF_INTEGER_MAX, math.floor(value)))


def x_cache(*, hit: bool, fwd: str | None = None, fwd_status: int | None = None,
            detail: str | None = None) -> str:
    """The X-Cache verdict (nginx's ``$upstream_cache_status`` words) of a response, from its
    RFC 9211 Cache-Status parameters: one mapping, so the two fields never disagree.

    A hit is HIT, or UPDATING while stale-while-revalidate refreshes, or STALE
    when served because the upstream failed (RFC 5861); a forward is BYPASS
    for methods that are not cached, REVALIDATED when a stale copy got a 304,
    EXPIRED when it was replaced, and MISS otherwise (also when it failed).
    """
    if hit:
        return _HIT_VERDICTS.get(detail or "", "HIT")
    if fwd == "bypass":
        return "BYPASS"
    if fwd == "stale":
        return "REVALIDATED" if fwd_status == 304 else "EXPIRED"
    return "MISS"


_HIT_VERDICTS = {"stale-while-revalidate": "UPDATING", "stale-if-error": "STALE", "disconnected": "STALE"}


def cache_status_entry(node: str, *, hit: bool, fwd: str | None = None, fwd_status: int | None = None,
                       stored: bool = False, ttl: float | None = None, detail: str | None = None,
                       collapsed: bool = False) -> str:
    """One member of the Cache-Status list for this node.  RFC 9211 section 2.

    ``Cache-Status = sf-list``; each member is the cache's name, "a String or
    Token", with parameters ``hit`` (2.1), ``fwd`` (2.2, a Token such as
    ``uri-miss``, ``stale``, ``bypass``), ``fwd-status`` (2.3, Integer),
    ``ttl`` (2.4, Integer seconds, negative when stale), ``stored`` (2.5),
    ``collapsed`` (2.6) and ``detail`` (2.8, "a String or a Token").  The
    node name is a Token when it is one, otherwise a String; ttl is floored
    to whole seconds.  A caller passing a `fwd` that is not a Token gets
    ValueError: the RFC fixes its values.
    """
    parts = [_sf_token_or_string(node)]
    if hit:
        parts.append("hit")
    if fwd is not None:
        if not _SF_TOKEN.match(fwd):
            raise ValueError(f"Cache-Status fwd must be a token, got {fwd!r}")
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={int(fwd_status)}")
    if ttl is not None and ttl == ttl:              # NaN has no ttl to report
        parts.append(f"ttl={_sf_integer(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail:
        parts.append(f"detail={_sf_token_or_string(detail)}")
    return "; ".join(parts)
