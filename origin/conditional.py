"""RFC 9110 validators, conditional requests (section 13) and byte ranges (section 14), pure.

The origin keeps its own implementation rather than sharing edge.policy's:
tests of the cache then check one implementation against another.
"""

from __future__ import annotations

import email.utils
import enum
import re
from dataclasses import dataclass
from datetime import timezone

MAX_RANGE_SPECS = 100               # more than this and the Range header is ignored


# --------------------------------------------------------------------------
# RFC 9110 section 8.8 and 13: validators and conditional requests (pure)
# --------------------------------------------------------------------------

ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
ETAG_CHARS = re.compile(r'[\x21\x23-\x7e\x80-\xff]*')      # etagc, RFC 9110 section 8.8.3


def parse_entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """Parse an ``If-Match``/``If-None-Match`` list (RFC 9110 section 13.1.1-2).

    Returns ``[(is_weak, opaque_tag), ...]``, or ``None`` for ``*``.  Members
    that are not entity-tags are dropped: they can never match.
    """
    if value.strip() == "*":
        return None
    tags = []
    for member in value.split(","):
        match = ENTITY_TAG.fullmatch(member.strip())
        if match:
            tags.append((match.group(1) is not None, match.group(2)))
    return tags


def _parse_one_tag(etag: str) -> tuple[bool, str] | None:
    match = ENTITY_TAG.fullmatch(etag.strip())
    return (match.group(1) is not None, match.group(2)) if match else None


def etag_matches(header: str, etag: str | None, *, weak: bool) -> bool:
    """Whether ``header`` (a list or ``*``) matches the current ``etag``.

    RFC 9110 section 8.8.3.2: strong comparison needs both tags strong and
    equal; weak comparison only needs the opaque tags equal.  ``*`` matches
    any current representation (there always is one when we have an etag or
    a file).
    """
    tags = parse_entity_tags(header)
    if tags is None:
        return True
    current = _parse_one_tag(etag) if etag else None
    if current is None:
        return False
    current_weak, current_opaque = current
    for tag_weak, opaque in tags:
        if opaque != current_opaque:
            continue
        if weak or not (tag_weak or current_weak):
            return True
    return False


def parse_http_date(value: str | None) -> int | None:
    """An HTTP-date (RFC 9110 section 5.6.7) as a Unix time, or None if invalid."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def http_date(timestamp: float) -> str:
    """IMF-fixdate, the preferred HTTP-date format (RFC 9110 section 5.6.7)."""
    return email.utils.formatdate(timestamp, usegmt=True)


def evaluate_preconditions(method: str, *, etag: str | None, last_modified: int | None,
                           if_match: str | None = None, if_unmodified_since: str | None = None,
                           if_none_match: str | None = None,
                           if_modified_since: str | None = None) -> int | None:
    """The status a conditional request ends in, or None to proceed normally.

    RFC 9110 section 13.2.2, in its order: If-Match (strong comparison, false
    -> 412); else If-Unmodified-Since (modified since -> 412); If-None-Match
    (weak comparison, true -> 304 for GET/HEAD, 412 otherwise); else, for GET
    and HEAD only, If-Modified-Since (not modified -> 304).  A date condition
    is ignored when the date is invalid or the resource has no
    Last-Modified.  Callers evaluate this only when the response would
    otherwise be 2xx (section 13.2.1).
    """
    if if_match is not None:
        if not etag_matches(if_match, etag, weak=False):
            return 412
    elif if_unmodified_since is not None and last_modified is not None:
        since = parse_http_date(if_unmodified_since)
        if since is not None and last_modified > since:
            return 412
    if if_none_match is not None:
        if etag_matches(if_none_match, etag, weak=True):
            return 304 if method in ("GET", "HEAD") else 412
    elif if_modified_since is not None and method in ("GET", "HEAD") and last_modified is not None:
        since = parse_http_date(if_modified_since)
        if since is not None and last_modified <= since:
            return 304
    return None


# --------------------------------------------------------------------------
# RFC 9110 section 14: byte ranges (pure)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``first..last`` of a representation."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, complete_length: int) -> str:
        """The Content-Range value of a 206 (RFC 9110 section 14.4)."""
        return f"bytes {self.first}-{self.last}/{complete_length}"


class RangeOutcome(enum.Enum):
    FULL = "full"                   # ignore Range: answer 200 with the whole body
    UNSATISFIABLE = "unsatisfiable"  # answer 416 with Content-Range: bytes */length


_RANGE_SPEC = re.compile(r"(\d*)-(\d*)")


def select_range(method: str, range_header: str | None, if_range: str | None, length: int,
                 etag: str | None, last_modified: int | None) -> ByteRange | RangeOutcome:
    """Decide how to answer a Range request (RFC 9110 sections 13.1.5, 14.1.1, 14.2).

    Only GET has range semantics; anything but a syntactically valid ``bytes``
    range set is ignored.  If-Range must match with strong comparison (an
    entity-tag) or equal Last-Modified exactly (a date), else the whole body is
    sent.  One satisfiable range gives a 206; several ranges are answered with
    the whole body (a server MAY ignore Range, and it spares multipart); when
    no range is satisfiable the answer is 416.  An empty representation has no
    satisfiable range except a suffix, which would select nothing, so it is
    answered in full.
    """
    if method != "GET" or range_header is None:
        return RangeOutcome.FULL
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(('"', "W/")):
            current = _parse_one_tag(etag) if etag else None
            wanted = _parse_one_tag(if_range)
            if current is None or wanted is None or current[0] or wanted[0] or current[1] != wanted[1]:
                return RangeOutcome.FULL
        else:
            date = parse_http_date(if_range)
            if date is None or last_modified is None or date != last_modified:
                return RangeOutcome.FULL
    unit, sep, specs_text = range_header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return RangeOutcome.FULL
    specs = [spec.strip() for spec in specs_text.split(",") if spec.strip()]
    if not specs or len(specs) > MAX_RANGE_SPECS:
        return RangeOutcome.FULL
    satisfiable: list[ByteRange] = []
    for spec in specs:
        match = _RANGE_SPEC.fullmatch(spec)
        if not match or not (match.group(1) or match.group(2)):
            return RangeOutcome.FULL
        first_text, last_text = match.groups()
        try:
            first = int(first_text) if first_text else None
            last = int(last_text) if last_text else None
        except ValueError:          # more digits than int() accepts
            return RangeOutcome.FULL
        if first is None:           # suffix-range: the last `last` bytes
            assert last is not None
            if length == 0 and last > 0:
                return RangeOutcome.FULL
            if last > 0:
                satisfiable.append(ByteRange(max(0, length - last), length - 1))
        else:
            if last is not None and last < first:
                return RangeOutcome.FULL    # invalid int-range: the whole set is invalid
            if first < length:
                satisfiable.append(ByteRange(first, length - 1 if last is None else min(last, length - 1)))
    if not satisfiable:
        return RangeOutcome.UNSATISFIABLE
    if len(specs) > 1:
        return RangeOutcome.FULL
    return satisfiable[0]
