"""HTTP/1.1 message rules the front enforces, as pure functions on bytes (testable with literals).

llhttp (through httptools) already rejects most malformed messages in its
strict mode: a bare LF, Content-Length with Transfer-Encoding, duplicate
Content-Lengths, a Transfer-Encoding whose last coding is not chunked,
invalid or overflowing chunk sizes and lengths, NUL and CR in values.  What
it accepts and a public edge must not forward is checked here, so that the
front never passes on a message that a server behind it could read
differently (request smuggling, RFC 9112 section 6.3 and 11.2).
"""

from __future__ import annotations

from http import HTTPStatus

# RFC 9110 5.5: field-vchar is VCHAR or obs-text; obs-text (0x80-0xff) is
# refused here: no client needs it and every parser behind us reads it differently.
FIELD_VALUE_BYTES = bytes([0x09, 0x20]) + bytes(range(0x21, 0x7F))
# RFC 9112 3.2 origin-form and absolute-form use visible ASCII only.
TARGET_BYTES = bytes(range(0x21, 0x7F))

SUPPORTED_VERSIONS = frozenset({"1.0", "1.1"})


class Reject(Exception):
    """A request the front answers itself with `status` and then closes the connection."""

    def __init__(self, status: int, reason: str, fields: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status, self.reason, self.fields = status, reason, fields


def check_target(target: bytes) -> None:
    if not target or target.translate(None, TARGET_BYTES):
        raise Reject(400, "request target has bytes outside visible ASCII")


def check_field_value(value: bytes) -> None:
    if value.translate(None, FIELD_VALUE_BYTES):
        raise Reject(400, "header field value has bytes outside visible ASCII, space and tab")


def check_version(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise Reject(400, f"HTTP/{version} is not HTTP/1.0 or HTTP/1.1")


def check_framing(transfer_encodings: list[bytes], content_lengths: list[bytes]) -> None:
    """Only a lone ``chunked`` transfer coding, never together with Content-Length (RFC 9112 6.1, 6.3).

    A request with another transfer coding cannot be forwarded faithfully
    (the coding is hop-by-hop and the node would have to decode it); nginx
    refuses them too.
    """
    if transfer_encodings:
        if content_lengths:
            raise Reject(400, "both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for value in transfer_encodings for c in value.split(b",")]
        if codings != [b"chunked"]:
            raise Reject(400, "Transfer-Encoding other than a single chunked")
    if len(content_lengths) > 1:
        raise Reject(400, "more than one Content-Length")


def expects_continue(expect: bytes | None) -> bool:
    """True for ``Expect: 100-continue``; any other expectation gets 417 (RFC 9110 10.1.1)."""
    if expect is None:
        return False
    if expect.strip().lower() == b"100-continue":
        return True
    raise Reject(417, "the only expectation supported is 100-continue")


def keep_alive(version: str, connection: list[bytes]) -> bool:
    """Does the client want the connection kept after this request (RFC 9112 9.3)?"""
    tokens = {t.strip().lower() for value in connection for t in value.split(b",")}
    if b"close" in tokens:
        return False
    if version == "1.0":
        return b"keep-alive" in tokens
    return True


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``, built once per status code."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")
    return line


def serialise_fields(fields) -> bytes:
    """Header field lines, each ending in CRLF.

    Values received upstream were decoded with surrogateescape; encoding them
    the same way gives back the bytes that arrived.
    """
    text = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return text.encode("utf-8", "surrogateescape")
