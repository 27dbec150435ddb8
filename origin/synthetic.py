"""Deterministic synthetic objects for /gen/: self-describing bodies and the query that shapes them, pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from multidict import MultiMapping

from origin.conditional import ENTITY_TAG, ETAG_CHARS

FIXED_LAST_MODIFIED = 1767225600    # lm=1: Thu, 01 Jan 2026 00:00:00 GMT
MAX_SIZE = 2**40                    # 1 TiB: "several GiB" with room to spare
MAX_DELAY_MS = 600_000
MAX_EXPIRES = 100 * 365 * 86400


# --------------------------------------------------------------------------
# Synthetic bodies (pure)
# --------------------------------------------------------------------------

LINE_BYTES = 64
TAG_CHARS = 46                      # tag + " " + 16 hex digits + "\n" = 64
_BLOCK_LINES = 4096                 # 0x1000: a line number is 13 block digits + 3 in-block digits
_BLOCK_BYTES = _BLOCK_LINES * LINE_BYTES
_IN_BLOCK_HEX = [b"%03x" % k for k in range(_BLOCK_LINES)]


def synthetic_tag(path: str, preamble: bytes = b"") -> bytes:
    """The 46 hex characters that mark every line of one synthetic object."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape") + b"\0" + preamble)
    return digest.hexdigest()[:TAG_CHARS].encode("ascii")


