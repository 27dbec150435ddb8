"""Table-driven tests of edge.policy: every case names the RFC section it checks.

The clock is a parameter everywhere: NOW is fixed, and T0 (when the stored
response was requested and received) is 100 s before it, so a response whose
Date is T0 and that carries no Age is exactly 100 s old at NOW.
"""

from __future__ import annotations

from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from edge import policy
from edge.policy import (
    Action,
    Decision,
    age_value,
    cache_status_entry,
    client_not_modified,
    conditional_headers,
    current_age,
    decide,
    effective_cache_control,
    freshen,
    freshness_lifetime,
    invalidation_targets,
    parse_cache_control,
    parse_http_date,
    stale_if_error_allowed,
    storable,
    variant_key,
    vary_names,
 UNSATISFIABLE, requested_range)

NOW = 1_700_000_000.0
T0 = NOW - 100


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


D0 = http_date(T0)


def case(id_: str, *values):
    return pytest.param(*values, id=id_)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("value, expected", [
    case("9111-5.2-token-argument", "max-age=60", {"max-age": "60"}),
    case("9111-5.2-names-case-insensitive", "Max-Age=60, PUBLIC", {"max-age": "60", "public": None}),
    case("9111-5.2-quoted-string-with-comma", 'no-cache="Set-Cookie, X-Foo", max-age=5',
         {"no-cache": "Set-Cookie, X-Foo", "max-age": "5"}),
    case("9110-5.6.4-quoted-pair-unescaped", r'private="a\"b", public', {"private": 'a"b', "public": None}),
    case("9111-5.2.2.1-quoted-delta-accepted", 'max-age="5"', {"max-age": "5"}),
    case("9111-4.2.1-duplicate-first-wins", "max-age=60, MAX-AGE=10", {"max-age": "60"}),
    case("9111-5.2-garbage-ignored", ",, ;;; , =5, \u00e9=1, max-age=3", {"max-age": "3"}),
    case("9111-5.2-unterminated-quote-ignored", 'no-cache="oops', {}),
    case("9111-5.2-whitespace-tolerated", " s-maxage = 10\t,\tpublic ", {"s-maxage": "10", "public": None}),
    case("9111-5.2-empty-argument-kept-invalid", "max-age=", {"max-age": ""}),
    case("9111-5.2-absent", None, {}),
    case("9111-5.2-empty", "", {}),
])
def test_parse_cache_control(value, expected):
    assert parse_cache_control(value) == expected


def test_parse_cache_control_returns_a_fresh_dict_each_call():
    first = parse_cache_control("max-age=60")
    first["max-age"] = "0"
    assert parse_cache_control("max-age=60") == {"max-age": "60"}


