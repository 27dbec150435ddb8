"""Slice arithmetic for large objects, pure (nginx's `slice`, ATS's slice plugin).

A site with ``slice_size`` fetches and stores every GET as fixed-size,
slice-aligned byte ranges: slice *i* covers bytes ``i*S .. (i+1)*S - 1`` of
the object (the last one is shorter).  Each slice is its own cache entry,
keyed as the object's key plus the slice size and index, so a URL purge
(which matches the key and everything after VARIANT_SEPARATOR) removes them
all, and the LRU tiers evict them one by one.

Slices of one response must come from one version of the object: two
slices are combined only when their total lengths agree and their strong
ETags (or, without one, Last-Modified dates) are equal (RFC 9111 3.4).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from edge.cachekey import variant_store_key
from edge.config import MAX_SLICE, MIN_SLICE  # noqa: F401  (the limits live with the setting)

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d{1,19})-(\d{1,19})/(\d{1,19})\s*", re.I)
_RANGE_START = re.compile(r"\s*bytes\s*=\s*(\d{1,19})\s*-\s*(\d{0,19})\s*", re.I)


def slice_key(primary: str, slice_size: int, index: int) -> str:
    """Where slice `index` of the object at `primary` is stored; the size is part of it so a
    changed ``slice_size`` never combines slices cut at other boundaries."""
    return variant_store_key(primary, f"slice:{slice_size}:{index}")


def range_header(index: int, slice_size: int) -> str:
    """The Range field that asks upstream for slice `index`."""
    return f"bytes={index * slice_size}-{(index + 1) * slice_size - 1}"


def first_slice(range_value: str | None, slice_size: int) -> int:
    """The slice to fetch first for a request's Range field, before the object's length is known.

    A single ``bytes=N-`` or ``bytes=N-M`` range starts at the slice holding N;
    anything else (no Range, a suffix range ``bytes=-N``, several ranges, another
    unit) starts at slice 0, whose Content-Range gives the total length, as
    nginx's slice module does.
    """
    if range_value is None or "," in range_value:
        return 0
    match = _RANGE_START.fullmatch(range_value)
    if match is None:
        return 0
    return int(match.group(1)) // slice_size


def covering(first: int, last: int, slice_size: int) -> range:
    """The indices of the slices that hold bytes `first`..`last` (inclusive)."""
    return range(first // slice_size, last // slice_size + 1)


def slice_span(index: int, slice_size: int, total: int) -> tuple[int, int]:
    """The inclusive byte span of slice `index` in an object of `total` bytes."""
    first = index * slice_size
    return first, min(first + slice_size, total) - 1


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes FIRST-LAST/TOTAL`` as (first, last, total); None when absent, malformed or
    inconsistent (RFC 9110 14.4: an unknown total, ``*``, is of no use for slicing)."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value)
    if match is None:
        return None
    first, last, total = (int(group) for group in match.groups())
    if first > last or last >= total:
        return None
    return first, last, total


def check_partial(index: int, slice_size: int, content_range: str | None,
                  content_length: int | None) -> int | None:
    """The object's total length if a 206 is exactly slice `index`, else None.

    An upstream may answer a smaller or shifted range than asked; such an
    answer is never stored as the slice.
    """
    parsed = parse_content_range(content_range)
    if parsed is None:
        return None
    first, last, total = parsed
    if (first, last) != slice_span(index, slice_size, total):
        return None
    if content_length is not None and content_length != last - first + 1:
        return None
    return total


def strong_etag(fields: Mapping[str, str]) -> str | None:
    etag = fields.get("ETag")
    if etag is None:
        return None
    etag = etag.strip()
    return etag if etag.startswith('"') else None       # a weak ETag cannot combine ranges


def validators(fields: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The (strong ETag, Last-Modified) that identify a version of the object."""
    last_modified = fields.get("Last-Modified")
    return strong_etag(fields), last_modified.strip() if last_modified else None


def has_validator(fields: Mapping[str, str]) -> bool:
    """Can slices of this response ever be checked against each other?  Without a strong
    ETag or a Last-Modified date they are not stored (a change could never be detected)."""
    etag, last_modified = validators(fields)
    return etag is not None or last_modified is not None


def same_object(a: Mapping[str, str], a_total: int, b: Mapping[str, str], b_total: int) -> bool:
    """May slices with these fields and totals go into one response (RFC 9111 3.4)?

    The totals must agree; a strong ETag on either side must be on both and
    equal; otherwise Last-Modified must be equal.  With no validator on
    either side only the length can be compared.
    """
    if a_total != b_total:
        return False
    a_etag, a_lm = validators(a)
    b_etag, b_lm = validators(b)
    if a_etag is not None or b_etag is not None:
        return a_etag == b_etag
    return a_lm == b_lm