def synthetic_lines(tag: bytes, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start..end-1`` of the endless line pattern, in chunks of <= 256 KiB.

    Line *n* is ``tag + b" " + b"%016x" % n + b"\\n"``.  Within one block of
    4096 lines only the last three hex digits change, so a block is built
    with a single ``bytes.join`` instead of 4096 formatting calls.
    """
    while start < end:
        block = start // _BLOCK_BYTES
        block_start = block * _BLOCK_BYTES
        stop = min(end, block_start + _BLOCK_BYTES)
        first_line = (start - block_start) // LINE_BYTES
        last_line = (stop - block_start + LINE_BYTES - 1) // LINE_BYTES
        head = tag + b" " + b"%013x" % block
        data = head + (b"\n" + head).join(_IN_BLOCK_HEX[first_line:last_line]) + b"\n"
        offset = block_start + first_line * LINE_BYTES
        if start != offset or stop != offset + len(data):
            data = data[start - offset:stop - offset]
        yield data
        start = stop


def synthetic_body(tag: bytes, start: int, end: int, preamble: bytes = b"") -> Iterator[bytes]:
    """Bytes ``start..end-1`` of a synthetic object: ``preamble`` over the line pattern.

    The preamble replaces the first ``len(preamble)`` bytes, so the pattern
    keeps its offsets and the total size does not depend on the preamble.
    """
    if start < len(preamble):
        yield preamble[start:end]
        start = len(preamble)
    if start < end:
        yield from synthetic_lines(tag, start, end)


def vary_preamble(field_names: tuple[str, ...], headers: MultiMapping[str]) -> bytes:
    """The body lines naming the request header values a Vary'd object was chosen by.

    An absent header and an empty one are different variants (RFC 9111
    section 4.1), so they are written differently.
    """
    lines = []
    for name in field_names:
        values = headers.getall(name, [])
        if values:
            lines.append(f"{name}: {', '.join(values)}\n")
        else:
            lines.append(f"{name} (absent)\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# /gen/ query parameters (pure)
# --------------------------------------------------------------------------

class BadParameter(ValueError):
    """A query parameter of /gen/ with a value we cannot honour; the text is for the client."""


@dataclass(frozen=True)
class GenSpec:
    """What a /gen/ URL asks for."""

    size: int = 1024
    status: int = 200
    cache_control: str | None = None
    cdn_cache_control: str | None = None
    expires: int | None = None          # seconds from now; negative is in the past
    etag: str | None = None             # "derive" (etag=1) or a full entity-tag
    last_modified: int | None = None    # Unix time
    vary: str | None = None             # the Vary header value
    vary_fields: tuple[str, ...] = ()   # its field names, lower case, "*" left out
    location: str | None = None
    age: int | None = None
    delay: float = 0.0                  # seconds
    surrogate_key: str | None = None    # tags=a,b: "Surrogate-Key: a b" (Fastly's form)
    cache_tag: str | None = None        # cachetag=a,b: "Cache-Tag: a,b" (Cloudflare's form)
    norange: bool = False               # norange=1: ignore Range, always the whole 200 (as some origins do)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TAG = re.compile(r"[!-+\--~]{1,1024}")          # visible ASCII but the comma
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\ud7ff\ue000-\U0010ffff]*")


def _header_value(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is not None and not _FIELD_VALUE.fullmatch(value):
        raise BadParameter(f"{name}: control characters are not allowed in a header value")
    return value


def _integer(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    text = query.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip()) if re.fullmatch(r"\s*[+-]?\d{1,20}\s*", text) else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise BadParameter(f"{name}: expected an integer from {low} to {high}, got {text!r}")
    return value


def parse_gen_query(query: Mapping[str, str]) -> GenSpec:
    """Validate the query string of a /gen/ request; raise BadParameter on a bad value.

    ``size`` body bytes (default 1024); ``status`` 200-599 (a redirect gets
    ``Location`` from ``location`` or the same URL without ``status``);
    ``cc`` Cache-Control and ``cdncc`` CDN-Cache-Control (RFC 9213), verbatim;
    ``expires`` seconds from now; ``etag=1`` a strong ETag derived from path,
    size and variant, other values used as the tag (quoted unless already an
    entity-tag, so ``etag=W/"v1"`` gives a weak one); ``lm=1`` Last-Modified
    of 2026-01-01, or a Unix time; ``vary`` a Vary value; ``age`` an Age
    header; ``delay`` milliseconds to wait before answering; ``tags`` a
    comma-separated list of tags sent as ``Surrogate-Key`` (space-separated),
    ``cachetag`` the same sent as ``Cache-Tag``; ``norange=1`` ignores Range
    (a whole 200, ``Accept-Ranges: none``), like origins without range support.
    """
    size = _integer(query, "size", 0, MAX_SIZE)
    status = _integer(query, "status", 200, 599)
    expires = _integer(query, "expires", -MAX_EXPIRES, MAX_EXPIRES)
    age = _integer(query, "age", 0, 2**31)

    delay_text = query.get("delay")
    delay = 0.0
    if delay_text is not None:
        try:
            delay_ms = float(delay_text)
        except ValueError:
            delay_ms = -1.0
        if not 0 <= delay_ms <= MAX_DELAY_MS:   # also rejects nan
            raise BadParameter(f"delay: expected milliseconds from 0 to {MAX_DELAY_MS}, got {delay_text!r}")
        delay = delay_ms / 1000

    etag_text = _header_value(query, "etag")
    etag = None
    if etag_text == "1":
        etag = "derive"
    elif etag_text is not None:
        if ENTITY_TAG.fullmatch(etag_text):
            etag = etag_text
        elif etag_text and ETAG_CHARS.fullmatch(etag_text):
            etag = f'"{etag_text}"'
        else:
            raise BadParameter(f"etag: {etag_text!r} is neither 1 nor a valid entity-tag")

    lm_text = query.get("lm")
    last_modified = None
    if lm_text == "1":
        last_modified = FIXED_LAST_MODIFIED
    elif lm_text is not None:
        last_modified = _integer(query, "lm", 0, 253402300799)   # up to year 9999

    vary = _header_value(query, "vary")
    vary_fields: tuple[str, ...] = ()
    if vary is not None:
        names = [name.strip() for name in vary.split(",") if name.strip()]
        if not names or not all(name == "*" or _TOKEN.fullmatch(name) for name in names):
            raise BadParameter(f"vary: expected '*' or comma-separated header names, got {vary!r}")
        vary_fields = tuple(dict.fromkeys(name.lower() for name in names if name != "*"))

    tags = {name: _tags(query, name) for name in ("tags", "cachetag")}

    return GenSpec(
        size=1024 if size is None else size,
        status=200 if status is None else status,
        cache_control=_header_value(query, "cc"),
        cdn_cache_control=_header_value(query, "cdncc"),
        expires=expires, etag=etag, last_modified=last_modified,
        vary=vary, vary_fields=vary_fields,
        location=_header_value(query, "location"), age=age, delay=delay,
        surrogate_key=" ".join(tags["tags"]) if tags["tags"] else None,
        cache_tag=",".join(tags["cachetag"]) if tags["cachetag"] else None,
        norange=query.get("norange") == "1",
    )


def _tags(query: Mapping[str, str], name: str) -> tuple[str, ...]:
    text = query.get(name)
    if text is None:
        return ()
    tags = tuple(tag.strip() for tag in text.split(","))
    if not all(_TAG.fullmatch(tag) for tag in tags):
        raise BadParameter(f"{name}: expected comma-separated tags of visible ASCII, got {text[:80]!r}")
    return tags