@pytest.mark.parametrize("value, expected", [
    case("9110-5.6.7-imf-fixdate", "Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
    case("9110-5.6.7-rfc850-date", "Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),
    case("9110-5.6.7-asctime-date", "Sun Nov  6 08:49:37 1994", 784111777.0),
    case("9110-5.6.7-invalid-hour", "Sun, 06 Nov 1994 25:49:37 GMT", None),
    case("9110-5.6.7-zero-is-invalid", "0", None),
    case("9110-5.6.7-garbage", "yesterday", None),
    case("9110-5.6.7-list-is-not-a-date", "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-absent", None, None),
    case("9110-5.6.7-names-case-insensitive", "sun, 06 NOV 1994 08:49:37 GMT", 784111777.0),
    case("9110-5.6.7-rfc850-names-case-insensitive", "SUNDAY, 06-nov-94 08:49:37 GMT", 784111777.0),
    case("9110-5.6.7-surrounding-whitespace", "  Sun, 06 Nov 1994 08:49:37 GMT\t", 784111777.0),
    case("9110-5.6.7-leap-second", "Sat, 31 Dec 2016 23:59:60 GMT", 1483228800.0),
    case("9110-5.6.7-two-digit-year-in-imf", "Sun, 06 Nov 94 08:49:37 GMT", None),
    case("9110-5.6.7-utc-zone", "Sun, 06 Nov 1994 08:49:37 UTC", None),
    case("9110-5.6.7-aest-zone", "Sun, 06 Nov 1994 08:49:37 AEST", None),
    case("9110-5.6.7-numeric-zone", "Sun, 06 Nov 1994 08:49:37 +0000", None),
    case("9110-5.6.7-gmt-is-case-sensitive", "Sun, 06 Nov 1994 08:49:37 gmt", None),
    case("9110-5.6.7-dashes-in-imf", "Sun, 06-Nov-1994 08:49:37 GMT", None),
    case("9110-5.6.7-dots-in-time", "Sun, 06 Nov 1994 08.49.37 GMT", None),
    case("9110-5.6.7-one-digit-hour", "Sun, 06 Nov 1994 8:49:37 GMT", None),
    case("9110-5.6.7-one-digit-day-in-imf", "Sun, 6 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-missing-comma", "Sun 06 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-doubled-space", "Sun,  06 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-no-day-name", "06 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-long-day-name-in-imf", "Sunday, 06 Nov 1994 08:49:37 GMT", None),
    case("9110-5.6.7-four-digit-year-in-rfc850", "Sunday, 06-Nov-1994 08:49:37 GMT", None),
    case("9110-5.6.7-asctime-two-digit-day", "Sun Nov 16 08:49:37 1994", 784975777.0),
    case("9110-5.6.7-asctime-one-space", "Sun Nov 6 08:49:37 1994", None),
    case("9110-5.6.7-no-such-day", "Wed, 31 Feb 2021 08:49:37 GMT", None),
    case("9110-5.6.7-minute-60", "Sun, 06 Nov 1994 08:60:37 GMT", None),
    case("9110-5.6.7-year-zero", "Sun, 06 Nov 0000 08:49:37 GMT", None),
])
def test_parse_http_date(value, expected):
    assert parse_http_date(value) == expected


@pytest.mark.parametrize("value, now_year, year", [
    case("9110-5.6.7-rfc850-more-than-50-years-ahead-is-past", "Sunday, 06-Nov-94 08:49:37 GMT", 2026, 1994),
    case("9110-5.6.7-rfc850-near-future-is-this-century", "Wednesday, 06-Nov-30 08:49:37 GMT", 2026, 2030),
    case("9110-5.6.7-rfc850-exactly-50-years-ahead", "Friday, 06-Nov-76 08:49:37 GMT", 2026, 2076),
    case("9110-5.6.7-rfc850-51-years-ahead", "Monday, 06-Nov-77 08:49:37 GMT", 2026, 1977),
])
def test_rfc850_two_digit_years(value, now_year, year):
    import calendar
    now = calendar.timegm((now_year, 6, 1, 0, 0, 0))
    assert time_year(parse_http_date(value, now=now)) == year


def time_year(ts: float) -> int:
    import time
    return time.gmtime(ts).tm_year


@pytest.mark.parametrize("headers, expected", [
    case("9111-5.3-invalid-expires-means-expired", {"Date": D0, "Expires": "Sun, 06 Nov 2094 08:49:37 UTC"}, 0.0),
    case("9111-5.3-expires-two-digit-year-not-decades", {"Date": D0, "Expires": "Thu, 01 Jan 70 00:00:00 GMT"}, 0.0),
    case("9111-5.3-valid-expires", {"Date": D0, "Expires": http_date(T0 + 120)}, 120.0),
])
def test_invalid_expires_is_already_expired(headers, expected):
    assert policy.freshness_lifetime(headers) == expected


@pytest.mark.parametrize("headers, expected", [
    case("9213-2.2-without-cdn-cache-control-uses-cache-control",
         {"Cache-Control": "max-age=60"}, {"max-age": "60"}),
    case("9213-2.2-cdn-cache-control-replaces-cache-control",
         {"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"}, {"max-age": "600"}),
    case("9213-4-unregistered-directive-still-overrides",
         {"Cache-Control": "no-store", "CDN-Cache-Control": "none"}, {"none": None}),
    case("9213-2.1-invalid-structured-field-ignored",
         {"Cache-Control": "max-age=60", "CDN-Cache-Control": "Max-Age=600"}, {"max-age": "60"}),
    case("9213-2.1-trailing-comma-is-a-parse-error",
         {"Cache-Control": "max-age=60", "CDN-Cache-Control": "max-age=600,"}, {"max-age": "60"}),
    case("9213-2.1-empty-field-ignored",
         {"Cache-Control": "max-age=60", "CDN-Cache-Control": ""}, {"max-age": "60"}),
    case("9213-2.1-boolean-false-is-absent",
         {"CDN-Cache-Control": "no-store=?0, max-age=5"}, {"max-age": "5"}),
    case("9213-2.1-parameters-ignored",
         {"CDN-Cache-Control": "private;scope=x, max-age=5"}, {"private": None, "max-age": "5"}),
    case("9213-2.1-string-value", {"CDN-Cache-Control": 'no-cache="set-cookie"'}, {"no-cache": "set-cookie"}),
    case("9213-2.1-decimal-max-age-ignored", {"CDN-Cache-Control": "max-age=1.5, public"}, {"public": None}),
    case("8941-string-max-age-ignored", {"Cache-Control": "max-age=60", "CDN-Cache-Control": 'max-age="10000"'},
         {}),
    case("8941-token-max-age-ignored", {"CDN-Cache-Control": "max-age=ten, no-store"}, {"no-store": None}),
    case("8941-negative-max-age-ignored", {"CDN-Cache-Control": "max-age=-5, public"}, {"public": None}),
    case("8941-boolean-true-max-age-ignored", {"CDN-Cache-Control": "s-maxage, public"}, {"public": None}),
    case("8941-integer-swr-kept", {"CDN-Cache-Control": "max-age=5, stale-while-revalidate=30"},
         {"max-age": "5", "stale-while-revalidate": "30"}),
    case("9213-2.1-token-argument-kept", {"CDN-Cache-Control": "no-cache=set-cookie"}, {"no-cache": "set-cookie"}),
    case("9213-2.1-non-ascii-falls-back", {"Cache-Control": "max-age=60", "CDN-Cache-Control": "max-age=6\u00e9"},
         {"max-age": "60"}),
    case("8941-3.2-duplicate-key-last-wins", {"CDN-Cache-Control": "max-age=5, max-age=9"}, {"max-age": "9"}),
    case("9110-5.3-repeated-lines-combined",
         CIMultiDict([("CDN-Cache-Control", "max-age=5"), ("cdn-cache-control", "stale-if-error=10")]),
         {"max-age": "5", "stale-if-error": "10"}),
    case("9110-5.3-repeated-cache-control-lines-combined",
         CIMultiDict([("Cache-Control", "public"), ("Cache-Control", "max-age=7")]),
         {"public": None, "max-age": "7"}),
    case("9111-5.2-no-cache-control", {}, {}),
])
def test_effective_cache_control(headers, expected):
    assert effective_cache_control(headers) == expected


# --------------------------------------------------------------------------- storing

FRESH60 = {"Date": D0, "Cache-Control": "max-age=60"}


@pytest.mark.parametrize("method, status, req, resp, expected", [
    case("9111-3-explicit-max-age", "GET", 200, {}, FRESH60, (True, "explicit")),
    case("9111-3-head-not-stored", "HEAD", 200, {}, FRESH60, (False, "method")),
    case("9111-3-post-not-stored", "POST", 200, {}, FRESH60, (False, "method")),
    case("9111-3.3-partial-not-stored", "GET", 206, {}, FRESH60, (False, "partial")),
    case("9111-3-304-never-stored", "GET", 304, {}, FRESH60, (False, "status")),
    case("9111-3-interim-not-final", "GET", 100, {}, FRESH60, (False, "status")),
    case("9111-3-unknown-status-with-max-age", "GET", 599, {}, FRESH60, (True, "explicit")),
    case("9111-3-unknown-2xx-with-expires", "GET", 299, {}, {"Date": D0, "Expires": http_date(T0 + 60)},
         (True, "explicit")),
    case("9111-3-unknown-status-public", "GET", 418, {},
         {"Date": D0, "Cache-Control": "public", "Last-Modified": http_date(T0 - 1000)}, (True, "public")),
    case("9111-3-unknown-status-without-freshness", "GET", 299, {},
         {"Date": D0, "Last-Modified": http_date(T0 - 1000)}, (False, "no-freshness")),
    case("9111-5.2.2.3-must-understand-unknown-status", "GET", 599, {},
         {"Date": D0, "Cache-Control": "must-understand, max-age=60"}, (False, "status")),
    case("9111-5.2.2.3-must-understand-unknown-status-no-store", "GET", 599, {},
         {"Date": D0, "Cache-Control": "must-understand, no-store, max-age=60"}, (False, "status")),
    case("9111-3-407-credential-specific", "GET", 407, {}, {"Date": D0, "Cache-Control": "public, max-age=60"},
         (False, "status")),
    case("9111-3-401-credential-specific", "GET", 401, {}, {"Date": D0, "Cache-Control": "public, max-age=60"},
         (False, "status")),
    case("9111-5.2.1.5-request-no-store", "GET", 200, {"Cache-Control": "no-store"}, FRESH60, (False, "no-store")),
    case("9111-5.2.2.5-response-no-store", "GET", 200, {}, {"Cache-Control": "no-store, max-age=60"},
         (False, "no-store")),
    case("9111-5.2.2.3-must-understand-overrides-no-store", "GET", 200, {},
         {"Date": D0, "Cache-Control": "must-understand, no-store, max-age=60"}, (True, "explicit")),
    case("9213-2.2-cdn-no-store-wins", "GET", 200, {},
         {"Cache-Control": "max-age=60", "CDN-Cache-Control": "no-store"}, (False, "no-store")),
    case("9213-2.2-cdn-max-age-overrides-no-store", "GET", 200, {},
         {"Date": D0, "Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"}, (True, "explicit")),
    case("9111-5.2.2.7-private", "GET", 200, {}, {"Cache-Control": "private, max-age=60"}, (False, "private")),
    case("9111-5.2.2.7-qualified-private-is-storable", "GET", 200, {},
         {"Date": D0, "Cache-Control": 'private="Set-Cookie", max-age=60'}, (True, "explicit")),
    case("9111-5.2.2.7-qualified-private-covers-set-cookie", "GET", 200, {},
         {"Date": D0, "Cache-Control": 'private="Set-Cookie", max-age=60', "Set-Cookie": "id=1"}, (True, "explicit")),
    case("9111-5.2.2.4-qualified-no-cache-covers-set-cookie", "GET", 200, {},
         {"Date": D0, "Cache-Control": 'no-cache="set-cookie", max-age=60', "Set-Cookie": "id=1"},
         (True, "explicit")),
    case("9111-3-set-cookie-not-covered", "GET", 200, {},
         {"Date": D0, "Cache-Control": 'private="X-Other", max-age=60', "Set-Cookie": "id=1"}, (False, "set-cookie")),
    case("9213-2.2-cdn-private", "GET", 200, {},
         {"Cache-Control": "public, max-age=60", "CDN-Cache-Control": "private"}, (False, "private")),
    case("9111-3.5-authorization-needs-permission", "GET", 200, {"Authorization": "Basic eDp5"}, FRESH60,
         (False, "authorization")),
    case("9111-3.5-authorization-public", "GET", 200, {"Authorization": "Basic eDp5"},
         {"Date": D0, "Cache-Control": "public, max-age=60"}, (True, "explicit")),
    case("9111-3.5-authorization-must-revalidate", "GET", 200, {"authorization": "Bearer t"},
         {"Date": D0, "Cache-Control": "max-age=60, must-revalidate"}, (True, "explicit")),
    case("9111-3.5-authorization-s-maxage", "GET", 200, {"Authorization": "Bearer t"},
         {"Date": D0, "Cache-Control": "s-maxage=60"}, (True, "explicit")),
    case("9111-4.1-vary-star", "GET", 200, {}, {**FRESH60, "Vary": "*"}, (False, "vary-star")),
    case("9111-4.1-vary-star-in-list", "GET", 200, {}, {**FRESH60, "Vary": "Accept, *"}, (False, "vary-star")),
    case("9111-3-set-cookie-never-stored", "GET", 200, {}, {**FRESH60, "Set-Cookie": "session=1"},
         (False, "set-cookie")),
    case("9111-3-302-without-freshness", "GET", 302, {}, {"Date": D0, "ETag": '"a"'}, (False, "no-freshness")),
    case("9111-3-302-with-max-age", "GET", 302, {}, FRESH60, (True, "explicit")),
    case("9111-3-503-with-max-age", "GET", 503, {}, FRESH60, (True, "explicit")),
    case("9111-3-public-makes-302-storable", "GET", 302, {}, {"Date": D0, "Cache-Control": "public", "ETag": '"a"'},
         (True, "public")),
    case("9110-15.1-heuristic-200-with-etag", "GET", 200, {}, {"Date": D0, "ETag": '"a"'}, (True, "heuristic")),
    case("9110-15.1-heuristic-404-last-modified", "GET", 404, {},
         {"Date": D0, "Last-Modified": http_date(T0 - 1000)}, (True, "heuristic")),
    case("9111-3-no-validator-no-lifetime-not-stored", "GET", 200, {}, {"Date": D0}, (False, "zero-ttl")),
    case("9111-3-max-age-0-without-validator", "GET", 200, {}, {"Date": D0, "Cache-Control": "max-age=0"},
         (False, "zero-ttl")),
    case("5861-3-max-age-0-with-swr-is-reusable", "GET", 200, {},
         {"Date": D0, "Cache-Control": "max-age=0, stale-while-revalidate=30"}, (True, "explicit")),
    case("5861-4-max-age-0-with-sie-is-reusable", "GET", 200, {},
         {"Date": D0, "Cache-Control": "max-age=0, stale-if-error=30"}, (True, "explicit")),
    case("9111-4.2.4-must-revalidate-disables-swr", "GET", 200, {},
         {"Date": D0, "Cache-Control": "max-age=0, must-revalidate, stale-while-revalidate=30"},
         (False, "zero-ttl")),
    case("9111-5.2.2.4-no-cache-without-validator", "GET", 200, {},
         {"Date": D0, "Cache-Control": "no-cache, max-age=60"}, (False, "zero-ttl")),
    case("9111-5.2.2.4-no-cache-with-validator", "GET", 200, {},
         {"Date": D0, "Cache-Control": "no-cache, max-age=60", "ETag": '"a"'}, (True, "explicit")),
    case("9111-5.3-expires-future", "GET", 200, {}, {"Date": D0, "Expires": http_date(T0 + 60)},
         (True, "explicit")),
    case("9111-5.3-expires-invalid-without-validator", "GET", 200, {}, {"Date": D0, "Expires": "0"},
         (False, "zero-ttl")),
    case("9213-2.2-expires-ignored-under-cdn-cache-control", "GET", 302, {},
         {"Date": D0, "Expires": http_date(T0 + 60), "CDN-Cache-Control": "must-revalidate"},
         (False, "no-freshness")),
    case("9110-5.3-multidict-request", "GET", 200, CIMultiDict([("Cache-Control", "max-age=0"),
                                                                ("Cache-Control", "no-store")]),
         FRESH60, (False, "no-store")),
])
def test_storable(method, status, req, resp, expected):
    assert storable(method, status, req, resp) == expected


def test_storable_with_set_cookie_stripped_by_site_policy():
    headers = {"Date": D0, "Cache-Control": "max-age=60", "Set-Cookie": "id=1"}
    assert storable("GET", 200, {}, headers) == (False, "set-cookie")
    assert storable("GET", 200, {}, headers, strip_set_cookie=True) == (True, "explicit")


# --------------------------------------------------------------------------- freshness and age


@pytest.mark.parametrize("headers, kwargs, expected", [
    case("9111-4.2.1-s-maxage-beats-max-age", {"Date": D0, "Cache-Control": "max-age=60, s-maxage=10"}, {}, 10.0),
    case("9111-4.2.1-max-age-beats-expires",
         {"Date": D0, "Cache-Control": "max-age=60", "Expires": http_date(T0 - 10)}, {}, 60.0),
    case("9111-4.2.1-expires-minus-date", {"Date": D0, "Expires": http_date(T0 + 100)}, {}, 100.0),
    case("9111-5.3-invalid-expires-is-expired", {"Date": D0, "Expires": "0"}, {}, 0.0),
    case("9111-5.3-expires-before-date", {"Date": D0, "Expires": http_date(T0 - 100)}, {}, 0.0),
    case("9111-4.2.1-invalid-max-age-is-stale",
         {"Date": D0, "Cache-Control": "max-age=soon", "Expires": http_date(T0 + 100)}, {}, 0.0),
    case("9111-4.2.1-invalid-s-maxage-is-stale", {"Date": D0, "Cache-Control": "s-maxage=-1, max-age=60"}, {}, 0.0),
    case("9111-1.2.2-delta-seconds-overflow", {"Cache-Control": "max-age=99999999999999"}, {}, 2.0**31),
    case("9111-4.2.2-heuristic-ten-percent", {"Date": D0, "Last-Modified": http_date(T0 - 1000)}, {}, 100.0),
    case("9111-4.2.2-heuristic-capped-at-a-day",
         {"Date": D0, "Last-Modified": http_date(T0 - 30 * 86400)}, {}, 86400.0),
    case("9111-4.2.2-last-modified-after-date", {"Date": D0, "Last-Modified": http_date(T0 + 10)}, {}, 0.0),
    case("9111-4.2.2-no-heuristic-for-302", {"Date": D0, "Last-Modified": http_date(T0 - 1000)},
         {"status": 302}, 0.0),
    case("9111-4.2.2-public-allows-heuristic",
         {"Date": D0, "Cache-Control": "public", "Last-Modified": http_date(T0 - 1000)}, {"status": 302}, 100.0),
    case("9111-4.2.2-heuristic-for-404", {"Date": D0, "Last-Modified": http_date(T0 - 500)}, {"status": 404}, 50.0),
    case("9213-2.2-cdn-max-age-beats-cache-control",
         {"Date": D0, "Cache-Control": "max-age=60", "CDN-Cache-Control": "max-age=600"}, {}, 600.0),
    case("9213-2.2-expires-ignored-heuristic-used",
         {"Date": D0, "CDN-Cache-Control": "public", "Expires": http_date(T0 + 5000),
          "Last-Modified": http_date(T0 - 1000)}, {}, 100.0),
    case("9110-6.6.1-missing-date-uses-response-time", {"Expires": http_date(T0 + 30)},
         {"response_time": T0}, 30.0),
    case("9111-4.2.1-missing-date-without-response-time", {"Expires": http_date(T0 + 30)}, {}, 0.0),
    case("9111-4.2.1-no-freshness-information", {"Date": D0}, {}, 0.0),
])
def test_freshness_lifetime(headers, kwargs, expected):
    assert freshness_lifetime(headers, **kwargs) == expected


@pytest.mark.parametrize("headers, request_time, response_time, now, expected", [
    case("9111-4.2.3-resident-time", {"Date": D0}, T0, T0, NOW, 100.0),
    case("9111-4.2.3-upstream-age-increases-age", {"Date": D0, "Age": "40"}, T0, T0, NOW, 140.0),
    case("9111-4.2.3-response-delay-added-to-age", {"Date": D0, "Age": "40"}, T0 - 3, T0, NOW, 143.0),
    case("9111-4.2.3-response-delay-without-age", {"Date": D0}, T0 - 3, T0, NOW, 103.0),
    case("9111-4.2.3-apparent-age-wins", {"Date": http_date(T0 - 50), "Age": "10"}, T0 - 1, T0, NOW, 150.0),
    case("9111-4.2.3-date-in-future-clamped", {"Date": http_date(T0 + 500)}, T0, T0, NOW, 100.0),
    case("9111-5.1-negative-age-ignored", {"Date": D0, "Age": "-5"}, T0, T0, NOW, 100.0),
    case("9111-5.1-non-numeric-age-ignored", {"Date": D0, "Age": "1.5"}, T0, T0, NOW, 100.0),
    case("9111-5.1-age-list-first-member", {"Date": D0, "Age": "30, 60"}, T0, T0, NOW, 130.0),
    case("9110-6.6.1-missing-date-is-response-time", {}, T0, T0, NOW, 100.0),
    case("9110-6.6.1-invalid-date-is-response-time", {"Date": "tomorrow"}, T0, T0, NOW, 100.0),
    case("9111-4.2.3-just-received", {"Date": D0}, T0, T0, T0, 0.0),
])
def test_current_age(headers, request_time, response_time, now, expected):
    assert current_age(headers, request_time, response_time, now) == pytest.approx(expected)


ETAG = {"ETag": '"v1"'}


@pytest.mark.parametrize("headers, request_time, expected", [
    case("9111-4.2-fresh", {"Date": D0, "Cache-Control": "max-age=200"}, T0,
         Decision(Action.FRESH, 100.0, 100.0, "fresh")),
    case("9111-4.2-age-equal-to-lifetime-is-stale", {"Date": D0, "Cache-Control": "max-age=100", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, 0.0, "stale")),
    case("9111-4.3.1-stale-without-validator-fetches", {"Date": D0, "Cache-Control": "max-age=50"}, T0,
         Decision(Action.FETCH, 100.0, -50.0, "stale")),
    case("9111-4.3.1-last-modified-is-a-validator",
         {"Date": D0, "Cache-Control": "max-age=50", "Last-Modified": http_date(T0 - 10)}, T0,
         Decision(Action.REVALIDATE, 100.0, -50.0, "stale")),
    case("9111-5.2.2.4-no-cache-revalidates-even-fresh",
         {"Date": D0, "Cache-Control": "no-cache, max-age=1000", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, 900.0, "no-cache")),
    case("9111-5.2.2.4-qualified-no-cache-is-fresh",
         {"Date": D0, "Cache-Control": 'no-cache="Set-Cookie", max-age=1000', **ETAG}, T0,
         Decision(Action.FRESH, 100.0, 900.0, "fresh")),
    case("9111-5.2.2.4-no-cache-without-validator-fetches",
         {"Date": D0, "Cache-Control": "no-cache, max-age=1000"}, T0,
         Decision(Action.FETCH, 100.0, 900.0, "no-cache")),
    case("9111-5.2.2.2-must-revalidate-beats-swr",
         {"Date": D0, "Cache-Control": "max-age=50, must-revalidate, stale-while-revalidate=1000", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -50.0, "must-revalidate")),
    case("9111-5.2.2.8-proxy-revalidate-beats-swr",
         {"Date": D0, "Cache-Control": "max-age=50, proxy-revalidate, stale-while-revalidate=1000", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -50.0, "proxy-revalidate")),
    case("9111-5.2.2.10-s-maxage-implies-proxy-revalidate",
         {"Date": D0, "Cache-Control": "s-maxage=50, stale-while-revalidate=1000", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -50.0, "s-maxage")),
    case("9111-5.2.2.2-must-revalidate-fresh-is-served",
         {"Date": D0, "Cache-Control": "max-age=150, must-revalidate", **ETAG}, T0,
         Decision(Action.FRESH, 100.0, 50.0, "fresh")),
    case("5861-3-swr-at-window-edge", {"Date": D0, "Cache-Control": "max-age=70, stale-while-revalidate=30"}, T0,
         Decision(Action.STALE_WHILE_REVALIDATE, 100.0, -30.0, "swr")),
    case("5861-3-swr-one-second-past-window",
         {"Date": D0, "Cache-Control": "max-age=69, stale-while-revalidate=30", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -31.0, "stale")),
    case("5861-3-swr-invalid-value-no-window",
         {"Date": D0, "Cache-Control": "max-age=70, stale-while-revalidate=soon", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -30.0, "stale")),
    case("9111-4.2.3-upstream-age-makes-stale", {"Date": D0, "Age": "50", "Cache-Control": "max-age=120", **ETAG},
         T0, Decision(Action.REVALIDATE, 150.0, -30.0, "stale")),
    case("9111-4.2.3-response-delay-makes-stale", {"Date": D0, "Cache-Control": "max-age=105"}, T0 - 10,
         Decision(Action.FETCH, 110.0, -5.0, "stale")),
    case("9213-2.2-cdn-cache-control-beats-cache-control",
         {"Date": D0, "Cache-Control": "max-age=10", "CDN-Cache-Control": "max-age=600"}, T0,
         Decision(Action.FRESH, 100.0, 500.0, "fresh")),
    case("9213-2.2-cdn-cache-control-no-cache",
         {"Date": D0, "Cache-Control": "max-age=600", "CDN-Cache-Control": "no-cache", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -100.0, "no-cache")),
    case("9111-4.2.2-heuristic-fresh", {"Date": D0, "Last-Modified": http_date(T0 - 10000)}, T0,
         Decision(Action.FRESH, 100.0, 900.0, "fresh")),
    case("9111-4.2.2-heuristic-stale", {"Date": D0, "Last-Modified": http_date(T0 - 500)}, T0,
         Decision(Action.REVALIDATE, 100.0, -50.0, "stale")),
    case("9110-6.6.1-missing-date-uses-response-time", {"Cache-Control": "max-age=150"}, T0,
         Decision(Action.FRESH, 100.0, 50.0, "fresh")),
    case("9111-5.3-invalid-expires-is-stale", {"Date": D0, "Expires": "0", **ETAG}, T0,
         Decision(Action.REVALIDATE, 100.0, -100.0, "stale")),
    case("9111-4.2.1-expires-minus-date", {"Date": D0, "Expires": http_date(T0 + 300)}, T0,
         Decision(Action.FRESH, 100.0, 200.0, "fresh")),
    case("9110-5.3-multidict-stored-headers",
         CIMultiDict([("Date", D0), ("Cache-Control", "public"), ("cache-control", "max-age=300")]), T0,
         Decision(Action.FRESH, 100.0, 200.0, "fresh")),
])
def test_decide(headers, request_time, expected):
    assert decide(headers, request_time, T0, NOW) == expected


@pytest.mark.parametrize("headers, expected", [
    case("5861-4-at-window-edge", {"Date": D0, "Cache-Control": "max-age=40, stale-if-error=60"}, True),
    case("5861-4-one-second-past-window", {"Date": D0, "Cache-Control": "max-age=39, stale-if-error=60"}, False),
    case("5861-4-fresh-response", {"Date": D0, "Cache-Control": "max-age=200, stale-if-error=60"}, True),
    case("5861-4-no-directive", {"Date": D0, "Cache-Control": "max-age=40"}, False),
    case("5861-4-invalid-value", {"Date": D0, "Cache-Control": "max-age=40, stale-if-error=1h"}, False),
    case("9111-4.2.4-must-revalidate-forbids",
         {"Date": D0, "Cache-Control": "max-age=40, stale-if-error=600, must-revalidate"}, False),
    case("9111-4.2.4-proxy-revalidate-forbids",
         {"Date": D0, "Cache-Control": "max-age=40, stale-if-error=600, proxy-revalidate"}, False),
    case("9111-5.2.2.10-s-maxage-forbids", {"Date": D0, "Cache-Control": "s-maxage=40, stale-if-error=600"}, False),
    case("9111-4.2.4-no-cache-forbids", {"Date": D0, "Cache-Control": "no-cache, stale-if-error=600"}, False),
    case("9213-2.2-cdn-cache-control-without-sie",
         {"Date": D0, "Cache-Control": "max-age=40, stale-if-error=600", "CDN-Cache-Control": "max-age=40"}, False),
    case("9213-2.2-cdn-cache-control-with-sie",
         {"Date": D0, "Cache-Control": "max-age=40", "CDN-Cache-Control": "max-age=40, stale-if-error=600"}, True),
    case("5861-4-upstream-age-counts", {"Date": D0, "Age": "30", "Cache-Control": "max-age=40, stale-if-error=60"},
         False),
])
def test_stale_if_error_allowed(headers, expected):
    assert stale_if_error_allowed(headers, T0, T0, NOW) is expected


@pytest.mark.parametrize("headers, max_staleness, expected", [
    # At NOW the response is 100 s old; fresh for 40 s, so stale by 60 s.
    case("9111-4.2.4-disconnected-within-bound", {"Date": D0, "Cache-Control": "max-age=40"}, 60, True),
    case("9111-4.2.4-disconnected-past-bound", {"Date": D0, "Cache-Control": "max-age=40"}, 59, False),
    case("9111-4.2.4-disconnected-no-directive-needed", {"Date": D0, "Expires": http_date(T0 + 40)}, 86400, True),
    case("9111-4.2.4-disconnected-must-revalidate", {"Date": D0, "Cache-Control": "max-age=40, must-revalidate"},
         86400, False),
    case("9111-4.2.4-disconnected-proxy-revalidate", {"Date": D0, "Cache-Control": "max-age=40, proxy-revalidate"},
         86400, False),
    case("9111-5.2.2.10-disconnected-s-maxage", {"Date": D0, "Cache-Control": "s-maxage=40"}, 86400, False),
    case("9111-5.2.2.4-disconnected-no-cache", {"Date": D0, "Cache-Control": "no-cache"}, 86400, False),
    case("9111-4.2.4-disconnected-bound-zero-disables", {"Date": D0, "Cache-Control": "max-age=40"}, 0, False),
])
def test_stale_when_disconnected(headers, max_staleness, expected):
    assert policy.stale_when_disconnected(headers, T0, T0, NOW, max_staleness) is expected


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("headers, expected", [
    case("9111-4.3.1-etag-and-last-modified", {"ETag": '"a"', "Last-Modified": http_date(T0)},
         {"If-None-Match": '"a"', "If-Modified-Since": http_date(T0)}),
    case("9111-4.3.1-weak-etag-sent-as-is", {"ETag": 'W/"a"'}, {"If-None-Match": 'W/"a"'}),
    case("9111-4.3.1-last-modified-only", {"last-modified": http_date(T0)}, {"If-Modified-Since": http_date(T0)}),
    case("9111-4.3.1-invalid-last-modified-not-sent", {"Last-Modified": "yesterday"}, {}),
    case("9111-4.3.1-no-validators", {"Date": D0}, {}),
])
def test_conditional_headers(headers, expected):
    assert conditional_headers(headers) == expected


D_NEW = http_date(NOW)
STORED = [
    ("Content-Type", "text/html"),
    ("ETag", '"a"'),
    ("Cache-Control", "max-age=60"),
    ("X-A", "1"),
    ("Set-By", "origin"),
    ("X-A", "2"),
    ("Date", D0),
    ("Age", "30"),
    ("Content-Length", "5"),
]


@pytest.mark.parametrize("stored, not_modified, expected", [
    case("9111-3.2-replace-keep-and-append", STORED,
         [("Date", D_NEW), ("Cache-Control", "max-age=120"), ("ETag", '"a"'), ("Content-Length", "0"),
          ("Connection", "X-Hop"), ("X-Hop", "1"), ("Transfer-Encoding", "chunked"), ("X-New", "n"),
          ("Content-Range", "bytes 0-0/5"), ("Proxy-Authenticate", "Basic")],
         [("Content-Type", "text/html"), ("ETag", '"a"'), ("Cache-Control", "max-age=120"), ("X-A", "1"),
          ("Set-By", "origin"), ("X-A", "2"), ("Date", D_NEW), ("Content-Length", "5"), ("X-New", "n")]),
    case("9111-4.3.4-freshen-keeps-non-updated-fields", STORED, [("Date", D_NEW), ("Age", "3")],
         [("Content-Type", "text/html"), ("ETag", '"a"'), ("Cache-Control", "max-age=60"), ("X-A", "1"),
          ("Set-By", "origin"), ("X-A", "2"), ("Date", D_NEW), ("Age", "3"), ("Content-Length", "5")]),
    case("9111-4.2.3-old-date-and-age-dropped", STORED, [("Cache-Control", "max-age=10")],
         [("Content-Type", "text/html"), ("ETag", '"a"'), ("Cache-Control", "max-age=10"), ("X-A", "1"),
          ("Set-By", "origin"), ("X-A", "2"), ("Content-Length", "5")]),
    case("9111-3.2-repeated-field-replaced-as-a-whole", STORED, [("x-a", "3"), ("x-a", "4"), ("Date", D_NEW)],
         [("Content-Type", "text/html"), ("ETag", '"a"'), ("Cache-Control", "max-age=60"), ("x-a", "3"),
          ("x-a", "4"), ("Set-By", "origin"), ("Date", D_NEW), ("Content-Length", "5")]),
    case("9111-3.2-multidict-inputs", CIMultiDict(STORED), CIMultiDict([("ETag", '"b"'), ("Date", D_NEW)]),
         [("Content-Type", "text/html"), ("ETag", '"b"'), ("Cache-Control", "max-age=60"), ("X-A", "1"),
          ("Set-By", "origin"), ("X-A", "2"), ("Date", D_NEW), ("Content-Length", "5")]),
])
def test_freshen(stored, not_modified, expected):
    assert [tuple(pair) for pair in freshen(stored, not_modified)] == expected


def test_freshen_result_feeds_decide():
    """9111-4.3.4: after a 304 at NOW with max-age=120, the response is fresh again."""
    updated = freshen(STORED, [("Date", D_NEW), ("Cache-Control", "max-age=120")])
    assert decide(updated, NOW, NOW, NOW + 20) == Decision(Action.FRESH, 20.0, 100.0, "fresh")


# --------------------------------------------------------------------------- client conditionals

LM = http_date(T0 - 1000)
STORED_V = {"ETag": '"a"', "Last-Modified": LM, "Date": D0}


@pytest.mark.parametrize("method, req, resp, status, expected", [
    case("9110-13.1.2-strong-match", "GET", {"If-None-Match": '"a"'}, STORED_V, 200, True),
    case("9110-13.1.2-weak-request-matches-strong", "GET", {"If-None-Match": 'W/"a"'}, STORED_V, 200, True),
    case("9110-13.1.2-strong-request-matches-weak", "GET", {"If-None-Match": '"a"'},
         {"ETag": 'W/"a"'}, 200, True),
    case("9110-13.1.2-list-member-matches", "GET", {"If-None-Match": '"x", W/"a"'}, STORED_V, 200, True),
    case("9110-13.1.2-list-without-match", "GET", {"If-None-Match": '"x", "y"'}, STORED_V, 200, False),
    case("9110-13.1.2-tag-is-case-sensitive", "GET", {"If-None-Match": '"A"'}, STORED_V, 200, False),
    case("9110-13.1.2-comma-inside-tag", "GET", {"If-None-Match": '"x", "a,b"'}, {"ETag": '"a,b"'}, 200, True),
    case("9110-8.8.3-backslash-is-plain-etagc", "GET", {"If-None-Match": '"x\\", "a"'}, {"ETag": '"a"'}, 200, True),
    case("9110-13.1.2-star-matches-stored", "GET", {"If-None-Match": "*"}, STORED_V, 200, True),
    case("9110-13.1.2-star-matches-without-validators", "GET", {"If-None-Match": "*"}, {"Date": D0}, 200, True),
    case("9110-13.1.2-no-stored-etag-never-matches", "GET", {"If-None-Match": '"a"', "If-Modified-Since": D0},
         {"Last-Modified": LM}, 200, False),
    case("9110-13.2.2-if-none-match-takes-precedence", "GET",
         {"If-None-Match": '"other"', "If-Modified-Since": D0}, STORED_V, 200, False),
    case("9110-13.1.3-modified-since-later", "GET", {"If-Modified-Since": D0}, STORED_V, 200, True),
    case("9110-13.1.3-modified-since-equal", "GET", {"If-Modified-Since": LM}, STORED_V, 200, True),
    case("9110-13.1.3-modified-after-since", "GET", {"If-Modified-Since": http_date(T0 - 1001)}, STORED_V, 200,
         False),
    case("9110-13.1.3-invalid-date-ignored", "GET", {"If-Modified-Since": "yesterday"}, STORED_V, 200, False),
    case("9110-13.1.3-list-value-ignored", "GET",
         CIMultiDict([("If-Modified-Since", D0), ("If-Modified-Since", D0)]), STORED_V, 200, False),
    case("9111-4.3.2-no-last-modified-uses-date", "GET", {"If-Modified-Since": D0}, {"Date": D0}, 200, True),
    case("9111-4.3.2-no-last-modified-date-later", "GET", {"If-Modified-Since": http_date(T0 - 1)}, {"Date": D0},
         200, False),
    case("9111-4.3.2-invalid-last-modified-uses-date", "GET", {"If-Modified-Since": D0},
         {"Date": D0, "Last-Modified": "last tuesday"}, 200, True),
    case("9111-4.3.2-neither-never-matches", "GET", {"If-Modified-Since": D0}, {}, 200, False),
    case("9110-13.1.3-head", "HEAD", {"If-Modified-Since": D0}, STORED_V, 200, True),
    case("9110-13.1.3-post-ignored", "POST", {"If-None-Match": '"a"'}, STORED_V, 200, False),
    case("9110-13.2.1-non-2xx-ignores-preconditions", "GET", {"If-None-Match": '"a"'}, STORED_V, 404, False),
    case("9110-13.2.2-unconditional", "GET", {}, STORED_V, 200, False),
])
def test_client_not_modified(method, req, resp, status, expected):
    assert client_not_modified(method, req, resp, status=status) is expected


# --------------------------------------------------------------------------- Vary


@pytest.mark.parametrize("headers, expected", [
    case("9111-4.1-no-vary", {}, ()),
    case("9111-4.1-one-field", {"Vary": "Accept-Encoding"}, ("accept-encoding",)),
    case("9111-4.1-lower-sorted-deduplicated", {"Vary": "User-Agent, accept-encoding , Accept-Encoding"},
         ("accept-encoding", "user-agent")),
    case("9111-4.1-repeated-lines", CIMultiDict([("Vary", "Origin"), ("vary", "Accept")]), ("accept", "origin")),
    case("9111-4.1-empty-members", {"Vary": " , ,"}, ()),
    case("9111-4.1-star", {"Vary": "*"}, None),
    case("9111-4.1-star-in-list", {"Vary": "Accept, *"}, None),
])
def test_vary_names(headers, expected):
    assert vary_names(headers) == expected


AE = ("accept-encoding",)


@pytest.mark.parametrize("names, first, second, same", [
    case("9111-4.1-same-values", AE, {"Accept-Encoding": "gzip, br"}, {"accept-encoding": "gzip, br"}, True),
    case("9111-4.1-whitespace-removed", AE, {"Accept-Encoding": "gzip,br;q=0.5"},
         {"Accept-Encoding": " gzip ,  br ; q=0.5 "}, True),
    case("9111-4.1-case-insensitive-accept-encoding", AE, {"Accept-Encoding": "GZIP, Br"},
         {"Accept-Encoding": "gzip, br"}, True),
    case("9111-4.1-repeated-lines-combined", AE, CIMultiDict([("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")]),
         {"Accept-Encoding": "gzip, br"}, True),
    case("9111-4.1-unordered-list-sorted", AE, {"Accept-Encoding": "gzip, br"}, {"Accept-Encoding": "br,gzip"}, True),
    case("9111-4.1-accept-language-order-without-q", ("accept-language",), {"Accept-Language": "en, fr"},
         {"Accept-Language": "FR , en"}, True),
    case("9111-4.1-with-q-values-order-kept", ("accept-language",), {"Accept-Language": "en;q=0.5, fr"},
         {"Accept-Language": "fr, en;q=0.5"}, False),
    case("9111-4.1-user-agent-order-matters", ("user-agent",), {"User-Agent": "a, b"}, {"User-Agent": "b, a"},
         False),
    case("9111-4.1-absent-differs-from-empty", AE, {}, {"Accept-Encoding": ""}, False),
    case("9111-4.1-different-values", AE, {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "br"}, False),
    case("9111-4.1-case-sensitive-field", ("user-agent",), {"User-Agent": "Curl"}, {"User-Agent": "curl"}, False),
    case("9111-4.1-whitespace-runs-collapsed", ("user-agent",), {"User-Agent": "a  b"}, {"User-Agent": "a b"}, True),
    case("9111-4.1-quoted-whitespace-kept", ("x-q",), {"X-Q": 'a="x  y"'}, {"X-Q": 'a="x y"'}, False),
    case("9111-4.1-unlisted-fields-ignored", AE, {"Accept-Encoding": "gzip", "User-Agent": "a"},
         {"Accept-Encoding": "gzip", "User-Agent": "b"}, True),
    case("9111-4.1-two-fields-one-differs", ("accept-encoding", "origin"),
         {"Accept-Encoding": "gzip", "Origin": "https://a.example"},
         {"Accept-Encoding": "gzip", "Origin": "https://b.example"}, False),
    case("9111-4.1-no-vary-everything-matches", (), {"Accept-Encoding": "gzip"}, {}, True),
])
def test_variant_key(names, first, second, same):
    key = variant_key(names, first)
    assert isinstance(key, str)
    assert key == variant_key(names, first)
    assert (key == variant_key(names, second)) is same


def test_variant_key_name_case_does_not_matter():
    request = {"Accept-Encoding": "gzip"}
    assert variant_key(("Accept-Encoding",), request) == variant_key(("accept-encoding",), request)


# --------------------------------------------------------------------------- invalidation

URL = "http://www.example.com/items"


@pytest.mark.parametrize("method, status, headers, expected", [
    case("9111-4.4-post-invalidates-target", "POST", 200, {}, [URL]),
    case("9111-4.4-relative-location", "POST", 201, {"Location": "/items/1"},
         [URL, "http://www.example.com/items/1"]),
    case("9111-4.4-content-location-default-port", "PUT", 204, {"Content-Location": "http://WWW.example.com:80/x"},
         [URL, "http://WWW.example.com:80/x"]),
    case("9111-4.4-location-and-content-location", "DELETE", 200,
         {"Location": "/a", "Content-Location": "b"},
         [URL, "http://www.example.com/a", "http://www.example.com/b"]),
    case("9111-4.4-other-host-not-invalidated", "POST", 303, {"Location": "http://evil.example/items"}, [URL]),
    case("9111-4.4-other-scheme-not-invalidated", "POST", 303, {"Location": "https://www.example.com/items/1"},
         [URL]),
    case("9111-4.4-other-port-not-invalidated", "POST", 303, {"Location": "http://www.example.com:8080/a"}, [URL]),
    case("9111-4.4-fragment-dropped", "POST", 302, {"Location": "/a#top"}, [URL, "http://www.example.com/a"]),
    case("9111-4.4-duplicate-listed-once", "PUT", 200, {"Content-Location": URL}, [URL]),
    case("9111-4.4-invalid-port-ignored", "POST", 302, {"Location": "http://www.example.com:99999/a"}, [URL]),
    case("9111-4.4-error-status-no-invalidation", "POST", 500, {"Location": "/a"}, []),
    case("9111-4.4-client-error-no-invalidation", "DELETE", 404, {}, []),
    case("9111-4.4-informational-no-invalidation", "POST", 100, {}, []),
    case("9110-9.2.1-get-safe", "GET", 200, {"Location": "/a"}, []),
    case("9110-9.2.1-head-safe", "HEAD", 200, {}, []),
    case("9110-9.2.1-options-safe", "OPTIONS", 200, {}, []),
    case("9110-9.2.1-trace-safe", "TRACE", 200, {}, []),
    case("9111-4.4-unknown-method-is-unsafe", "PURGE", 200, {}, [URL]),
    case("9110-9.1-method-is-case-sensitive", "get", 200, {}, [URL]),
])
def test_invalidation_targets(method, status, headers, expected):
    assert invalidation_targets(method, status, URL, headers) == expected


# --------------------------------------------------------------------------- response fields


@pytest.mark.parametrize("age, expected", [
    case("9111-5.1-zero", 0.0, "0"),
    case("9111-5.1-whole-seconds", 41.9, "41"),
    case("9111-5.1-never-negative", -5.0, "0"),
    case("9111-5.1-just-below-cap", 2147483647.5, "2147483647"),
    case("9111-5.1-overflow-capped", 2.0**31 + 10, "2147483648"),
    case("9111-5.1-infinity-capped", float("inf"), "2147483648"),
    case("9111-5.1-nan-is-zero", float("nan"), "0"),
])
def test_age_value(age, expected):
    assert age_value(age) == expected


@pytest.mark.parametrize("node, kwargs, expected", [
    case("9211-2.1-hit-with-ttl", "l1-east", {"hit": True, "ttl": 42}, "l1-east; hit; ttl=42"),
    case("9211-2.2-miss-stored", "l1-east", {"hit": False, "fwd": "uri-miss", "fwd_status": 200, "stored": True},
         "l1-east; fwd=uri-miss; fwd-status=200; stored"),
    case("9211-2.2-stale-revalidated", "l1-east", {"hit": False, "fwd": "stale", "fwd_status": 304, "ttl": 60.0},
         "l1-east; fwd=stale; fwd-status=304; ttl=60"),
    case("9211-2.4-ttl-floored", "l2-a", {"hit": True, "ttl": 41.9}, "l2-a; hit; ttl=41"),
    case("9211-2.4-negative-ttl-floored", "l2-a", {"hit": True, "ttl": -0.5}, "l2-a; hit; ttl=-1"),
    case("8941-3.3.1-ttl-clamped", "l2-a", {"hit": True, "ttl": float("inf")}, "l2-a; hit; ttl=999999999999999"),
    case("9211-2.6-collapsed", "l1-west", {"hit": False, "fwd": "miss", "collapsed": True},
         "l1-west; fwd=miss; collapsed"),
    case("9211-2.8-detail-token", "l1-west", {"hit": False, "fwd": "bypass", "detail": "no-store"},
         "l1-west; fwd=bypass; detail=no-store"),
    case("9211-2.8-detail-string", "l1-west", {"hit": False, "detail": "upstream timeout"},
         'l1-west; detail="upstream timeout"'),
    case("9211-2-node-not-a-token-is-a-string", "1node", {"hit": True}, '"1node"; hit'),
    case("8941-4.1.6-string-escapes", 'my "cache"\\x', {"hit": True}, '"my \\"cache\\"\\\\x"; hit'),
    case("8941-4.1.6-non-ascii-replaced", "n\u00f6de 1", {"hit": False}, '"n?de 1"'),
    case("9211-2-bare-entry", "l1-east", {"hit": False}, "l1-east"),
])
def test_cache_status_entry(node, kwargs, expected):
    assert cache_status_entry(node, **kwargs) == expected


def test_cache_status_entry_rejects_non_token_fwd():
    with pytest.raises(ValueError):
        cache_status_entry("l1-east", hit=False, fwd="uri miss")


FRESH, SWR = policy.Action.FRESH, policy.Action.STALE_WHILE_REVALIDATE
REVALIDATE, FETCH = policy.Action.REVALIDATE, policy.Action.FETCH


@pytest.mark.parametrize(
    ("headers", "timeline"),
    [
        # (seconds after the response arrived at T0, expected action, expected current age)
        ({"Date": D0, "Cache-Control": "max-age=60"}, [(30, FRESH, 31), (59, FETCH, 60), (3600, FETCH, 3601)]),
        ({"Date": http_date(T0 - 30), "Age": "10", "Cache-Control": "s-maxage=200, max-age=5"},
         [(100, FRESH, 130), (170, FETCH, 200)]),
        ({"Date": D0, "Last-Modified": http_date(T0 - 10_000)}, [(900, FRESH, 901), (999, REVALIDATE, 1000)]),
        ({"Date": D0, "Cache-Control": "max-age=10, stale-while-revalidate=60", "ETag": '"a"'},
         [(5, FRESH, 6), (30, SWR, 31), (69, SWR, 70), (80, REVALIDATE, 81)]),
        ({"Date": D0, "Cache-Control": "no-cache", "ETag": '"a"'}, [(0, REVALIDATE, 1), (3600, REVALIDATE, 3601)]),
        ({"Date": D0, "Cache-Control": "max-age=10, must-revalidate"}, [(5, FRESH, 6), (20, FETCH, 21)]),
    ],
    ids=["9111-4.2.1-max-age", "9111-4.2.3-age-header", "9111-4.2.2-heuristic", "5861-3-swr",
         "9111-5.2.2.4-no-cache", "9111-5.2.2.2-must-revalidate"],
)
def test_assessment_once_decides_by_arithmetic_at_any_time(headers, timeline):
    """The proxy assesses a stored response once and decides per request by arithmetic.

    The request left one second before the response arrived (T0), so the
    corrected initial age (RFC 9111 4.2.3) is one second plus any Age and
    apparent age; the expected ages and actions are worked out by hand.
    """
    assessment = policy.assess(headers, T0 - 1, T0, 200)
    for after, action, age in timeline:
        decision = policy.decide_assessed(assessment, T0 + after)
        assert (decision.action, decision.age) == (action, age), (after, decision)
        assert policy.current_age(headers, T0 - 1, T0, T0 + after) == age


ETAGGED = {"ETag": '"v1"', "Last-Modified": http_date(T0 - 3600)}


@pytest.mark.parametrize(
    ("method", "request_fields", "status", "expected"),
    [
        ("GET", {"Range": "bytes=0-99"}, 200, (0, 99)),
        ("GET", {"Range": "bytes=900-"}, 200, (900, 999)),
        ("GET", {"Range": "bytes=-100"}, 200, (900, 999)),
        ("GET", {"Range": "bytes=-5000"}, 200, (0, 999)),
        ("GET", {"Range": "bytes=990-5000"}, 200, (990, 999)),
        ("GET", {"Range": "bytes=1000-"}, 200, UNSATISFIABLE),
        ("GET", {"Range": "bytes=-0"}, 200, UNSATISFIABLE),
        ("GET", {"Range": "bytes=5-2"}, 200, None),
        ("GET", {"Range": "bytes=0-1,5-9"}, 200, None),
        ("GET", {"Range": "items=0-1"}, 200, None),
        ("GET", {"Range": "bytes=abc"}, 200, None),
        ("HEAD", {"Range": "bytes=0-9"}, 200, None),
        ("GET", {"Range": "bytes=0-9"}, 404, None),
        ("GET", {"Range": "bytes=0-9", "If-Range": '"v1"'}, 200, (0, 9)),
        ("GET", {"Range": "bytes=0-9", "If-Range": '"v0"'}, 200, None),
        ("GET", {"Range": "bytes=0-9", "If-Range": 'W/"v1"'}, 200, None),
        ("GET", {"Range": "bytes=0-9", "If-Range": http_date(T0 - 3600)}, 200, (0, 9)),
        ("GET", {"Range": "bytes=0-9", "If-Range": http_date(T0 - 60)}, 200, None),
        ("GET", {}, 200, None),
    ],
    ids=["9110-14.1.2-first-last", "open-ended", "suffix", "suffix-longer-than-body", "last-clipped",
         "14.1.1-unsatisfiable-first", "suffix-zero", "14.1.1-invalid-ignored", "several-ranges-whole",
         "unknown-unit", "garbage", "14.2-head-ignored", "only-200", "13.1.5-if-range-etag",
         "if-range-etag-mismatch", "if-range-weak-never", "if-range-date", "if-range-date-mismatch",
         "no-range"],
)
def test_requested_range(method, request_fields, status, expected):
    assert requested_range(method, request_fields, ETAGGED, status, 1000) == expected


# ---------------------------------------------------------------- X-Cache from Cache-Status (RFC 9211)

@pytest.mark.parametrize(("params", "verdict"), [
    (dict(hit=True), "HIT"),
    (dict(hit=True, detail="stale-while-revalidate"), "UPDATING"),        # RFC 5861 3
    (dict(hit=True, fwd_status=503, detail="stale-if-error"), "STALE"),   # RFC 5861 4
    (dict(hit=True, detail="stale-if-error"), "STALE"),                   # unreachable upstream
    (dict(hit=False, fwd="uri-miss", fwd_status=200), "MISS"),
    (dict(hit=False, fwd="vary-miss", fwd_status=200), "MISS"),
    (dict(hit=False, fwd="stale", fwd_status=304), "REVALIDATED"),        # RFC 9111 4.3.4
    (dict(hit=False, fwd="stale", fwd_status=200), "EXPIRED"),
    (dict(hit=False, fwd="stale", fwd_status=503), "EXPIRED"),
    (dict(hit=False, fwd="bypass", fwd_status=201), "BYPASS"),
    (dict(hit=False, fwd="bypass", detail="connection_refused"), "BYPASS"),
    (dict(hit=False, fwd="miss", detail="connection_refused"), "MISS"),
])
def test_x_cache_follows_from_the_cache_status_entry(params, verdict):
    assert policy.x_cache(**params) == verdict


@pytest.mark.parametrize("headers, expected", [
    case("9111-5.2.2.4-no-cache-fields", {"Cache-Control": 'no-cache="Set-Cookie, X-Token", max-age=60'},
         {"set-cookie", "x-token"}),
    case("9111-5.2.2.7-private-fields", {"Cache-Control": 'private="X-User"'}, {"x-user"}),
    case("9111-5.2.2.4-unqualified-hides-nothing", {"Cache-Control": "no-cache, private"}, set()),
    case("9213-2.2-cdn-cache-control-fields", {"Cache-Control": "max-age=60",
                                               "CDN-Cache-Control": 'no-cache="X-Edge", max-age=9'}, {"x-edge"}),
])
def test_hidden_fields(headers, expected):
    assert policy.hidden_fields(headers) == expected


# ---------------------------------------------------------------- per-site defaults (nginx proxy_cache_valid)

DEF = policy.SiteDefaults(default_ttl=300, max_ttl=3600, stale_while_revalidate=30, stale_if_error=600)


@pytest.mark.parametrize("headers, status, defaults, expected", [
    case("site-default-ttl-replaces-heuristic", {"Date": D0, "Last-Modified": http_date(T0 - 100_000)}, 200,
         DEF, 300.0),
    case("site-default-ttl-without-validators", {"Date": D0}, 200, DEF, 300.0),
    case("site-default-ttl-for-302", {"Date": D0}, 302, DEF, 300.0),
    case("site-default-ttl-not-for-500", {"Date": D0}, 500, DEF, 0.0),
    case("site-explicit-max-age-wins", {"Date": D0, "Cache-Control": "max-age=60"}, 200, DEF, 60.0),
    case("site-max-ttl-caps-explicit", {"Date": D0, "Cache-Control": "max-age=86400"}, 200, DEF, 3600.0),
    case("site-invalid-expires-still-expired", {"Date": D0, "Expires": "soon"}, 200, DEF, 0.0),
    case("site-no-defaults-heuristic", {"Date": D0, "Last-Modified": http_date(T0 - 1000)}, 200,
         policy.NO_DEFAULTS, 100.0),
])
def test_site_defaults_freshness(headers, status, defaults, expected):
    assert policy.freshness_lifetime(headers, status=status, defaults=defaults) == expected


@pytest.mark.parametrize("headers, status, expected", [
    case("site-default-ttl-makes-storable", {"Date": D0}, 200, (True, "default-ttl")),
    case("site-default-ttl-302", {"Date": D0}, 302, (True, "default-ttl")),
    case("site-default-ttl-no-store-still-wins", {"Date": D0, "Cache-Control": "no-store"}, 200, (False, "no-store")),
    case("site-default-ttl-private-still-wins", {"Date": D0, "Cache-Control": "private"}, 200, (False, "private")),
])
def test_site_defaults_storable(headers, status, expected):
    assert storable("GET", status, {}, headers, defaults=DEF) == expected


def test_without_site_defaults_a_bare_response_is_not_stored():
    assert storable("GET", 200, {}, {"Date": D0}) == (False, "zero-ttl")
    assert storable("GET", 302, {}, {"Date": D0}) == (False, "no-freshness")


def test_site_stale_windows_apply_unless_the_response_forbids_it():
    # At NOW the response is 100 s old and fresh for 40 s: stale by 60 s.
    plain = {"Date": D0, "Cache-Control": "max-age=40"}
    assert stale_if_error_allowed(plain, T0, T0, NOW) is False
    assert stale_if_error_allowed(plain, T0, T0, NOW, DEF) is True
    assert stale_if_error_allowed({**plain, "Cache-Control": "max-age=40, must-revalidate"}, T0, T0, NOW, DEF) is False
    assert stale_if_error_allowed({**plain, "Cache-Control": "max-age=40, stale-if-error=10"}, T0, T0, NOW,
                                  DEF) is False       # the response's own window wins
    swr = policy.assess(plain, T0, T0, 200, policy.SiteDefaults(stale_while_revalidate=90))
    assert policy.decide_assessed(swr, NOW).action is policy.Action.STALE_WHILE_REVALIDATE
